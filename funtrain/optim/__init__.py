"""Optimizers as pure ``Optimizer(init_state, update)`` pairs, written from scratch.

- ``base``: the protocol, ``chain``, ``apply_updates``, ``global_norm``, ``state_bytes``;
- ``transforms``: building blocks (``scale_by_adam``, ``trace``, ``clip_by_global_norm`` ...);
- ``optimizers``: ``sgd`` ... ``muon``, each a short chain of blocks;
- ``schedules``: learning-rate schedules ``step -> value``;
- ``fused``: params packed into one buffer per group (``fuse``, ``FlatParams``), so
  element-wise rules run once per buffer;
- ``wrappers``: ``masked``, ``partition``, ``freeze``, ``multi_steps``, ``apply_if_finite``,
  ``inject_hyperparams``, ``ema``.

A block's signature declares each hyperparameter's domain, checked when the block is built:
``Real`` (a finite float), ``NonNegative`` (``>= 0``), ``Positive`` (``> 0``),
``Fraction`` (``[0, 1]``), ``Beta`` (``[0, 1)``), ``Count`` (an int ``>= 1``), the
``...OrSchedule`` forms (a float, or a schedule whose value at step 0 is in the domain), and
``Literal`` choices. An array passes unchecked (``inject_hyperparams`` injects them).
"""

from funtrain.optim import schedules
from funtrain.optim.base import (
    EmptyState,
    Optimizer,
    apply_updates,
    chain,
    global_norm,
    identity,
    is_optimizer,
    state_bytes,
)
from funtrain.optim.fused import FlatParams, fuse, fuse_like, leafwise, unfuse
from funtrain.optim.optimizers import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    amsgrad,
    lamb,
    lars,
    lion,
    muon,
    nadam,
    radam,
    rmsprop,
    schedule_free_adamw,
    schedule_free_eval_params,
    sgd,
)
from funtrain.optim.transforms import (
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    labels_to_mask,
    newton_schulz,
    scale,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_adamax,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_muon,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    scale_by_trust_ratio,
    trace,
)
from funtrain.optim.wrappers import (
    ApplyIfFiniteState,
    EmaState,
    InjectHyperparamsState,
    MaskedNode,
    MaskedState,
    MultiStepsState,
    PartitionState,
    apply_if_finite,
    ema,
    ema_params,
    freeze,
    inject_hyperparams,
    injected_hyperparams,
    masked,
    multi_steps,
    partition,
)

OPTIMIZERS = {
    "sgd": sgd, "rmsprop": rmsprop, "adagrad": adagrad, "adadelta": adadelta, "adam": adam,
    "adamw": adamw, "amsgrad": amsgrad, "adamax": adamax, "nadam": nadam, "radam": radam,
    "lion": lion, "lamb": lamb, "lars": lars, "adafactor": adafactor,
    "schedule_free_adamw": schedule_free_adamw, "muon": muon,
}
"""Every optimizer factory by name (the demo's ``--optimizer`` choices)."""

__all__ = [
    "Optimizer", "EmptyState", "apply_updates", "chain", "identity", "is_optimizer", "global_norm",
    "state_bytes", "FlatParams", "fuse", "unfuse", "fuse_like", "leafwise",
    "scale", "scale_by_learning_rate", "trace", "add_decayed_weights", "labels_to_mask", "clip",
    "clip_by_global_norm", "scale_by_rms", "scale_by_rss", "scale_by_adadelta", "scale_by_adam",
    "scale_by_adamax", "scale_by_nadam", "scale_by_radam", "scale_by_lion",
    "scale_by_muon",
    "scale_by_trust_ratio", "scale_by_factored_rms",
    "sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw", "amsgrad", "adamax", "nadam",
    "radam", "lion", "lamb", "lars", "adafactor", "schedule_free_adamw",
    "schedule_free_eval_params", "muon", "newton_schulz", "OPTIMIZERS",
    "masked", "partition", "freeze", "multi_steps", "apply_if_finite", "inject_hyperparams",
    "injected_hyperparams",
    "ema", "ema_params", "EmaState",
    "MaskedState", "MaskedNode", "PartitionState", "MultiStepsState", "ApplyIfFiniteState",
    "InjectHyperparamsState",
    "schedules",
]
