"""notebooks/*.ipynb: committed executed (figures visible without running them), small and quiet; each runs top to
bottom on CPU (nbclient), on a copy, and the claim its text makes holds in the numbers it prints.

Each notebook prints one ``RESULT {json}`` line next to its final ``assert``; the claims below are read back from it,
both in the committed outputs and in a fresh run. Regenerate the committed outputs with
``python notebooks/execute.py``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart_mhe.ipynb", "02_sphereface_embeddings.ipynb", "03_opt_and_graphs.ipynb"]
MAX_BYTES = 1_000_000
MAX_STREAM_LINES = 50  # per cell; a progress bar in a notebook prints hundreds to thousands of updates
PROGRESS = re.compile(r"\d+it/s\]|\ds/it\]|it/s, v_num")
# not results: Lightning's info lines and tips, and warnings (checked in the committed outputs)
NOISE = re.compile(r"Tip: For seamless|GPU available|`Trainer\.\w+` stopped|\w+Warning: ")


def _executor():
    spec = importlib.util.spec_from_file_location("notebooks_execute", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _code(book) -> list:
    return [c for c in book.cells if c.cell_type == "code"]


def _stream(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def _result(book) -> dict:
    lines = [line for c in _code(book) for line in _stream(c).splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one 'RESULT {{...}}' line in the outputs, found {len(lines)}"
    return json.loads(lines[0][len("RESULT "):])


def _check_outputs(book, name: str, strict: bool) -> None:
    """A figure, no error, and no cell flooding its output (strict: no warnings or Lightning chatter either)."""
    outputs = [o for c in _code(book) for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure (image/png) in the outputs"
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: an error in the outputs"
    for i, cell in enumerate(_code(book)):
        text = _stream(cell)
        lines = len(text.splitlines())
        assert lines <= MAX_STREAM_LINES, f"{name}, code cell {i}: {lines} lines of output (at most {MAX_STREAM_LINES})"
        assert not PROGRESS.search(text), f"{name}, code cell {i}: a progress bar in the output"
        if strict:
            noise = NOISE.search(text)
            assert noise is None, f"{name}, code cell {i}: {noise.group(0)!r} in the saved output"


# ------------------------------------------------------------------ the claims, read back from the RESULT line
def _claim_01(r: dict) -> None:
    layers = list(r["energy_start"])
    assert len(layers) >= 3 and set(r["energy_mhe"]) == set(r["energy_baseline"]) == set(layers)
    not_lower = [k for k in layers if not r["energy_mhe"][k] < r["energy_baseline"][k]]
    assert not not_lower, f"MHE did not lower the energy of {not_lower}"
    assert min(r["val_acc"].values()) > 0.8, f"a run did not train: {r['val_acc']}"


def _claim_02(r: dict) -> None:
    m1, m4 = r["m1"], r["m4"]
    assert m4["closed_afs"] < m1["closed_afs"], "the margin did not make the training classes more compact"
    assert min(m1["closed_acc"], m4["closed_acc"]) > 0.8, "a run did not train"
    # the text also says that, for the seed used, the margin does not help the unseen digits (lower AFS, lower
    # verification accuracy with m=4): if that changes, the markdown of notebook 02 must change with it
    assert r["seed"] == 0 and m4["unseen_afs"] > m1["unseen_afs"] and m4["verification"] < m1["verification"], (
        "notebook 02's markdown describes the unseen digits as worse with m=4; update it to the new numbers")


def _claim_03(r: dict) -> None:
    assert r["opt_max_relative_drift"] <= 1e-7, f"OPT energy drift {r['opt_max_relative_drift']:.1e} > 1e-7"
    assert r["plain_max_relative_change"] > 1e-3, "plain training did not move the energy: no contrast to show"
    assert min(r["val_acc"].values()) > 0.8, f"a run did not train: {r['val_acc']}"


CLAIMS = {"01_quickstart_mhe.ipynb": _claim_01, "02_sphereface_embeddings.ipynb": _claim_02,
          "03_opt_and_graphs.ipynb": _claim_03}


def test_notebooks_present():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_small_and_quiet(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes (under {MAX_BYTES})"
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata.kernelspec.name == "python3"
    code = _code(book)
    assert "lightning_hyper" in "\n".join(c.source for c in code)
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom in one run: {counts}"
    _check_outputs(book, path.name, strict=True)
    CLAIMS[path.name](_result(book))  # the committed text matches the committed numbers


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" in specs:
        return "python3"
    pytest.skip(f"no 'python3' Jupyter kernel (found {sorted(specs)}); run `python -m ipykernel install --user`")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~15-30 s each on an idle CPU; generous for a loaded shared machine
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_claim_holds(path, tmp_path):
    kernel = _kernel_name()
    committed = _digest(path)
    copy, cwd = tmp_path / path.name, tmp_path / "cwd"
    shutil.copyfile(path, copy)
    cwd.mkdir()
    # raises CellExecutionError (with the traceback) if any cell fails, the notebook's own claim `assert` included
    book = _executor().execute(copy, copy, cwd=cwd, timeout=540, kernel_name=kernel)
    assert _digest(path) == committed, "running the test changed the committed notebook"
    assert not list(cwd.iterdir()), f"{path.name} wrote into its working directory: {sorted(cwd.iterdir())}"
    _check_outputs(book, path.name, strict=False)
    CLAIMS[path.name](_result(book))
