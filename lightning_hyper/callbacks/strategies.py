"""Which Lightning strategies the callbacks support, decided with ``isinstance`` (docs/distributed.md).

* Supported: one device, DDP (``"ddp"``, ``"ddp_spawn"``, ``"ddp_find_unused_parameters_true"``, any
  ``DDPStrategy``) and FSDP2 through :class:`~lightning.pytorch.strategies.ModelParallelStrategy`
  (``fully_shard`` in ``configure_model``): there every weight is a ``DTensor`` and the callbacks read one
  layer's full weight at a time (or its row shards, ``sharded_energy="ring"``).
* Refused before training: ``DeepSpeedStrategy`` (ZeRO flattens and partitions parameters outside
  ``DTensor``; it subclasses ``DDPStrategy``, so it is tested first) and ``FSDPStrategy`` (FSDP1's flat
  parameters; GPU-only in Lightning). The classes are imported under guards: a Lightning without them, or
  a ``DeepSpeedStrategy`` class without deepspeed installed, is fine.
"""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["SUPPORTED_STRATEGIES", "is_model_parallel", "unsupported_strategy", "has_sharded_parameters"]

SUPPORTED_STRATEGIES = ("single device ('auto'), 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', and "
                        "ModelParallelStrategy (FSDP2: fully_shard in configure_model)")


def _classes(name: str) -> tuple[type, ...]:
    """``lightning.pytorch.strategies.<name>`` (and ``pytorch_lightning``'s, if that package is in use)."""
    found = []
    for package in ("lightning.pytorch.strategies", "pytorch_lightning.strategies"):
        if package.startswith("pytorch_lightning") and "pytorch_lightning" not in sys.modules:
            continue
        try:
            module = __import__(package, fromlist=[name])
            cls = getattr(module, name, None)
        except Exception:
            cls = None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def unsupported_strategy(strategy: Any) -> str | None:
    """A short reason if ``strategy`` (a Lightning strategy instance) cannot run the callbacks, else ``None``."""
    if strategy is None:
        return None
    if isinstance(strategy, _classes("DeepSpeedStrategy")):
        return "DeepSpeed partitions flat parameters outside DTensor, so no rank can read a layer's neurons"
    if isinstance(strategy, _classes("FSDPStrategy")):
        return ("FSDP1 (FSDPStrategy) keeps flat sharded parameters; use FSDP2: ModelParallelStrategy with "
                "fully_shard in configure_model")
    return None


def is_model_parallel(strategy: Any) -> bool:
    """True for Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallelism)."""
    return strategy is not None and isinstance(strategy, _classes("ModelParallelStrategy"))


def has_sharded_parameters(module: Any) -> bool:
    """True if any parameter of ``module`` is a ``DTensor``."""
    from lightning_hyper.functional.distributed import is_dtensor

    return any(is_dtensor(p) for p in module.parameters())
