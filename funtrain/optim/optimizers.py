"""Optimizers: short chains of the building blocks in ``transforms``."""

from __future__ import annotations

from funtrain._typing import ScalarOrSchedule
from funtrain.optim._checks import check_scalar
from funtrain.optim.base import Optimizer, chain
from funtrain.optim.schedules import as_schedule
from funtrain.optim.transforms import add_decayed_weights, scale_by_learning_rate, trace


def sgd(learning_rate: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, dampening: float = 0.0) -> Optimizer:
    r"""Stochastic gradient descent (Robbins & Monro, 1951) with optional momentum.

    PyTorch's ``torch.optim.SGD`` convention, which is also the seed chapter's:

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled weight decay)} \\
        v_1 &= g_1, \quad v_t = \mu v_{t-1} + (1 - \tau) g_t \\
        d_t &= v_t \ \text{or, with Nesterov,}\ g_t + \mu v_t \\
        \theta_t &= \theta_{t-1} - \eta_t d_t

    With ``momentum=0`` it is plain SGD, :math:`\theta_t = \theta_{t-1} - \eta_t g_t`.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule ``step -> lr`` (first step uses
        ``schedule(0)``).
      momentum: :math:`\mu \ge 0` (Polyak's heavy ball, 1964).
      nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
      weight_decay: :math:`\lambda \ge 0`, added to the gradient (L2), as PyTorch.
      dampening: :math:`\tau \in [0, 1]`.

    Example:
      >>> from funtrain import optim
      >>> opt = optim.sgd(0.05, momentum=0.9)
    """
    where = "sgd"
    as_schedule(learning_rate, where)
    check_scalar(where, "momentum", momentum, low=0.0)
    check_scalar(where, "weight_decay", weight_decay, low=0.0)
    check_scalar(where, "dampening", dampening, low=0.0, high=1.0)
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(f"sgd: nesterov=True needs momentum > 0 and dampening == 0, got "
                         f"momentum={momentum}, dampening={dampening}")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
