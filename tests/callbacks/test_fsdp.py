"""Issue 17: the callbacks on sharded models (FSDP2 through Lightning's ModelParallelStrategy, CPU, gloo).

Three real 2-process runs of tests/callbacks/fsdp_worker.py (a tiny MLP whose every weight FSDP2 splits
over the ranks, 15 rows as 8 + 7), with the default ``MHERegularizer()``, a label-dependent
``MHERegularizer(output_mode="labels")`` (each rank's own penalty: its gradient must be averaged as DDP does),
``CoMHERegularizer`` (random projections) and ``EnergyMonitor``:

* ``ddp``: the same model and seed under DDP (the reference);
* ``fsdp``: under ModelParallelStrategy, defaults (``sharded_energy="auto"``: these small layers are
  gathered, ``mode="loss"``), saving a distributed checkpoint after step 2;
* ``ring``: resumed from that checkpoint, every energy on the ring (``sharded_energy="ring"``) and the
  penalties added in ``mode="gradient"``.

Every logged value and every final weight equals DDP's to float32 rounding; the energies of the regularized
layers drop; the selection table is printed once, on rank zero.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_hyper.callbacks import CoMHERegularizer, EnergyMonitor, MHERegularizer
from lightning_hyper.callbacks.base import check_strategy
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_AT = 4, 2


def _run(out: Path, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "tests.callbacks.fsdp_worker", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    ddp = _run(root / "ddp", "--strategy", "ddp", "--steps", str(STEPS))
    fsdp = _run(root / "fsdp", "--strategy", "fsdp", "--steps", str(STEPS), "--save-at", str(SAVE_AT))
    ckpt = root / "fsdp" / f"step={SAVE_AT}.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file(), sorted(p.name for p in (root / "fsdp").iterdir())
    ring = _run(root / "ring", "--strategy", "fsdp", "--steps", str(STEPS), "--variant", "ring-gradient",
                "--resume", str(ckpt))
    printed = [(root / "fsdp" / f"printed{r}.txt").read_text() for r in (0, 1)]
    return types.SimpleNamespace(ddp=ddp, fsdp=fsdp, ring=ring, printed=printed, ckpt=ckpt)


def _close(a: float, b: float) -> bool:
    """Equal to float32 rounding amplified by the previous SGD steps (the first step's values agree to ~1e-7).
    CoMHE projects to 8 dimensions: with 4, nearly collinear projected pairs (1/(1 - c^2)) made the training
    chaotic enough to grow the all-gather vs all-reduce rounding difference to ~1e-3 in four steps. A penalty
    gradient summed instead of averaged changes the logged values by > 1e-3."""
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


#: four SGD steps (lr 0.2) with penalties of weight 10 amplify float32 rounding differences of the summation
#: order (all-gather + reduce-scatter vs all-reduce) to ~1e-5; a penalty gradient summed instead of averaged
#: over the ranks, or missing, moves a weight by > 1e-3
WEIGHT_TOL = 1e-4


def _assert_same_weights(runs: list[dict], want: dict[str, torch.Tensor]) -> None:
    for name, ref in want.items():
        for rank in (0, 1):
            diff = float((runs[rank]["params"][name] - ref).abs().max())
            assert diff <= WEIGHT_TOL, f"{name} on rank {rank}: max |difference| {diff:.3g} > {WEIGHT_TOL}"


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_fsdp2_logs_and_weights_equal_ddp(runs):
    ddp, fsdp = runs.ddp, runs.fsdp
    assert fsdp[0]["strategy"] == "ModelParallelStrategy" and ddp[0]["strategy"] == "DDPStrategy"
    assert set(fsdp[0]["weight_types"].values()) == {"DTensor"}  # really sharded
    assert set(ddp[0]["weight_types"].values()) == {"Parameter"}
    names = set(ddp[0]["raw"])
    assert {"mhe/penalty", "mhe_labels/penalty", "comhe/penalty", "monitor/energy/fc1", "monitor/energy/out",
            "mhe/energy/fc2"} <= names
    assert set(fsdp[0]["raw"]) == names
    for rank in (0, 1):
        for name in names:
            want, got = ddp[rank]["raw"][name], fsdp[rank]["raw"][name]
            assert len(got) == len(want) == STEPS, name
            assert all(_close(g, w) for g, w in zip(got, want)), (rank, name, got, want)
            synced = fsdp[rank]["logged"][name]
            assert all(_close(g, w) for g, w in zip(synced, ddp[rank]["logged"][name])), (rank, name)
    # the label-dependent penalty differs between the ranks: its averaged gradient is really exercised
    assert ddp[0]["raw"]["mhe_labels/penalty"] != pytest.approx(ddp[1]["raw"]["mhe_labels/penalty"], rel=1e-4)
    _assert_same_weights(fsdp, ddp[0]["params"])
    # CoMHE's random projections: the same draws on every rank and as under DDP
    for rank in (0, 1):
        state, ref = fsdp[rank]["states"], ddp[0]["states"]
        assert state.keys() == ref.keys()
        key = next(k for k in state if k.startswith("CoMHERegularizer"))
        for dim, draw in ref[key]["drawn"].items():
            assert torch.equal(state[key]["drawn"][dim], draw), dim


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_fsdp2_energy_drops_and_selection_printed_on_rank_zero(runs):
    for layer in ("fc1", "fc2", "out"):
        energy = runs.fsdp[0]["raw"][f"monitor/energy/{layer}"]
        assert energy[-1] < energy[0] - 1e-3, (layer, energy)
    table = runs.printed[0]
    heads = [line for line in table.splitlines() if "neuron group(s)" in line]
    assert sum(line.startswith("MHERegularizer: 3 neuron group(s), output layer 'out'") for line in heads) == 2
    assert sum(line.startswith("CoMHERegularizer: 3 neuron group(s)") for line in heads) == 1
    assert "fc2   hidden  15  16" in table  # the global shape, not a shard's (8 rows)
    assert "EnergyMonitor: 3 neuron group(s)" in table
    assert "neuron group" not in runs.printed[1]


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_ring_energy_and_resume_from_distributed_checkpoint(runs):
    """The ring run resumed at step 2 from the distributed checkpoint: its steps 3-4 equal the uninterrupted
    (gathered, mode="loss") run's, and the callbacks' state was restored (EnergyMonitor's batch count, CoMHE's
    drawn projections)."""
    ring, fsdp = runs.ring, runs.fsdp
    assert ring[0]["global_step"] == STEPS
    _assert_same_weights(ring, fsdp[0]["params"])
    for rank in (0, 1):
        for name, values in fsdp[rank]["raw"].items():
            got = ring[rank]["raw"][name]
            assert len(got) == STEPS - SAVE_AT, name
            assert all(_close(g, w) for g, w in zip(got, values[SAVE_AT:])), (rank, name, got, values[SAVE_AT:])

        states, ref = ring[rank]["states"], fsdp[rank]["states"]
        assert states.keys() == ref.keys()
        monitor = next(k for k in ref if k.startswith("EnergyMonitor"))
        assert states[monitor] == ref[monitor] == {"batches": STEPS}
        comhe = next(k for k in ref if k.startswith("CoMHERegularizer"))
        assert states[comhe]["drawn_period"] == ref[comhe]["drawn_period"]
        for dim, draw in ref[comhe]["drawn"].items():
            assert torch.equal(states[comhe]["drawn"][dim], draw), dim


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_other_families_on_fsdp2_equal_ddp(tmp_path):
    """The other callback families on one sharded model (fsdp_worker.mixed): an S-OPT layer converted before
    sharding (OrthogonalRegularizer, SOPTResampler, OrthogonalityMonitor: the rotation from the gathered P,
    V re-drawn from it), a decoupled layer (SphereOrthogonalityRegularizer, WeightProjection,
    WeightedGradients) and a DH2L hierarchical head with a computed weight (HierarchicalRegularizer, each
    rank's own label pairs). Logs, weights, OPT buffers and callback states equal DDP's."""
    ddp = _run(tmp_path / "ddp", "--strategy", "ddp", "--family", "mixed")
    fsdp = _run(tmp_path / "fsdp", "--strategy", "fsdp", "--family", "mixed")
    assert {"fc1.parametrizations.weight.original", "out.surface", "fc2.weight"} <= set(fsdp[0]["weight_types"])
    assert set(fsdp[0]["weight_types"].values()) == {"DTensor"}
    prefixes = {name.split("/")[0] for name in ddp[0]["raw"]}
    assert prefixes == {"dh2l", "orthogonal", "orthogonality", "sphere_orth"}, prefixes
    for rank in (0, 1):
        assert fsdp[rank]["raw"].keys() == ddp[rank]["raw"].keys()
        for name, want in ddp[rank]["raw"].items():
            got = fsdp[rank]["raw"][name]
            assert len(got) == STEPS and all(_close(g, w) for g, w in zip(got, want)), (rank, name, got, want)
        for name, buf in ddp[0]["buffers"].items():  # OPT's V and S-OPT indices, re-drawn twice
            torch.testing.assert_close(fsdp[rank]["buffers"][name], buf, rtol=1e-5, atol=1e-6, msg=name)
        assert fsdp[rank]["states"] == ddp[0]["states"]
    assert ddp[0]["states"]["SOPTResampler"]["episodes"] == ddp[0]["states"]["WeightProjection"]["num_projections"] == 2
    assert ddp[0]["raw"]["dh2l/penalty"] != pytest.approx(ddp[1]["raw"]["dh2l/penalty"], rel=1e-4)  # own labels
    _assert_same_weights(fsdp, ddp[0]["params"])


# ------------------------------------------------------------------ which strategies are refused (no spawn)
def _strategy(name: str):
    from lightning.pytorch import strategies

    cls = getattr(strategies, name)
    return cls.__new__(cls)  # DeepSpeedStrategy() itself needs deepspeed installed: isinstance is what counts


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "FSDPStrategy"])
def test_deepspeed_and_fsdp1_are_refused_by_type(name):
    for cb in (MHERegularizer(), CoMHERegularizer(), EnergyMonitor()):
        with pytest.raises(RuntimeError) as err:
            check_strategy(types.SimpleNamespace(strategy=_strategy(name)), type(cb).__name__)
        msg = str(err.value)
        assert name in msg and "ModelParallelStrategy" in msg and "'ddp'" in msg and type(cb).__name__ in msg


def test_supported_strategies_pass_and_names_do_not_matter():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    for strategy in (ModelParallelStrategy(), DDPStrategy(), None):
        check_strategy(types.SimpleNamespace(strategy=strategy), "MHERegularizer")
    # a user's strategy whose class name merely contains "FSDP" / "DeepSpeed" is not refused
    for name in ("MyFSDPLikeStrategy", "DeepSpeedishStrategy"):
        check_strategy(types.SimpleNamespace(strategy=type(name, (DDPStrategy,), {})()), "MHERegularizer")


def test_sharded_energy_argument_is_checked():
    with pytest.raises(ValueError, match=r"MHERegularizer: sharded_energy='all' is not supported; accepted values: "
                                         r"'gather', 'ring', 'auto'"):
        MHERegularizer(sharded_energy="all")
    with pytest.raises(ValueError, match="EnergyMonitor: sharded_energy='x'"):
        EnergyMonitor(sharded_energy="x")


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_cli_energy_reads_a_distributed_checkpoint(runs, capsys):
    """``lightning-hyper energy`` on the folder ModelParallelStrategy wrote at step 2: the consolidated weights'
    energies (float64) equal what EnergyMonitor logged after that step."""
    from lightning_hyper.cli import checkpoint_energies, energy_main

    result = checkpoint_energies(str(runs.ckpt))
    got = {row["layer"]: row for row in result["layers"]}
    assert set(got) == {"fc1", "fc2", "out"} and (got["fc2"]["neurons"], got["fc2"]["dim"]) == (15, 16)
    for layer, row in got.items():
        assert row["energy"] == pytest.approx(runs.fsdp[0]["raw"][f"monitor/energy/{layer}"][SAVE_AT - 1], rel=1e-6)
    assert energy_main([str(runs.ckpt), "--format", "csv"]) in (0, None)
    assert "fc2,-,15,16," in capsys.readouterr().out
