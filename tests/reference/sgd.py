"""Float64 numpy reference for SGD, written from PyTorch's documented algorithm.

torch.optim.SGD (docs, "Algorithm"):
    g_t = grad + weight_decay * theta_{t-1}
    if momentum != 0:
        b_t = g_t                                   if t == 1
        b_t = momentum * b_{t-1} + (1 - dampening) * g_t   otherwise
        g_t = g_t + momentum * b_t                   if nesterov
        g_t = b_t                                    otherwise
    theta_t = theta_{t-1} - lr_t * g_t

With a scheduler (OneCycleLR with cycle_momentum=True) the momentum of step t is whatever
the scheduler set in param_groups before it; here ``momentum(t)``, t from 0. The test
``momentum != 0`` is the step's own (torch.optim.SGD's source): a step with momentum 0
neither creates nor moves the buffer, and the first nonzero one creates it as b = g_t.
"""

import numpy as np


def sgd_trajectory(theta0, grad_fn, steps, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                   dampening=0.0):
    """Return [theta_0, theta_1, ..., theta_steps]; ``lr`` and ``momentum`` are floats or
    schedules ``t -> value`` (t from 0)."""
    theta = np.array(theta0, dtype=np.float64)
    buf = None
    out = [theta.copy()]
    for t in range(steps):
        g = np.asarray(grad_fn(theta), dtype=np.float64)
        if weight_decay:
            g = g + weight_decay * theta
        mu = float(momentum(t)) if callable(momentum) else momentum
        if mu != 0:
            buf = g.copy() if buf is None else mu * buf + (1 - dampening) * g
            g = g + mu * buf if nesterov else buf
        rate = lr(t) if callable(lr) else lr
        theta = theta - rate * g
        out.append(theta.copy())
    return out
