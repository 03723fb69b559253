"""Plant known bugs in a copy of the package, one at a time, and check that the tests catch each one.

Outside the normal suite (pytest does not collect this file); run it with nothing else on the machine::

    python tests/mutation_check.py            # every mutant (a few minutes on 2 cores)
    python tests/mutation_check.py --list     # the planted bugs
    python tests/mutation_check.py --only energy-s2-slope half-space-pairing

Each mutant replaces one exact piece of source text (which must occur exactly once, so the list fails
loudly when the code moves) in a temporary copy of ``lightning_hyper/`` and ``tests/``, then runs the
test files that guard that code with ``pytest -x``. A mutant the tests pass is a *survivor*; the
script exits 1 if there is any. The unmutated copy is run first: its tests must pass.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENERGY = "lightning_hyper/functional/energy.py"
BASE = "lightning_hyper/callbacks/base.py"
MARGIN = "lightning_hyper/functional/margin.py"
ORTHO = "lightning_hyper/functional/orthogonal.py"
PROJ = "lightning_hyper/functional/projection.py"
OPS = "lightning_hyper/functional/operators.py"

ENERGY_TESTS = ("tests/functional/test_energy.py",)
INJECTION_TESTS = ("tests/callbacks/test_base.py", "tests/callbacks/test_mhe.py")
EVERY_N_TESTS = ("tests/callbacks/test_every_n_steps.py",)
DDP_TESTS = ("tests/reliability/test_ddp.py::test_ddp_penalty_gradient_is_the_mean_over_ranks",)
MARGIN_TESTS = ("tests/functional/test_margin.py", "tests/nn/test_heads.py")
ORTHO_TESTS = ("tests/functional/test_orthogonal.py",)
PROJ_TESTS = ("tests/functional/test_projection.py",)
OPS_TESTS = ("tests/functional/test_operators.py", "tests/nn/test_sphere.py", "tests/nn/test_decoupled.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # ---------------------------------------------------------------- energy kernel
    Mutant("energy-s2-value", ENERGY, "    if s == 2:\n        return r2.reciprocal_()",
           "    if s == 2:\n        return r2.rsqrt_()", ENERGY_TESTS),
    Mutant("energy-s2-slope", ENERGY, "        return f.square_(), 2.0", "        return f.square_(), 1.0",
           ENERGY_TESTS),
    Mutant("energy-pair-kernel-s2-slope", ENERGY, "return f, (f.square().mul_(2.0) if need_slope else None)",
           "return f, (f.square() if need_slope else None)", ENERGY_TESTS),
    Mutant("energy-log-slope", ENERGY, "return f, (r2.reciprocal() if need_slope else None)",
           "return f, (r2.reciprocal().mul(2.0) if need_slope else None)", ENERGY_TESTS),
    Mutant("energy-chord", ENERGY, "r2 = c.mul_(-2.0).add_(2.0 + self.eps)", "r2 = c.mul_(-1.0).add_(1.0 + self.eps)",
           ENERGY_TESTS),
    Mutant("energy-angular-exponent", ENERGY, "f = theta.log().mul_(-s).exp_()", "f = theta.log().mul_(-s / 2).exp_()",
           ENERGY_TESTS),
    Mutant("energy-jacobian-factor", ENERGY, ".mul_((inv * (2.0 * scale * factor)).unsqueeze(-1))",
           ".mul_((inv * (scale * factor)).unsqueeze(-1))", ENERGY_TESTS),
    Mutant("energy-tile-gradient-lower", ENERGY,
           "                    g_unit[:, b0:b0 + tile].baddbmm_(k.transpose(1, 2), ua)\n", "", ENERGY_TESTS),
    Mutant("energy-tile-off-diagonal-once", ENERGY, "                total += 2.0 * t\n",
           "                total += t\n", ENERGY_TESTS),
    Mutant("energy-self-pairs-kept", ENERGY, "            _zero_self_pairs(inv, diagonal)\n", "", ENERGY_TESTS),
    Mutant("half-space-s2-closed-form-slope", ENERGY, "inv.square_().mul_(c), a_", "inv.square_().mul_(c), 0.5 * a_",
           ENERGY_TESTS),
    Mutant("energy-normalization-jacobian", ENERGY,
           "return total, g_unit.addcmul_(radial, unit, value=-1.0).mul_(", "return total, g_unit.mul_(", ENERGY_TESTS),
    Mutant("energy-raw-radial-diagonal", ENERGY,
           "    m.diagonal(dim1=-2, dim2=-1).sub_(torch.linalg.vecdot(m, gram).mul_(inv.square()))\n", "",
           ENERGY_TESTS),
    Mutant("energy-raw-split-transpose", ENERGY, "    g[..., h:, :h] = ab.transpose(-1, -2)\n",
           "    g[..., h:, :h] = ab.transpose(-1, -2).flip(-1)\n",
           ENERGY_TESTS),
    Mutant("energy-raw-gradient-factor", ENERGY, "m = k.mul_(outer.mul_(2.0 * scale * factor))",
           "m = k.mul_(outer.mul_(2.0 * scale))",
           ENERGY_TESTS),
    Mutant("energy-mean-pairs", ENERGY, "else n * (n - 1)", "else n * n", ENERGY_TESTS),
    # ---------------------------------------------------------------- half-space pairing
    Mutant("half-space-pairing", ENERGY,
           "r2m = torch.rsub(r2, 4.0 + 2.0 * self.eps).clamp_min_(self.eps) if self.half_space else None",
           "r2m = r2.clone() if self.half_space else None", ENERGY_TESTS),
    Mutant("half-space-angular-pairing", ENERGY, "f2, k2 = _angular(-c, self, need_slope)",
           "f2, k2 = _angular(c, self, need_slope)", ENERGY_TESTS),
    Mutant("half-space-antipodes", ENERGY, "(2 * n * spec.antipodal_value() * scale if", "(0.0 * scale if",
           ENERGY_TESTS),
    Mutant("half-space-pair-count", ENERGY, "pairs = 2 * n * (2 * n - 1) if spec.half_space",
           "pairs = n * (n - 1) if spec.half_space", ENERGY_TESTS),
    # ---------------------------------------------------------------- penalty injection
    Mutant("inject-tensor-drops-penalty", BASE, "return out + extra.to(out.dtype)", "return out", INJECTION_TESTS),
    Mutant("inject-dict-drops-penalty", BASE, 'return {**out, "loss": out["loss"] + extra.to(out["loss"].dtype)}',
           "return out", INJECTION_TESTS),
    Mutant("inject-none-raises", BASE,
           "        if out is None:\n            return None\n        self._losses_since_step += 1",
           "        self._losses_since_step += 1", INJECTION_TESTS),
    Mutant("inject-none-gradient-mode-still-steps", BASE,
           "skipped_batches = pl_module.automatic_optimization and self._losses_since_step == 0",
           "skipped_batches = False", INJECTION_TESTS),
    # ---------------------------------------------------------------- every_n_steps
    Mutant("every-n-loss-mode-unscaled", BASE, "return total * k if k != 1 else total", "return total",
           EVERY_N_TESTS),
    Mutant("every-n-gradient-mode-unscaled", BASE, "grads = torch.autograd.grad(total * k if k != 1 else total,",
           "grads = torch.autograd.grad(total,", EVERY_N_TESTS),
    Mutant("every-n-counts-batches", BASE, "return step % self.every_n_steps == 0",
           "return self._losses_since_step % self.every_n_steps == 0", EVERY_N_TESTS),
    # ---------------------------------------------------------------- DDP averaging
    Mutant("ddp-sum-not-mean", BASE, 'reduce_op="mean")', 'reduce_op="sum")', DDP_TESTS),
    # ---------------------------------------------------------------- margins
    Mutant("psi-sign", MARGIN, "sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k", "sign = 1.0", MARGIN_TESTS),
    Mutant("psi-offset", MARGIN, "return sign * _chebyshev(c, m) - 2.0 * k", "return sign * _chebyshev(c, m) - k",
           MARGIN_TESTS),
    Mutant("arcface-shift", MARGIN, "shifted = c * math.cos(m) - sin * math.sin(m)",
           "shifted = c * math.cos(m) + sin * math.sin(m)", MARGIN_TESTS),
    Mutant("cosface-sign", MARGIN, "    return cos - margin\n", "    return cos + margin\n", MARGIN_TESTS),
    # ---------------------------------------------------------------- orthogonal maps
    Mutant("skew-symmetric", ORTHO, "    return U - U.mT\n", "    return U + U.mT\n", ORTHO_TESTS),
    Mutant("cayley-order", ORTHO, "return _solve(eye - S, eye + S)", "return _solve(eye - S, eye - S)", ORTHO_TESTS),
    Mutant("cayley-apply", ORTHO, "return 2 * _solve(_eye_like(P) - S, V) - V",
           "return _solve(_eye_like(P) - S, V) - V", ORTHO_TESTS),
    Mutant("gram-schmidt-normalize", ORTHO, "rows.append(t / t.norm(dim=-1, keepdim=True).clamp_min(eps))",
           "rows.append(t)", ORTHO_TESTS),
    # ---------------------------------------------------------------- fused operator backwards
    Mutant("patch-sums-backward-factor", OPS, "g2 = _CONV[nd](grad * 2.0, ones", "g2 = _CONV[nd](grad * 1.0, ones",
           OPS_TESTS),
    Mutant("conv-and-patch-sums-dropped", OPS, "grad_x = x * g2 if grad_x is None else grad_x.addcmul_(x, g2)",
           "grad_x = x * g2 if grad_x is None else grad_x", OPS_TESTS),
    Mutant("decoupled-tanh-slope", OPS, "a.addcmul_(buf, big_h, value=-1.0)", "a.addcmul_(buf, big_h, value=-0.5)",
           OPS_TESTS),
    Mutant("decoupled-seg-slope", OPS, ".add_(above.sum_to_size(xn.shape), alpha=beta)",
           ".add_(above.sum_to_size(xn.shape), alpha=alpha)", OPS_TESTS),
    Mutant("decoupled-sigmoid-slope", OPS, "chan = scale / (2.0 * k)", "chan = scale / k", OPS_TESTS),
    # ---------------------------------------------------------------- CoMHE projection
    Mutant("projection-transpose", PROJ, "return torch.matmul(x, p.transpose(-1, -2))",
           "return torch.matmul(x, p.transpose(-1, -2)).abs()", PROJ_TESTS),
    Mutant("projection-aggregate", PROJ, 'return energies.mean() if aggregate == "mean" else energies.max()',
           'return energies.max() if aggregate == "mean" else energies.mean()', PROJ_TESTS),
    Mutant("projection-distribution", PROJ,
           "return torch.randn(num_projections, projection_dim, dim, generator=generator, dtype=dtype, device=device)",
           "return torch.rand(num_projections, projection_dim, dim, generator=generator, dtype=dtype, device=device)",
           PROJ_TESTS),
]


def _copy_tree(dest: Path) -> None:
    for name in ("lightning_hyper", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)


def _run_tests(dest: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           *tests], cwd=dest, env=env, capture_output=True, text=True)
    return proc.returncode == 0, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the planted bugs and exit")
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutants (by name)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:40s} {m.path}")
        return 0
    if args.only is not None and len(mutants) != len(args.only):
        known = sorted(m.name for m in MUTANTS)
        raise SystemExit(f"--only: unknown mutant(s) {sorted(set(args.only) - set(known))}; known: {known}")
    survivors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lh-mutants-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest)
        for m in mutants:  # every mutant's text must still exist exactly once
            count = (dest / m.path).read_text().count(m.old)
            if count != 1:
                raise SystemExit(
                    f"mutant {m.name}: the text to replace occurs {count} times in {m.path}; update the list"
                )
        files = sorted({t for m in mutants for t in m.tests})
        ok, secs = _run_tests(dest, tuple(files))
        print(f"unmutated: tests {'pass' if ok else 'FAIL'} ({secs:.0f} s)", flush=True)
        if not ok:
            return 2
        for m in mutants:
            path = dest / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                passed, secs = _run_tests(dest, m.tests)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            if passed:
                survivors.append(m.name)
            print(f"{m.name:40s} {verdict:8s} ({secs:.0f} s)", flush=True)
    print(f"\n{len(mutants)} planted bugs, {len(mutants) - len(survivors)} caught, {len(survivors)} survived"
          + (f": {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
