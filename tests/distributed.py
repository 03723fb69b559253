"""Helpers for the tests that start real process groups (``ddp_spawn``, 2 CPU processes, gloo).

``free_port`` picks the rendezvous port *below* the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``), so no outgoing connection (a gloo pair of an earlier
test, a pip download) can be handed that port between the check here and rank 0's bind: only a
process that binds that exact number on purpose could take it. Every port is used at most once per
test session, so a group of an earlier test in TIME_WAIT never collides.
"""
from __future__ import annotations

import itertools
import os
import socket

import lightning as L
import torch

_LOW, _HIGH = 20000, 32767  # below Linux' default ephemeral range 32768-60999
_USED: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port outside the ephemeral range that nothing listens on, never returned twice."""
    eph_low, eph_high = _ephemeral_range()
    candidates = [p for p in range(_LOW, _HIGH) if not eph_low <= p <= eph_high] or list(range(1024, eph_low))
    start = (os.getpid() * 7919) % len(candidates)  # parallel pytest sessions start at different ports
    for port in itertools.islice(itertools.cycle(candidates), start, start + len(candidates)):
        if port not in _USED and _bindable(port):
            _USED.add(port)
            return port
    raise RuntimeError("no free TCP port outside the ephemeral range for the DDP rendezvous")


class LogRecorder(L.Callback):
    """Records, per rank, the raw value of every ``self.log`` call whose name starts with one of ``prefixes``
    (before any cross-rank reduction), whether it asked for ``sync_dist``, and after every batch the value the
    trainer then holds in ``callback_metrics``. Subclasses save what they need in ``on_train_end``."""

    def __init__(self, folder, prefixes: tuple[str, ...]) -> None:
        self.folder = str(folder)
        self.prefixes = tuple(prefixes)
        self.raw: dict[str, list[float]] = {}
        self.logged: dict[str, list[float]] = {}
        self.sync: dict[str, bool] = {}

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)
        original = pl_module.log

        def log(name, value, *args, **kwargs):
            if name.startswith(self.prefixes):
                self.raw.setdefault(name, []).append(float(value))
                self.sync[name] = bool(kwargs.get("sync_dist", False))
            return original(name, value, *args, **kwargs)

        pl_module.log = log

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in self.raw:
            self.logged.setdefault(name, []).append(float(trainer.callback_metrics[name]))
