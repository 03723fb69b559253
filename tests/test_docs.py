"""Every ```python example in README.md and docs/*.md runs as written (with a shortened Trainer).

The examples are what users copy; this keeps them true. ``lightning.Trainer`` is patched so each
``fit`` runs a couple of batches without loggers or checkpoints; nothing else is changed.
"""
from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> list:
    out = []
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            out.append(pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}"))
    return out


EXAMPLES = _examples()


def test_docs_have_examples():
    names = {p.id.split("#")[0] for p in EXAMPLES}
    assert "README.md" in names
    assert len(names) >= 5, names


@pytest.fixture
def short_trainer(monkeypatch, tmp_path):
    original = pl.Trainer.__init__

    def init(self, *args, **kwargs):
        kwargs.update(max_epochs=1, max_steps=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), check_val_every_n_epoch=1)
        kwargs.pop("val_check_interval", None)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", init)
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code, short_trainer):
    torch.manual_seed(0)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
