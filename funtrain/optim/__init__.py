"""Optimizers as pure ``Optimizer(init_state, update)`` pairs, written from scratch."""

from funtrain.optim import schedules
from funtrain.optim.base import (
    EmptyState,
    Optimizer,
    apply_updates,
    chain,
    global_norm,
    identity,
)
from funtrain.optim.optimizers import sgd
from funtrain.optim.transforms import (
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    labels_to_mask,
    scale,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "Optimizer", "EmptyState", "apply_updates", "chain", "identity", "global_norm",
    "scale", "scale_by_learning_rate", "trace", "add_decayed_weights", "labels_to_mask",
    "ScaleByScheduleState", "TraceState",
    "sgd",
    "schedules",
]
