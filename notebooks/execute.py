"""Run notebooks top to bottom and save them with their outputs (the committed notebooks are saved executed).

    python notebooks/execute.py              # every notebook in notebooks/, in place
    python notebooks/execute.py 02_sphereface_embeddings.ipynb

The kernel runs in a temporary working directory, with this checkout first on ``PYTHONPATH``, one torch thread
(tiny models) and the inline plot backend. ``tests/test_notebooks.py`` runs the notebooks the same way, on copies.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def kernel_env() -> dict[str, str]:
    """The kernel's environment: this one, with the checkout importable and one torch thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is faster, and far faster on a shared machine
    return env


def execute(source: str | os.PathLike, target: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
            timeout: int = 600, kernel_name: str = "python3") -> nbformat.NotebookNode:
    """Execute ``source`` in ``cwd`` (default: a new temporary directory) and write it with its outputs to
    ``target`` (default: nowhere). Raises ``nbclient.exceptions.CellExecutionError`` if a cell fails."""
    book = nbformat.read(source, as_version=4)
    with tempfile.TemporaryDirectory(prefix="notebook_cwd_") as scratch:
        client = nbclient.NotebookClient(book, timeout=timeout, kernel_name=kernel_name, record_timing=False,
                                         resources={"metadata": {"path": str(cwd or scratch)}})
        client.execute(env=kernel_env())
    if target is not None:
        nbformat.write(book, target)
    return book


def main(names: list[str]) -> None:
    paths = [ROOT / "notebooks" / n for n in names] if names else sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        execute(path, path)
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])
