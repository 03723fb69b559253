"""Peak resident memory of a call, for the tests that bound memory (no N x N x d tensor)."""
from __future__ import annotations

import re

import pytest


def peak_rss_delta(fn) -> int:
    """Peak resident memory (bytes) reached while running ``fn`` above the resident size before it.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5, Linux >= 4.0); torch's CPU
    allocations are invisible to tracemalloc, so resident memory is what is measured.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - non-Linux
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak resident size")

    def field(name: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{name}:\s+(\d+) kB", f.read()).group(1)) * 1024

    before = field("VmRSS")
    fn()
    return field("VmHWM") - before
