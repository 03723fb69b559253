"""torch.nn modules (no Lightning imports)."""
from lightning_hyper.nn.registry import HEADS, build_head, register_head

__all__ = ["HEADS", "build_head", "register_head"]
