"""Optimizers: short chains of the building blocks in ``transforms``."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from funtrain._typing import Params, ScalarOrSchedule
from funtrain.optim._checks import (
    NonNegative,
    check_scalar,
    checked,
    is_traced_or_array,
    names_errors,
    naming,
)
from funtrain.optim.base import Optimizer, chain
from funtrain.optim.schedules import value_at
from funtrain.optim.transforms import (
    AmsgradConvention,
    BiasCorrection,
    ScheduleFreeState,
    add_decayed_weights,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_adamax,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_muon,
    scale_by_nadam,
    scale_by_radam,
    scale_by_relative_step,
    scale_by_rms,
    scale_by_rss,
    scale_by_schedule_free,
    scale_by_trust_ratio,
    trace,
)
from funtrain.optim.wrappers import partition


def _nonzero(value: Any) -> bool:
    """Whether an optional block is needed; arrays (e.g. injected hyperparameters) and
    schedules count."""
    return callable(value) or is_traced_or_array(value) or bool(value)


@names_errors(trace={"decay": "momentum"})
def sgd(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0, dampening: float = 0.0
        ) -> Optimizer:
    r"""Stochastic gradient descent (Robbins & Monro, 1951) with optional momentum.

    PyTorch's ``torch.optim.SGD`` convention, which is also the seed chapter's:

    .. math::
        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad \text{(coupled weight decay)} \\
        v_1 &= g_1, \quad v_t = \mu_t v_{t-1} + (1 - \tau) g_t \\
        d_t &= v_t \ \text{or, with Nesterov,}\ g_t + \mu_t v_t \\
        \theta_t &= \theta_{t-1} - \eta_t d_t

    With ``momentum=0`` it is plain SGD, :math:`\theta_t = \theta_{t-1} - \eta_t g_t`.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule ``step -> lr`` (first step uses
        ``schedule(0)``).
      momentum: :math:`\mu \ge 0` (Polyak's heavy ball, 1964), a float or a schedule
        ``step -> momentum`` that counts like the learning rate's (update :math:`t` uses
        ``schedule(t - 1)``), e.g. ``schedules.one_cycle_momentum`` for PyTorch's
        ``OneCycleLR``. A schedule is checked at step 0 only. A step where it is 0 leaves
        :math:`v` as it is and steps with :math:`g_t`, as PyTorch (see ``trace``).
      nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (with a
        schedule momentum, ``dampening == 0``).
      weight_decay: :math:`\lambda \ge 0`, added to the gradient (L2), as PyTorch.
      dampening: :math:`\tau \in [0, 1]`.

    Examples:
      >>> from funtrain import optim
      >>> opt = optim.sgd(0.05, momentum=0.9)
      >>> n = 1000  # updates in the run: PyTorch's OneCycleLR(opt, 0.1, total_steps=n)
      >>> opt = optim.sgd(optim.schedules.one_cycle(0.1, n),
      ...                 momentum=optim.schedules.one_cycle_momentum(n))
    """
    if not _nonzero(momentum):  # dampening matters only with momentum (then trace checks it)
        check_scalar("sgd", "dampening", dampening, low=0.0, high=1.0)
    parts = []
    if _nonzero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    if _nonzero(momentum) or nesterov:  # trace checks nesterov against the momentum
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def _weight_decay(weight_decay: Any, mask: Any = None) -> list[Optimizer]:
    """The weight-decay block, when there is a decay (``add_decayed_weights`` checks it)."""
    return [add_decayed_weights(weight_decay, mask)] if _nonzero(weight_decay) else []


@names_errors(scale_by_rms={"decay": "alpha"}, trace={"decay": "momentum"})
def rmsprop(learning_rate: ScalarOrSchedule = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
            weight_decay: float = 0.0, momentum: ScalarOrSchedule = 0.0,
            centered: bool = False, *,
            eps_in_sqrt: bool = False) -> Optimizer:
    r"""RMSProp (Hinton, 2012), PyTorch's ``torch.optim.RMSprop`` by default.

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2, \quad
        \tilde v_t = v_t - \bar g_t^2 \ (\text{centered}), \\
        d_t &= g_t / (\sqrt{\tilde v_t} + \epsilon) \ \text{(PyTorch)} \quad\text{or}\quad
        g_t / \sqrt{\tilde v_t + \epsilon} \ (\texttt{eps\_in\_sqrt=True}, \text{optax}), \\
        b_t &= \mu_t b_{t-1} + d_t \ (\text{if } \mu > 0), \quad \theta_t = \theta_{t-1} - \eta b_t

    ``momentum`` is a float or a schedule ``step -> momentum`` (as ``sgd``'s; PyTorch's
    ``OneCycleLR`` cycles it with ``schedules.one_cycle_momentum``).
    """
    return chain(*_weight_decay(weight_decay),
                 scale_by_rms(alpha, eps, eps_in_sqrt=eps_in_sqrt, centered=centered),
                 *([trace(momentum)] if _nonzero(momentum) else []),
                 scale_by_learning_rate(learning_rate))


@names_errors()
@checked
def adagrad(learning_rate: ScalarOrSchedule = 1e-2, lr_decay: NonNegative = 0.0,
            weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
            eps: float = 1e-10, *, eps_in_sqrt: bool = False) -> Optimizer:
    r"""Adagrad (Duchi et al., 2011), PyTorch's ``torch.optim.Adagrad`` by default.

    .. math::
        \eta_t = \frac{\eta}{1 + (t-1)\,\text{lr\_decay}}, \quad g_t \leftarrow g_t + \lambda
        \theta_{t-1}, \quad s_t = s_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \eta_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    The optax convention is ``initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True``
    (:math:`g_t / \sqrt{s_t + \epsilon}`).
    """
    lr = learning_rate
    if _nonzero(lr_decay):
        def lr(step: Any) -> Any:  # the decayed schedule, checked at step 0 with the lr
            return value_at(learning_rate, step) / (1.0 + step * lr_decay)

    return chain(*_weight_decay(weight_decay),
                 scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=eps_in_sqrt),
                 scale_by_learning_rate(lr))


@names_errors()
def adadelta(learning_rate: ScalarOrSchedule = 1.0, rho: float = 0.9, eps: float = 1e-6,
             weight_decay: float = 0.0) -> Optimizer:
    r"""Adadelta (Zeiler, 2012), as ``torch.optim.Adadelta``.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
        \Delta_t = \frac{\sqrt{u_{t-1}+\epsilon}}{\sqrt{v_t+\epsilon}} g_t, \quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2, \quad \theta_t = \theta_{t-1} - \eta \Delta_t
    """
    return chain(*_weight_decay(weight_decay), scale_by_adadelta(rho, eps),
                 scale_by_learning_rate(learning_rate))


@names_errors()
def adam(learning_rate: ScalarOrSchedule = 1e-3, b1: ScalarOrSchedule = 0.9,
         b2: ScalarOrSchedule = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0,
         weight_decay: float = 0.0, amsgrad: bool = False,
         amsgrad_convention: AmsgradConvention = "pytorch",
         bias_correction: BiasCorrection = "pytorch", mu_dtype: Any = None, nu_dtype: Any = None
         ) -> Optimizer:
    r"""Adam (Kingma & Ba, 2014), as ``torch.optim.Adam``: eps outside the square root.

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \ (\text{coupled L2, PyTorch's weight\_decay}),\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2)g_t^2,\\
        \theta_t &= \theta_{t-1} - \eta_t \frac{m_t/(1-\beta_1^t)}
                   {\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    ``amsgrad=True`` keeps the running max of the second moment (see ``scale_by_adam`` for
    the PyTorch and optax conventions). ``mu_dtype``/``nu_dtype`` store the moments in
    another dtype (e.g. bf16) to save memory.

    ``b1`` and ``b2`` are floats or schedules ``step -> beta`` (checked at step 0), so
    ``OneCycleLR``'s cycled ``betas[0]`` is ``b1=schedules.one_cycle_momentum(n)``. A
    scheduled :math:`\beta_t` replaces :math:`\beta` in the moments, and
    ``bias_correction`` picks the correction: ``"pytorch"`` (default, as
    ``torch.optim.Adam``) :math:`1-\beta_t^{\,t}` with the current beta, or ``"product"``
    :math:`1-\prod_{s\le t}\beta_s`, the exact one (see ``scale_by_adam``). For float
    betas the two are the same.

    Examples:
      >>> from funtrain import optim
      >>> opt = optim.adam(3e-4)
      >>> n = 1000  # updates in the run: PyTorch's OneCycleLR(opt, 1e-3, total_steps=n)
      >>> opt = optim.adam(optim.schedules.one_cycle(1e-3, n),
      ...                  b1=optim.schedules.one_cycle_momentum(n))
    """
    return chain(*_weight_decay(weight_decay),
                 scale_by_adam(b1, b2, eps, eps_root, amsgrad=amsgrad,
                               amsgrad_convention=amsgrad_convention,
                               bias_correction=bias_correction, mu_dtype=mu_dtype,
                               nu_dtype=nu_dtype),
                 scale_by_learning_rate(learning_rate))


@names_errors()
def adamw(learning_rate: ScalarOrSchedule = 1e-3, b1: ScalarOrSchedule = 0.9,
          b2: ScalarOrSchedule = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
          mask: Any = None, *, eps_root: float = 0.0, amsgrad: bool = False,
          amsgrad_convention: AmsgradConvention = "pytorch",
          bias_correction: BiasCorrection = "pytorch",
          mu_dtype: Any = None, nu_dtype: Any = None) -> Optimizer:
    r"""AdamW (Loshchilov & Hutter, 2017): Adam with decoupled weight decay, as PyTorch.

    .. math:: \theta_t = \theta_{t-1}(1 - \eta_t\lambda) - \eta_t \frac{\hat m_t}{\sqrt{\hat v_t}
              + \epsilon}

    Args:
      b1, b2: floats or schedules ``step -> beta``, as in ``adam`` (PyTorch's
        ``OneCycleLR`` cycles ``b1``: ``schedules.one_cycle_momentum``).
      mask: pytree of bools (or ``params -> tree``): decay only the ``True`` leaves,
        e.g. ``optim.labels_to_mask(lambda path, p: p.ndim > 1)`` to skip biases and norms.
      bias_correction: ``"pytorch"`` (default) or ``"product"``, for scheduled betas; see
        ``adam``.
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root, amsgrad=amsgrad,
                               amsgrad_convention=amsgrad_convention,
                               bias_correction=bias_correction, mu_dtype=mu_dtype,
                               nu_dtype=nu_dtype),
                 *_weight_decay(weight_decay, mask), scale_by_learning_rate(learning_rate))


@names_errors(scale_by_adam={"amsgrad_convention": "convention"})
def amsgrad(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, weight_decay: float = 0.0, *,
            convention: AmsgradConvention = "pytorch") -> Optimizer:
    r"""AMSGrad (Reddi et al., 2018): Adam with a non-decreasing second moment.

    PyTorch (default, ``Adam(amsgrad=True)``): :math:`\hat v^{max}_t = \max(v^{max}_{t-1}, v_t)
    / (1-\beta_2^t)`; optax: :math:`v^{max}_t = \max(v^{max}_{t-1}, \hat v_t)`.
    """
    return adam(learning_rate, b1, b2, eps, weight_decay=weight_decay, amsgrad=True,
                amsgrad_convention=convention)


@names_errors()
def adamax(learning_rate: ScalarOrSchedule = 2e-3, b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    r"""AdaMax (Kingma & Ba, 2014), as ``torch.optim.Adamax`` (optax computes the same).

    .. math:: u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
              \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\frac{m_t}{u_t}
    """
    return chain(*_weight_decay(weight_decay), scale_by_adamax(b1, b2, eps),
                 scale_by_learning_rate(learning_rate))


@names_errors()
@checked
def nadam(learning_rate: ScalarOrSchedule = 2e-3, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3, *,
          convention: Literal["pytorch", "optax"] = "pytorch") -> Optimizer:
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum.

    ``convention="pytorch"`` (default, ``torch.optim.NAdam``) uses Dozat's momentum schedule
    :math:`\mu_t = \beta_1(1 - \frac12 0.96^{t\psi})` (see ``scale_by_nadam``).
    ``convention="optax"`` has no schedule: :math:`\hat m_t = \frac{\beta_1 m_t}
    {1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}`, then
    :math:`\theta_t = \theta_{t-1} - \eta\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)`.
    """
    direction = (scale_by_nadam(b1, b2, eps, momentum_decay) if convention == "pytorch"
                 else scale_by_adam(b1, b2, eps, nesterov=True))
    return chain(*_weight_decay(weight_decay), direction, scale_by_learning_rate(learning_rate))


@names_errors()
def radam(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    r"""RAdam (Liu et al., 2020), as ``torch.optim.RAdam``: Adam whose adaptive term is
    switched on, with a variance rectification :math:`r_t`, once :math:`\rho_t > 5`.

    .. math:: \theta_t = \theta_{t-1} - \eta\,\hat m_t \cdot
              \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5\\
              1 & \text{otherwise} \end{cases}
    """
    return chain(*_weight_decay(weight_decay), scale_by_radam(b1, b2, eps),
                 scale_by_learning_rate(learning_rate))


@names_errors()
def lion(learning_rate: ScalarOrSchedule = 1e-4, b1: float = 0.9, b2: float = 0.99,
         weight_decay: float = 0.0, mask: Any = None, *, mu_dtype: Any = None) -> Optimizer:
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math:: \theta_t = \theta_{t-1} - \eta\big(\operatorname{sign}(\beta_1 m_{t-1} +
              (1-\beta_1) g_t) + \lambda\theta_{t-1}\big), \quad
              m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than for AdamW.
    """
    return chain(scale_by_lion(b1, b2, mu_dtype), *_weight_decay(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


@names_errors()
def lamb(learning_rate: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, weight_decay: float = 0.0, mask: Any = None, *,
         eps_root: float = 0.0) -> Optimizer:
    r"""LAMB (You et al., 2019): Adam direction plus weight decay, scaled per layer.

    .. math::
        r_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda\theta_{t-1},
        \quad \theta_t = \theta_{t-1} - \eta \frac{\lVert\theta_{t-1}\rVert}{\lVert r_t\rVert} r_t

    The paper and optax put eps outside the root (``eps_root=0``, default); to put it
    inside, as some implementations do, pass ``eps=0, eps_root=1e-6``.
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root), *_weight_decay(weight_decay, mask),
                 scale_by_trust_ratio(), scale_by_learning_rate(learning_rate))


@names_errors(trace={"decay": "momentum"})
def lars(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule = 0.9,
         weight_decay: float = 0.0,
         trust_coefficient: float = 0.001, eps: float = 0.0, nesterov: bool = False,
         mask: Any = None) -> Optimizer:
    r"""LARS (You et al., 2017): momentum SGD with a layer-wise trust ratio.

    .. math::
        u_t = g_t + \lambda\theta_{t-1}, \quad
        u_t \leftarrow \eta\,\frac{c\,\lVert\theta_{t-1}\rVert}{\lVert u_t\rVert + \epsilon}\,u_t,
        \quad v_t = \mu v_{t-1} + u_t, \quad \theta_t = \theta_{t-1} - v_t

    (``nesterov``: :math:`\theta_t = \theta_{t-1} - (u_t + \mu v_t)`). This is the optax
    form; the paper's denominator is :math:`\lVert g\rVert + \lambda\lVert\theta\rVert`.
    ``momentum`` is a float or a schedule ``step -> momentum`` (as ``sgd``'s).
    """
    return chain(*_weight_decay(weight_decay, mask),
                 scale_by_trust_ratio(trust_coefficient, eps),
                 scale_by_learning_rate(learning_rate),
                 *([trace(momentum, nesterov=nesterov)] if _nonzero(momentum) else []))


@names_errors(scale_by_factored_rms={"eps": "eps[0]"}, scale_by_relative_step={"eps2": "eps[1]"})
def adafactor(learning_rate: ScalarOrSchedule = 1e-2, beta2_decay: float = -0.8,
              eps: tuple[float | None, float] = (None, 1e-3), clipping_threshold: float = 1.0,
              weight_decay: float = 0.0) -> Optimizer:
    r"""Adafactor (Shazeer & Stern, 2018), as ``torch.optim.Adafactor``.

    Memory-light: a >= 2-D leaf of shape ``(..., n, m)`` keeps ``n + m`` second-moment
    numbers instead of ``n m``, and there is no first moment.

    .. math::
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\min(\eta, 1/\sqrt t), \quad
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \alpha_t \hat U_t

    with :math:`\hat U_t` from ``scale_by_factored_rms``.

    Args:
      eps: ``(eps1, eps2)``; ``eps1=None`` uses each leaf's dtype epsilon.
      clipping_threshold: :math:`d`, the update-RMS clipping threshold.
    """
    if not (isinstance(eps, tuple) and len(eps) == 2):
        raise ValueError(f"adafactor: eps must be a pair (eps1 or None, eps2), got {eps!r}")
    return chain(scale_by_factored_rms(beta2_decay, eps[0], clipping_threshold),
                 scale_by_relative_step(learning_rate, eps[1], weight_decay))


# --------------------------------------------------------------------------- schedule-free


@names_errors(scale_by_schedule_free={})
def schedule_free_adamw(learning_rate: float = 0.0025, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0,
                        *, weight_lr_power: float = 2.0, mask: Any = None,
                        convention: Literal["paper", "optax", "schedulefree"] = "paper"
                        ) -> Optimizer:
    r"""Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled", Algorithm 1).

    No learning-rate schedule is needed: the params held (:math:`y`) interpolate between
    a base AdamW iterate :math:`z` and its weighted average :math:`x`, which is the point
    to *evaluate* at (``schedule_free_eval_params``). With ``convention="paper"`` (the
    default: Algorithm 1 as written, and the authors' ``schedulefree.AdamWScheduleFreePaper``):

    .. math::
        \gamma_t &= \eta \min(1, t/T_w) \sqrt{1-\beta_2^t}, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \
        z_{t+1} &= z_t - \gamma_t\Big(\frac{g(y_t)}{\sqrt{v_t} + \epsilon} + \lambda y_t\Big),
        \quad c_{t+1} = \frac{\gamma_{\max,t}^{p}}{\sum_{i\le t}\gamma_{\max,i}^{p}}, \
        x_{t+1} &= (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \quad
        y_{t+1} = \beta_1 x_{t+1} + (1-\beta_1) z_{t+1}

    ``convention="optax"`` reproduces optax's ``schedule_free_adamw``: no
    :math:`\sqrt{1-\beta_2^t}` in :math:`\gamma_t`, the bias-corrected :math:`\hat v_t` in the
    denominator, and the z step's warmup one step behind the weights' (:math:`(t-1)/T_w`).
    ``convention="schedulefree"`` is what most users of the authors' package run,
    ``schedulefree.AdamWScheduleFree`` (and its ``AdamWScheduleFreeReference``, version
    1.4): optax's step with the z step's warmup at :math:`t/T_w`, as the weights'. Without
    warmup it equals ``"optax"``; early in a run it differs from ``"paper"`` by the averaging
    weights, which :math:`\sqrt{1-\beta_2^t}` makes grow with :math:`t`.
    """
    return scale_by_schedule_free(learning_rate, b1, b2, eps, weight_decay, warmup_steps,
                                  weight_lr_power=weight_lr_power, mask=mask,
                                  convention=convention)


def schedule_free_eval_params(state: Any, params: Params | None = None) -> Params:
    r"""The params to evaluate a schedule-free run at: :math:`x = (y - (1-\beta_1) z)/\beta_1`.

    ``state`` is the optimizer state of ``schedule_free_adamw`` (it may sit anywhere inside
    a ``chain``'s state tuple) with ``params`` the current params, or a whole ``TrainState``
    alone, so ``fit(eval_params=optim.schedule_free_eval_params)`` evaluates at ``x``.
    """
    if params is None and hasattr(state, "opt_state") and hasattr(state, "params"):
        state, params = state.opt_state, state.params
    if params is None:
        raise TypeError("schedule_free_eval_params: pass (opt_state, params), or a "
                        "TrainState alone")
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, ScheduleFreeState))
             if isinstance(s, ScheduleFreeState)]
    if len(found) != 1:
        raise ValueError(f"schedule_free_eval_params: expected the state of one "
                         f"schedule_free_adamw, found {len(found)}")
    sf = found[0]
    return jax.tree.map(lambda y, z: ((y - (1.0 - sf.b1) * z) / sf.b1).astype(y.dtype),
                        params, sf.z)


# --------------------------------------------------------------------------- Muon


@names_errors()
def muon(learning_rate: ScalarOrSchedule = 1e-3, momentum: float = 0.95,
         weight_decay: float = 0.1, nesterov: bool = True, ns_steps: int = 5,
         eps: float = 1e-7,
         adjust_lr: Literal["original", "match_rms_adamw"] = "original", *,
         adam_learning_rate: ScalarOrSchedule = 3e-4, adam_b1: float = 0.9,
         adam_b2: float = 0.999, adam_eps: float = 1e-8, ns_dtype: Any = None) -> Optimizer:
    r"""Muon (Keller Jordan, 2024): orthogonalised momentum for 2-D weights, AdamW for the rest.

    For each 2-D leaf, as ``torch.optim.Muon`` (``scale_by_muon``):

    .. math::
        b_t = \mu b_{t-1} + (1-\mu) g_t, \quad
        u_t = (1-\mu) g_t + \mu b_t \ (\text{Nesterov}) \text{ or } b_t, \\
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,s\,\mathrm{NS}_5(u_t), \quad
        s = \sqrt{\max(1, n/m)} \ (\text{"original"}) \text{ or } 0.2\sqrt{\max(n, m)}
        \ (\text{"match\_rms\_adamw"})

    Every other leaf (biases, norms, embeddings of other rank) gets AdamW with the
    ``adam_*`` hyperparameters and the same ``weight_decay``: a ``partition`` of the two.
    ``ns_dtype`` runs Newton–Schulz in another dtype (PyTorch uses bf16; default: the
    grads' float32).
    """
    decay = _weight_decay(weight_decay)
    matrices = chain(scale_by_muon(momentum, nesterov, ns_steps, eps, adjust_lr, ns_dtype),
                     *decay, scale_by_learning_rate(learning_rate))
    with naming("muon", scale_by_adam={"b1": "adam_b1", "b2": "adam_b2", "eps": "adam_eps"},
                scale_by_learning_rate={"learning_rate": "adam_learning_rate"}):
        others = chain(scale_by_adam(adam_b1, adam_b2, adam_eps), *decay,
                       scale_by_learning_rate(adam_learning_rate))
    return partition({"muon": matrices, "adam": others},
                     lambda params: jax.tree.map(lambda p: "muon" if jnp.ndim(p) == 2
                                                 else "adam", params))
