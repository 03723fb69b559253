"""Every ```python example in README.md and docs/*.md runs as written and gives what it promises.

The examples are what users copy. Each one that trains runs exactly as written (its full Trainer), on two
seeds, and a check below asserts its outcome (an accuracy threshold, the energy lower than without the
callback, orthogonality kept), as torchmetrics' doctests check the printed value. The examples that do not
train run once and have their printed promise checked too. A new example without a check fails
``test_every_example_has_a_check``.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any
from collections.abc import Callable

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return {f"{path.relative_to(ROOT)}#{i}": code
            for path in DOCS for i, code in enumerate(BLOCK.findall(path.read_text()))}


EXAMPLES = _examples()
Namespace = dict[str, Any]


def _metric(ns: Namespace, key: str) -> float:
    return float(ns["trainer"].callback_metrics[key])


# ------------------------------------------------------------------------------------ the checks
def check_readme(ns: Namespace, out: str) -> None:
    assert _metric(ns, "val/acc") >= 0.9  # measured 0.983-0.994 on seeds 0-4
    metrics = ns["trainer"].callback_metrics
    hidden = [k for k in metrics if k.startswith("mhe/energy/backbone.")]
    assert len(hidden) >= 6 and "mhe/energy/head" in metrics, sorted(metrics)
    assert "val/acc" in out


def check_plots(ns: Namespace, out: str) -> None:
    for name in ("energy.png", "angles.png", "sphere.png"):
        assert Path(name).stat().st_size > 5000, name  # an image with content
    history = ns["monitor"].history
    layers = {row["layer"] for row in history}
    assert len(layers) >= 4 and len({row["step"] for row in history}) >= 10


def check_dh2l(ns: Namespace, out: str) -> None:
    assert _metric(ns, "val/acc") >= 0.6  # 20 classes (chance 0.05); measured 0.725 / 0.789
    assert "dh2l/penalty" in ns["trainer"].callback_metrics or any(
        k.startswith("dh2l/") for k in ns["trainer"].callback_metrics)


def check_hierarchical_head(ns: Namespace, out: str) -> None:
    assert tuple(ns["logits"].shape) == (4, 5) and tuple(ns["head"].weight.shape) == (5, 16)
    assert torch.isfinite(ns["logits"]).all()
    assert "torch.Size([4, 5]) torch.Size([5, 16])" in out


def check_energy_functional(ns: Namespace, out: str) -> None:
    from lightning_hyper.functional import hyperspherical_energy

    w = ns["W"].detach().double()
    assert ns["e"].item() == pytest.approx(hyperspherical_energy(w, half_space=True).item(), rel=1e-5)
    assert ns["conv"].weight.grad.norm() > 0
    assert f"E = {ns['e'].item():.3f}" in out


def check_mhe_lowers_energy(ns: Namespace, out: str) -> None:
    plain, reg = ns["energies"][False], ns["energies"][True]
    for layer in plain:
        if layer != "backbone.features.0":  # excluded from MHE in the example
            assert reg[layer] < plain[layer], (layer, reg[layer], plain[layer])
    assert _metric(ns, "val/acc") >= 0.9
    assert not any(k == "mhe/energy/backbone.features.0" for k in ns["trainer"].callback_metrics)


def check_comhe(ns: Namespace, out: str) -> None:
    assert _metric(ns, "val/acc") >= 0.5  # MNIST-1D, 2000 samples, 3 epochs (chance 0.1); measured 0.66-0.67
    assert torch.isfinite(ns["trainer"].callback_metrics["comhe/penalty"])


def check_opt_invariance(ns: Namespace, out: str) -> None:
    from lightning_hyper.functional import as_neurons, hyperspherical_energy

    e1 = hyperspherical_energy(as_neurons(ns["model"][0].weight)).item()
    assert e1 == pytest.approx(ns["e0"], rel=1e-5)  # R changed, the energy did not
    assert max(ns["orthogonality_errors"](ns["model"]).values()) < 1e-5


def check_opt_models(ns: Namespace, out: str) -> None:
    metrics = ns["trainer"].callback_metrics
    errors = {k: float(v) for k, v in metrics.items() if k.startswith("orthogonality/")}
    assert errors and max(errors.values()) < 1e-5, errors  # R stays orthogonal through 100 epochs of Adam
    assert all(torch.isfinite(v) for k, v in metrics.items() if k.startswith("monitor/energy/"))
    assert all(torch.isfinite(p).all() for p in ns["pointnet"].parameters())


def check_zero_norm(ns: Namespace, out: str) -> None:
    assert "rows [[3]]" in out and "zero_norm='exclude'" in out
    from lightning_hyper.functional import hyperspherical_energy

    kept = torch.cat([ns["W"][:3], ns["W"][4:]])
    assert float(out.strip().splitlines()[-1].split("(")[1].split(")")[0]) == pytest.approx(
        hyperspherical_energy(kept).item(), rel=1e-3)  # printed with 4 decimals


def check_margin_heads(ns: Namespace, out: str) -> None:
    import torch.nn.functional as F

    head, x, y = ns["head"], ns["x"], ns["y"]
    assert ns["loss"].item() > F.cross_entropy(head(x), y).item()  # the margin makes the target harder
    assert 5.0 <= head.lambda_ < 1000.0  # the training forward started the annealing from lambda = 1000


def check_sphereface(ns: Namespace, out: str) -> None:
    assert _metric(ns, "val/acc") >= 0.85  # closed set; measured 0.95-0.96
    assert _metric(ns, "val/verification_acc") >= 0.65  # unseen digits 0, 1, 2; measured 0.745-0.753


def check_operators(ns: Namespace, out: str) -> None:
    y = ns["y"]
    assert y.min() >= -1 and y.max() <= 1
    assert out.split()[0] == "True" and out.strip().endswith("True")


def check_convert(ns: Namespace, out: str) -> None:
    assert out.split() == ["SphereConv2d", "DecoupledConv2d", "Linear"]


def check_opt_preserves_resnet(ns: Namespace, out: str) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ns["resnet"](ns["x"]), ns["before"], rtol=0, atol=1e-5)
    layers = ns["opt_layers"](ns["resnet"])
    assert len(layers) >= 15 and "fc" not in layers


def check_convert_keeps_the_model(ns: Namespace, out: str) -> None:
    assert out.strip() == "['Linear', 'ReLU', 'SphereLinear', 'ReLU', 'Linear'] False"
    assert ns["frozen"][0].weight.requires_grad is False


def check_spherenet(ns: Namespace, out: str) -> None:
    assert _metric(ns, "val/acc") >= 0.85  # measured 0.91-0.93
    assert _metric(ns, "train/acc") >= 0.85  # accuracy of the plain logits, not of the margin logits


# example id -> (check, trains). Training examples run on two seeds.
CHECKS: dict[str, tuple[Callable[[Namespace, str], None], bool]] = {
    "README.md#0": (check_readme, True),
    "docs/cli_and_plots.md#0": (check_plots, True),
    "docs/dh2l.md#0": (check_dh2l, True),
    "docs/dh2l.md#1": (check_hierarchical_head, False),
    "docs/energy_and_mhe.md#0": (check_energy_functional, False),
    "docs/energy_and_mhe.md#1": (check_mhe_lowers_energy, True),
    "docs/energy_and_mhe.md#2": (check_comhe, True),
    "docs/opt.md#0": (check_opt_invariance, False),
    "docs/opt.md#1": (check_opt_preserves_resnet, False),
    "docs/opt.md#2": (check_opt_models, True),
    "docs/reliability.md#0": (check_zero_norm, False),
    "docs/sphereface.md#0": (check_margin_heads, False),
    "docs/sphereface.md#1": (check_sphereface, True),
    "docs/spherenet_dcnet.md#0": (check_operators, False),
    "docs/spherenet_dcnet.md#1": (check_convert, False),
    "docs/spherenet_dcnet.md#2": (check_convert_keeps_the_model, False),
    "docs/spherenet_dcnet.md#3": (check_spherenet, True),
}


def test_every_example_has_a_check():
    assert set(EXAMPLES) == set(CHECKS), (sorted(set(EXAMPLES) - set(CHECKS)), sorted(set(CHECKS) - set(EXAMPLES)))
    for ident, code in EXAMPLES.items():
        assert CHECKS[ident][1] == (".fit(" in code), f"{ident}: trains={'.fit(' in code}"


def _params() -> list:
    out = []
    for ident, (_, trains) in CHECKS.items():
        for seed in ((0, 1) if trains else (0,)):
            marks = [pytest.mark.slow] if trains else []
            out.append(pytest.param(ident, seed, id=f"{ident}-seed{seed}", marks=marks))
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ident,seed", _params())
def test_example_gives_what_it_promises(ident, seed, tmp_path, monkeypatch):
    if ident not in EXAMPLES:
        pytest.fail(f"{ident} is no longer an example; update CHECKS")
    monkeypatch.chdir(tmp_path)  # logs, checkpoints and plots land here, not in the repository
    L.seed_everything(seed, verbose=False)
    ns: Namespace = {"__name__": "__doc_example__"}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(EXAMPLES[ident], ident, "exec"), ns)
    CHECKS[ident][0](ns, buffer.getvalue())


# ------------------------------------------------------------------------------- one home per formula
FORMULA_ROW = re.compile(r"^\| (?P<formula>[^|]+) \| \[`(?P<file>[^`]+\.py)`\]\([^)]*\) \| (?P<names>[^|]+) \|", re.M)


def test_every_page_points_to_the_file_that_holds_each_formula():
    """Each docs page ends with a "Where each formula lives" table; every public name in it is defined in the file
    of its row (a reader gets from the name to the formula in two hops: the table, then the file)."""
    import importlib

    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        assert "## Where each formula lives" in text, page.name
        rows = list(FORMULA_ROW.finditer(text.split("## Where each formula lives", 1)[1]))
        assert rows, page.name
        for row in rows:
            file = row["file"]
            assert (ROOT / "lightning_hyper" / file).is_file(), (page.name, file)
            home = importlib.import_module("lightning_hyper." + file[:-3].replace("/", "."))
            for dotted in re.findall(r"`([a-z_]+(?:\.[A-Za-z_0-9]+)+)`", row["names"]):
                *mod, name = dotted.split(".")
                obj = getattr(importlib.import_module(".".join(["lightning_hyper", *mod])), name)
                assert getattr(home, name, None) is obj, (page.name, dotted, file)
                if isinstance(obj, type) or callable(obj):
                    assert obj.__module__ == home.__name__, (page.name, dotted, obj.__module__, file)
