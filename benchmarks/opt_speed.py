"""Training-step time of OPT layers divided by the plain layer (spec ``opt.md`` §3.11, §4; issue 6).

One training step = forward, ``loss.backward()`` and an SGD step (plus the OGD step for ``ogd`` and the
relaxed penalty for ``relaxed``), median over ``--repeats`` rounds (variants interleaved) after a warm-up, on:

* ``linear``: ``nn.Linear(512, 512)`` on a batch of 128 (``d = 512``);
* ``conv``:  a ResNet-20 stage-3 conv ``nn.Conv2d(64, 64, 3, padding=1)`` on ``(128, 64, 8, 8)`` (``d = 576``).

Rows: every OPT method of :func:`lightning_hyper.nn.opt.apply_opt`; S-OPT (``d' = d/4``) and PE-OPT
(4 independent blocks) with Cayley and Gram-Schmidt; torch's own
``torch.nn.utils.parametrizations.orthogonal`` (cayley / matrix_exp, default trivialization) and
geotorch's ``orthogonal`` (if installed) on the same weight — note those two make the *weight itself*
orthogonal, while OPT builds ``W = R V`` (our Cayley solves ``(I − S) X = V`` directly); torch's
trivialization starts its skew parameter at 0, so ``matrix_exp:id`` (our ``r_init="identity"``) is the
like-for-like row for the exponential map, whose cost grows with ``‖S‖`` (more squarings). The last block
times the OPT part alone (building ``W`` and its backward) for full OPT, S-OPT and PE-OPT.

    python benchmarks/opt_speed.py               # full shapes (a few minutes on 2 CPU cores)
    python benchmarks/opt_speed.py --smoke       # tiny shapes, 2 repeats (seconds; used by the tests)
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_hyper.functional.orthogonal import relaxed_orthogonality_penalty
from lightning_hyper.nn.opt import apply_opt, attach_ogd, split_opt_parameters

METHODS = ["cayley", "gram_schmidt", "householder", "lowdin", "matrix_exp", "ogd", "relaxed"]


def make_layer(kind: str, d_linear: int, channels: int) -> tuple[nn.Module, torch.Tensor]:
    if kind == "linear":
        return nn.Linear(d_linear, d_linear), torch.randn(128, d_linear)
    return nn.Conv2d(channels, channels, 3, padding=1), torch.randn(128, channels, 8, 8)


def step_fn(layer: nn.Module, x: torch.Tensor, variant: str) -> Callable[[], None]:
    """Build the layer variant and return one training step as a closure."""
    extra: Callable[[], torch.Tensor] | None = None
    if variant == "plain":
        params = list(layer.parameters())
    elif variant.startswith("torch_") or variant == "geotorch":
        if variant == "geotorch":
            import geotorch

            geotorch.orthogonal(layer, "weight")
        else:
            torch.nn.utils.parametrizations.orthogonal(layer, orthogonal_map=variant[len("torch_"):])
        params = list(layer.parameters())
    else:
        method, _, option = variant.partition(":")
        kwargs = {"sopt": {"sopt": True}, "pe4": {"blocks": 4}, "id": {"r_init": "identity"}, "": {}}[option]
        apply_opt(layer, method, output_layer="none", seed=0, **kwargs)
        rot, rest = split_opt_parameters(layer)
        params = rest if method == "ogd" else list(layer.parameters())
        if method == "relaxed":
            P = rot[0]
            extra = lambda: 0.1 * relaxed_orthogonality_penalty(P)  # noqa: E731
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if variant.startswith("ogd"):
        attach_ogd(opt, layer, lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = layer(x).square().mean()
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()

    return step


def run(kind: str, d_linear: int, channels: int, repeats: int, variants: list[str]) -> dict[str, float]:
    """Median step time per variant; the variants are timed round-robin (one step each per round), so
    load changes on a shared machine hit every variant alike and the ratios stay comparable."""
    steps = {}
    for variant in variants:
        if kind == "conv" and variant.startswith(("torch_", "geotorch")):
            continue  # torch/geotorch parametrize 2-D weights only (a conv weight is 4-D)
        torch.manual_seed(0)
        layer, x = make_layer(kind, d_linear, channels)
        try:
            steps[variant] = step_fn(layer, x, variant)
        except ImportError as err:
            print(f"  {variant}: skipped ({err})")
            continue
        steps[variant]()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def construction_times(kind: str, d_linear: int, channels: int, repeats: int) -> dict[str, float]:
    """Median time of the OPT part alone — building ``W = R V`` and back-propagating into ``P`` —
    for full OPT, S-OPT (d' = d/4) and PE-OPT (4 blocks), interleaved."""
    fns = {}
    for method in ("cayley", "gram_schmidt"):
        for option, kwargs in (("full", {}), ("sopt", {"sopt": True}), ("pe4", {"blocks": 4})):
            torch.manual_seed(0)
            layer, _ = make_layer(kind, d_linear, channels)
            apply_opt(layer, method, output_layer="none", seed=0, **kwargs)
            grad = torch.randn(layer.weight.shape)

            def fn(layer=layer, grad=grad) -> None:
                layer.parametrizations.weight.original.grad = None
                layer.weight.backward(grad)

            fn()
            fns[f"{method}:{option}"] = fn
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d_linear, channels, repeats = (32, 8, 2) if args.smoke else (512, 64, args.repeats)
    try:
        import geotorch  # noqa: F401

        geo = ["geotorch"]
    except ImportError:
        geo = []
        print("geotorch is not installed (pip install geotorch): its row is skipped")
    variants = (["plain", *METHODS, "matrix_exp:id", "cayley:sopt", "gram_schmidt:sopt", "cayley:pe4",
                 "gram_schmidt:pe4", "torch_cayley", "torch_matrix_exp", *geo])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} steps "
          "(forward + backward + SGD step), variants interleaved")
    results = {}
    for kind, label in (("linear", f"Linear {d_linear}x{d_linear}, batch 128"),
                        ("conv", f"Conv2d({channels}, {channels}, 3) on (128, {channels}, 8, 8), d = {channels * 9}")):
        res = run(kind, d_linear, channels, repeats, variants)
        results[kind] = res
        plain = res["plain"]
        print(f"\n{label}")
        print(f"  {'variant':<20} {'ms/step':>9} {'x plain':>8}")
        for variant, t in res.items():
            print(f"  {variant:<20} {1e3 * t:9.2f} {t / plain:8.2f}")
        if "torch_cayley" in res:
            exact = {m: res[m] for m in METHODS[:5]}
            best = min(exact, key=exact.get)
            print(f"  fastest exact OPT method: {best} ({exact[best] / plain:.2f}x plain) vs torch cayley "
                  f"({res['torch_cayley'] / plain:.2f}x plain): ratio {exact[best] / res['torch_cayley']:.2f}")
        cons = construction_times(kind, d_linear, channels, repeats)
        results[f"{kind}_construction"] = cons
        print("  OPT part alone (build W = R·V, backward into P), ms; S-OPT and PE-OPT as a fraction of full:")
        for method in ("cayley", "gram_schmidt"):
            full = cons[f"{method}:full"]
            print(f"    {method:<13} full {1e3 * full:7.2f}   S-OPT {1e3 * cons[f'{method}:sopt']:6.2f} "
                  f"({cons[f'{method}:sopt'] / full:.2f})   PE-OPT/4 {1e3 * cons[f'{method}:pe4']:6.2f} "
                  f"({cons[f'{method}:pe4'] / full:.2f})   whole step S-OPT/full "
                  f"{res[f'{method}:sopt'] / res[method]:.2f}")
    return results


if __name__ == "__main__":
    main()
