"""Every public name (in a subpackage's ``__all__``) is importable and documented."""
from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ["lightning_hyper.functional", "lightning_hyper.nn", "lightning_hyper.nn.opt", "lightning_hyper.callbacks",
            "lightning_hyper.models", "lightning_hyper.data", "lightning_hyper.metrics", "lightning_hyper.viz",
            "lightning_hyper.cli"]


def _public():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            yield pytest.param(module, name, id=f"{package}.{name}")


@pytest.mark.parametrize("module,name", list(_public()))
def test_public_name_is_documented(module, name):
    obj = getattr(module, name)  # importable
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = inspect.getdoc(obj) or ""
        assert len(doc) >= 40, f"{module.__name__}.{name} needs a docstring (formula, paper section, shapes, defaults)"


def test_functional_and_nn_do_not_import_lightning():
    import subprocess
    import sys

    code = ("import sys, lightning_hyper.functional, lightning_hyper.nn; "
            "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
