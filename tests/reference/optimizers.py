"""Float64 numpy references for funtrain's optimizers, written from the papers and the
PyTorch documentation's algorithm boxes (never from funtrain's code).

Each factory mirrors the funtrain factory of the same name (same argument names and
defaults) and returns ``(init, step)`` for ONE leaf:

- ``init(theta) -> state``: a dict of float64 arrays / floats;
- ``step(theta, g, state, t, key) -> theta``: step ``t`` counts from 1, ``key`` is the
  leaf's path ("b/w"), used for masks. ``state`` is updated in place.

``trajectory`` runs such a pair over a flat dict of leaves. A learning rate may be a float
or a schedule ``count -> lr`` whose first update uses ``schedule(0)``; so may Adam's betas
and the momentum of RMSprop and LARS (as PyTorch's ``OneCycleLR`` sets them before each
step). Masks are flat dicts ``{path: bool}``; only ``True`` leaves decay.

Sources:
- PyTorch ``torch.optim`` docs (algorithm boxes) for RMSprop, Adagrad, Adadelta, Adam,
  AdamW, Adamax, NAdam, RAdam, Adafactor and Muon;
- optax's documented conventions for ``eps_in_sqrt`` (RMSprop, Adagrad), AMSGrad on the
  bias-corrected second moment, and NAdam without a momentum schedule (Dozat 2016);
- Chen et al. 2023 (Lion), You et al. 2019 (LAMB), You et al. 2017 (LARS),
  Defazio et al. 2024 "The Road Less Scheduled", Algorithm 1 (schedule-free AdamW),
  Keller Jordan's Muon post (Newton-Schulz quintic iteration).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np

Leaves = dict[str, np.ndarray]


def _lr_at(learning_rate, t: int) -> float:
    """The learning rate of step ``t`` (1-based); schedules are called with ``t - 1``."""
    return float(learning_rate(t - 1)) if callable(learning_rate) else float(learning_rate)


def _at(value, t: int) -> float:
    """A float or scheduled hyperparameter (beta, momentum) at step ``t`` (1-based)."""
    return _lr_at(value, t)


def _decays(mask, key: str) -> bool:
    return True if mask is None else bool(mask[key])


def _zeros(theta):
    return np.zeros_like(theta, dtype=np.float64)


def trajectory(opt, params0: Leaves, grad_fn: Callable[[Leaves, int], Leaves], steps: int,
               keep_states: bool = False):
    """Run ``opt = (init, step)`` for ``steps`` steps; ``grad_fn(params, t0)`` with t0 from 0.

    Returns ``[params_0, ..., params_steps]`` (flat dicts), and with ``keep_states`` also
    ``[states_1, ..., states_steps]`` (deep copies, for schedule-free's ``x``).
    """
    init, step = opt
    params = {k: np.array(v, dtype=np.float64) for k, v in params0.items()}
    states = {k: init(v) for k, v in params.items()}
    out = [{k: v.copy() for k, v in params.items()}]
    kept = []
    for t0 in range(steps):
        grads = grad_fn(params, t0)
        params = {k: np.asarray(step(params[k], np.asarray(grads[k], np.float64), states[k],
                                     t0 + 1, k), dtype=np.float64)
                  for k in params}
        out.append({k: v.copy() for k, v in params.items()})
        if keep_states:
            kept.append(copy.deepcopy(states))
    return (out, kept) if keep_states else out


# --------------------------------------------------------------------------- RMSprop


def rmsprop(learning_rate=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False, *, eps_in_sqrt=False):
    """torch.optim.RMSprop; ``eps_in_sqrt`` puts eps inside the root (optax's convention).

    g += wd θ;  v = α v + (1-α) g²;  centered: ḡ = α ḡ + (1-α) g, ṽ = v - ḡ², else ṽ = v;
    d = g / (√ṽ + ε)  [or g / √(ṽ + ε)];  momentum: b = μ b + d, θ -= η b;  else θ -= η d.
    A scheduled momentum μ_t replaces μ (b_0 = 0, so b_1 = d_1 whatever μ_1 is); a step
    with μ_t = 0 takes θ -= η d and leaves b as it is (torch's ``if momentum > 0``).
    """

    def init(theta):
        return {"v": _zeros(theta), "g_avg": _zeros(theta), "buf": _zeros(theta)}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        if weight_decay:
            g = g + weight_decay * theta
        s["v"] = alpha * s["v"] + (1 - alpha) * g * g
        v = s["v"]
        if centered:
            s["g_avg"] = alpha * s["g_avg"] + (1 - alpha) * g
            v = v - s["g_avg"] ** 2
        d = g / np.sqrt(v + eps) if eps_in_sqrt else g / (np.sqrt(v) + eps)
        if _at(momentum, t) > 0:
            s["buf"] = _at(momentum, t) * s["buf"] + d
            d = s["buf"]
        return theta - lr * d

    return init, step


# --------------------------------------------------------------------------- Adagrad


def adagrad(learning_rate=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10, *, eps_in_sqrt=False):
    """torch.optim.Adagrad; ``eps_in_sqrt``: optax's g·rsqrt(sum + ε), 0 where sum == 0.

    η̃ = η / (1 + (t-1) lr_decay);  g += wd θ;  S += g²;  θ -= η̃ g / (√S + ε).
    """

    def init(theta):
        return {"sum": np.full_like(theta, initial_accumulator_value, dtype=np.float64)}

    def step(theta, g, s, t, key):
        clr = _lr_at(learning_rate, t) / (1 + (t - 1) * lr_decay)
        if weight_decay:
            g = g + weight_decay * theta
        s["sum"] = s["sum"] + g * g
        if eps_in_sqrt:
            safe = np.where(s["sum"] > 0, s["sum"], 1.0)
            d = np.where(s["sum"] > 0, g / np.sqrt(safe + eps), 0.0)
        else:
            d = g / (np.sqrt(s["sum"]) + eps)
        return theta - clr * d

    return init, step


# --------------------------------------------------------------------------- Adadelta


def adadelta(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
    """torch.optim.Adadelta (Zeiler 2012 with an lr).

    g += wd θ;  v = ρ v + (1-ρ) g²;  Δ = √(u + ε) / √(v + ε) · g;  u = ρ u + (1-ρ) Δ²;
    θ -= η Δ.
    """

    def init(theta):
        return {"v": _zeros(theta), "u": _zeros(theta)}

    def step(theta, g, s, t, key):
        if weight_decay:
            g = g + weight_decay * theta
        s["v"] = rho * s["v"] + (1 - rho) * g * g
        delta = np.sqrt(s["u"] + eps) / np.sqrt(s["v"] + eps) * g
        s["u"] = rho * s["u"] + (1 - rho) * delta * delta
        return theta - _lr_at(learning_rate, t) * delta

    return init, step


# --------------------------------------------------------------------------- Adam family


def _adam(learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad, amsgrad_convention,
          decoupled, mask, bias_correction="pytorch"):
    """Betas may be schedules β_t. Bias correction: "pytorch" 1 - β_tᵗ (torch.optim.Adam
    reads the current group["betas"] and computes 1 - beta1 ** step); "product"
    1 - ∏_{s≤t} β_s, the exact bias of m_t = β_t m_{t-1} + (1-β_t) g_t from m_0 = 0."""
    if amsgrad_convention not in ("pytorch", "optax"):
        raise ValueError(amsgrad_convention)
    if bias_correction not in ("pytorch", "product"):
        raise ValueError(bias_correction)

    def init(theta):
        return {"m": _zeros(theta), "v": _zeros(theta), "v_max": _zeros(theta),
                "b1_prod": 1.0, "b2_prod": 1.0}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        beta1, beta2 = _at(b1, t), _at(b2, t)
        if weight_decay and _decays(mask, key):
            if decoupled:
                theta = theta * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * theta
        s["m"] = beta1 * s["m"] + (1 - beta1) * g
        s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
        s["b1_prod"] *= beta1
        s["b2_prod"] *= beta2
        if bias_correction == "product":
            bc1, bc2 = 1 - s["b1_prod"], 1 - s["b2_prod"]
        else:
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        m_hat = s["m"] / bc1
        if not amsgrad:
            denom = np.sqrt(s["v"] / bc2 + eps_root) + eps
        elif amsgrad_convention == "pytorch":
            # max on the raw second moment, then bias-corrected (torch.optim.Adam).
            s["v_max"] = np.maximum(s["v_max"], s["v"])
            denom = np.sqrt(s["v_max"] / bc2 + eps_root) + eps
        else:
            # max on the bias-corrected second moment (optax.scale_by_amsgrad).
            s["v_max"] = np.maximum(s["v_max"], s["v"] / bc2)
            denom = np.sqrt(s["v_max"] + eps_root) + eps
        return theta - lr * m_hat / denom

    return init, step


def adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, *, eps_root=0.0, weight_decay=0.0,
         amsgrad=False, amsgrad_convention="pytorch", bias_correction="pytorch",
         mu_dtype=None, nu_dtype=None):
    """torch.optim.Adam (Kingma & Ba 2015) with coupled L2 weight decay.

    g += wd θ;  m = β₁m + (1-β₁)g;  v = β₂v + (1-β₂)g²;  m̂ = m/(1-β₁ᵗ), v̂ = v/(1-β₂ᵗ);
    θ -= η m̂ / (√(v̂ + ε_root) + ε).  AMSGrad: see ``_adam``.
    """
    del mu_dtype, nu_dtype  # float64 throughout
    return _adam(learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad,
                 amsgrad_convention, decoupled=False, mask=None,
                 bias_correction=bias_correction)


def adamw(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, *,
          eps_root=0.0, amsgrad=False, amsgrad_convention="pytorch", bias_correction="pytorch",
          mu_dtype=None, nu_dtype=None):
    """torch.optim.AdamW (Loshchilov & Hutter 2019): θ ← θ(1 - ηλ) - η m̂/(√v̂ + ε)."""
    del mu_dtype, nu_dtype
    return _adam(learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad,
                 amsgrad_convention, decoupled=True, mask=mask,
                 bias_correction=bias_correction)


def amsgrad(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
            convention="pytorch"):
    """Adam with AMSGrad (Reddi et al. 2018) in PyTorch's or optax's convention."""
    return _adam(learning_rate, b1, b2, eps, 0.0, weight_decay, True, convention,
                 decoupled=False, mask=None)


def adamax(learning_rate=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
           convention="pytorch"):
    """Adamax (Kingma & Ba 2015, §7.1).

    pytorch:  g += wd θ;  m = β₁m + (1-β₁)g;  u = max(β₂u, |g| + ε);  θ -= η/(1-β₁ᵗ) · m/u.
    "optax" (as specified for funtrain): u = max(β₂u, |g|);  θ -= η m̂ / (u + ε).
    """
    if convention not in ("pytorch", "optax"):
        raise ValueError(convention)

    def init(theta):
        return {"m": _zeros(theta), "u": _zeros(theta)}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        if weight_decay:
            g = g + weight_decay * theta
        s["m"] = b1 * s["m"] + (1 - b1) * g
        if convention == "pytorch":
            s["u"] = np.maximum(b2 * s["u"], np.abs(g) + eps)
            return theta - lr / (1 - b1 ** t) * s["m"] / s["u"]
        s["u"] = np.maximum(b2 * s["u"], np.abs(g))
        return theta - lr * (s["m"] / (1 - b1 ** t)) / (s["u"] + eps)

    return init, step


def nadam(learning_rate=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
          momentum_decay=4e-3, *, convention="pytorch"):
    """NAdam (Dozat 2016).

    pytorch (torch.optim.NAdam):  g += wd θ;  μ_t = β₁(1 - ½·0.96^{tψ}), μ_{t+1} likewise;
      Π_t = ∏_{i≤t} μ_i;  m, v as Adam;  d = √(v/(1-β₂ᵗ)) + ε;
      θ -= η(1-μ_t)/(1-Π_t) · g/d + η μ_{t+1}/(1-Π_t μ_{t+1}) · m/d.
    optax:  m̂ = β₁m/(1-β₁^{t+1}) + (1-β₁)g/(1-β₁ᵗ);  θ -= η m̂/(√v̂ + ε).
    """
    if convention not in ("pytorch", "optax"):
        raise ValueError(convention)

    def init(theta):
        return {"m": _zeros(theta), "v": _zeros(theta), "mu_product": 1.0}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        if weight_decay:
            g = g + weight_decay * theta
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        denom = np.sqrt(s["v"] / (1 - b2 ** t)) + eps
        if convention == "optax":
            m_hat = b1 * s["m"] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
            return theta - lr * m_hat / denom
        mu = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        s["mu_product"] = s["mu_product"] * mu
        prod = s["mu_product"]
        return (theta - lr * (1 - mu) / (1 - prod) * g / denom
                - lr * mu_next / (1 - prod * mu_next) * s["m"] / denom)

    return init, step


def radam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """torch.optim.RAdam (Liu et al. 2020).

    g += wd θ;  m, v as Adam;  ρ∞ = 2/(1-β₂) - 1;  ρ_t = ρ∞ - 2tβ₂ᵗ/(1-β₂ᵗ);
    if ρ_t > 5: l = √(1-β₂ᵗ)/(√v + ε), r = √((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t)),
      θ -= η m̂ r l;  else θ -= η m̂.
    """

    def init(theta):
        return {"m": _zeros(theta), "v": _zeros(theta)}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        if weight_decay:
            g = g + weight_decay * theta
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        m_hat = s["m"] / (1 - b1 ** t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        if rho_t > 5:
            adaptive = math.sqrt(1 - b2 ** t) / (np.sqrt(s["v"]) + eps)
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                             / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return theta - lr * m_hat * rect * adaptive
        return theta - lr * m_hat

    return init, step


# --------------------------------------------------------------------------- Lion, LAMB, LARS


def lion(learning_rate=1e-4, b1=0.9, b2=0.99, weight_decay=0.0, mask=None):
    """Lion (Chen et al. 2023, Algorithm 2).

    c = β₁m + (1-β₁)g;  θ -= η(sign(c) + λθ);  m = β₂m + (1-β₂)g.
    """

    def init(theta):
        return {"m": _zeros(theta)}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        d = np.sign(b1 * s["m"] + (1 - b1) * g)
        if weight_decay and _decays(mask, key):
            d = d + weight_decay * theta
        s["m"] = b2 * s["m"] + (1 - b2) * g
        return theta - lr * d

    return init, step


def _trust_ratio(pn: float, un: float, value: float) -> float:
    return 1.0 if pn == 0 or un == 0 else value


def lamb(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, mask=None, *,
         eps_root=0.0):
    """LAMB (You et al. 2019, Algorithm 2), per-leaf trust ratio.

    r = m̂/(√(v̂ + ε_root) + ε) + λθ;  θ -= η ‖θ‖/‖r‖ · r  (ratio 1 if either norm is 0).
    """

    def init(theta):
        return {"m": _zeros(theta), "v": _zeros(theta)}

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        r = (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["v"] / (1 - b2 ** t) + eps_root) + eps)
        if weight_decay and _decays(mask, key):
            r = r + weight_decay * theta
        pn, rn = float(np.linalg.norm(theta.ravel())), float(np.linalg.norm(r.ravel()))
        return theta - lr * _trust_ratio(pn, rn, pn / rn if rn else 0.0) * r

    return init, step


def lars(learning_rate, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
         nesterov=False, mask=None):
    """LARS (You et al. 2017), per-leaf trust ratio, heavy-ball momentum on the scaled step.

    u = g + λθ (only where ``mask`` is True);  u ← η · tc‖θ‖/(‖u‖ + ε) · u (ratio 1 if
    either norm is 0);  v = μv + u;  θ -= v, or with Nesterov θ -= u + μv. A scheduled
    momentum that is 0 at a step takes θ -= u and leaves v, as torch.optim.SGD's heavy ball
    does (the paper's momentum is constant).
    """

    def init(theta):
        return {"v": _zeros(theta)}

    def step(theta, g, s, t, key):
        u = g + weight_decay * theta if _decays(mask, key) else g
        pn, un = float(np.linalg.norm(theta.ravel())), float(np.linalg.norm(u.ravel()))
        ratio = _trust_ratio(pn, un, trust_coefficient * pn / (un + eps))
        u = _lr_at(learning_rate, t) * ratio * u
        mu = _at(momentum, t)
        if mu == 0:
            return theta - u
        s["v"] = mu * s["v"] + u
        return theta - (u + mu * s["v"] if nesterov else s["v"])

    return init, step


# --------------------------------------------------------------------------- Adafactor


def adafactor(learning_rate=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), clipping_threshold=1.0,
              weight_decay=0.0):
    """torch.optim.Adafactor (Shazeer & Stern 2018 as PyTorch documents it).

    β̂₂ = 1 - t^τ;  ρ_t = min(η, 1/√t);  α_t = max(ε₂, RMS(θ_{t-1})) ρ_t;  θ ← θ(1 - ηλ);
    ≥2-D (over the last two dims): R = β̂₂R + (1-β̂₂) mean_cols(G²),
      C = β̂₂C + (1-β̂₂) mean_rows(G²),  V̂ = R C / max(mean_rows(R), ε₁);
    else V̂ = β̂₂V̂ + (1-β̂₂)G²;
    U = G / max(√V̂, ε₁);  Û = U / max(1, RMS(U)/d);  θ -= α_t Û.
    ε₁ = None means the machine epsilon of the param dtype. (The docs box writes sums over
    rows/cols with max(1ᵀR, ε₁); torch's code uses means, which give the same V̂ unless the
    ε₁ clamp is active: this follows the code.)
    """
    eps1_arg, eps2 = eps

    def init(theta):
        if theta.ndim >= 2:
            return {"row": np.zeros(theta.shape[:-1] + (1,)),
                    "col": np.zeros(theta.shape[:-2] + (1, theta.shape[-1]))}
        return {"v": _zeros(theta)}

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0

    def step(theta, g, s, t, key):
        lr = _lr_at(learning_rate, t)
        eps1 = np.finfo(theta.dtype).eps if eps1_arg is None else eps1_arg
        w = float(t) ** beta2_decay  # 1 - β̂₂
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, rms(theta)) * rho
        if weight_decay:
            theta = theta * (1 - lr * weight_decay)
        g2 = g * g
        if theta.ndim >= 2:
            s["row"] = (1 - w) * s["row"] + w * np.mean(g2, axis=-1, keepdims=True)
            s["col"] = (1 - w) * s["col"] + w * np.mean(g2, axis=-2, keepdims=True)
            v_hat = (s["row"] * s["col"]) / np.maximum(
                np.mean(s["row"], axis=-2, keepdims=True), eps1)
        else:
            s["v"] = (1 - w) * s["v"] + w * g2
            v_hat = s["v"]
        u = g / np.sqrt(np.maximum(v_hat, eps1 * eps1))
        u = u / max(1.0, rms(u) / clipping_threshold)
        return theta - alpha * u

    return init, step


# --------------------------------------------------------------------------- schedule-free


def schedule_free_adamw(learning_rate=0.0025, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                        warmup_steps=0, *, convention="paper"):
    """Schedule-free AdamW (Defazio et al. 2024, Algorithm 1). Returned params are ``y``.

    y_t = (1-β₁)z_t + β₁x_t (the gradient point);  v = β₂v + (1-β₂)g²;
    paper: γ_t = η min(1, t/T_w) √(1-β₂ᵗ),  z ← z - γ_t g/(√v + ε) - γ_t λ y_t;
    c_{t+1} = γ_t² / Σ_{i≤t} γ_i²;  x ← (1-c)x + c z;  y_{t+1} = (1-β₁)z + β₁x.
    (The facebookresearch reference takes max_{i≤t} γ_i in the weights: the same for these
    increasing γ_t.)

    optax (what optax.contrib.schedule_free_adamw 0.2.8 computes): no √(1-β₂ᵗ) in γ, the
    second moment is bias-corrected instead, z ← z - γ'_t (g/(√(v/(1-β₂ᵗ)) + ε) + λ y_t),
    and the weights use γ_t = η min(1, t/T_w) while the z step uses
    γ'_t = η min(1, (t-1)/T_w): its base optimizer counts from 0 and the averaging from 1,
    so with warmup the first z step has learning rate 0.

    schedulefree (the authors' package, schedulefree 1.4: AdamWScheduleFreeReference.step):
    sched = min(1, t/T_w), lr_t = η sched, bias_correction2 = 1 - β₂ᵗ;
    z ← z - lr_t λ y;  v = β₂v + (1-β₂)g²;  z ← z - lr_t g/(√(v/bias_correction2) + ε);
    lr_max = max_{i≤t} lr_i, weight = lr_max², c = weight / Σ weights;
    x ← (1-c)x + c z;  y = β₁x + (1-β₁)z.

    ``state["x"]`` holds the evaluation params.
    """
    if convention not in ("paper", "optax", "schedulefree"):
        raise ValueError(convention)

    def init(theta):
        return {"z": theta.copy(), "x": theta.copy(), "v": _zeros(theta), "weight_sum": 0.0}

    def step(y, g, s, t, key):
        warm = min(1.0, t / warmup_steps) if warmup_steps else 1.0
        bc2 = 1 - b2 ** t
        if convention == "schedulefree":
            lr = learning_rate * warm
            s["lr_max"] = max(lr, s.get("lr_max", 0.0))
            s["z"] = s["z"] - lr * weight_decay * y
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            s["z"] = s["z"] - lr * g / (np.sqrt(s["v"] / bc2) + eps)
            weight = s["lr_max"] ** 2
            s["weight_sum"] += weight
            c = weight / s["weight_sum"] if s["weight_sum"] else 0.0
            s["x"] = (1 - c) * s["x"] + c * s["z"]
            return b1 * s["x"] + (1 - b1) * s["z"]
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        if convention == "paper":
            gamma = learning_rate * warm * math.sqrt(bc2)
            d = g / (np.sqrt(s["v"]) + eps)
            gamma_z = gamma
        else:
            gamma = learning_rate * warm
            gamma_z = learning_rate * (min(1.0, (t - 1) / warmup_steps) if warmup_steps else 1.0)
            d = g / (np.sqrt(s["v"] / bc2) + eps)
        s["z"] = s["z"] - gamma_z * (d + weight_decay * y)
        s["weight_sum"] += gamma ** 2
        c = gamma ** 2 / s["weight_sum"] if s["weight_sum"] else 0.0
        s["x"] = (1 - c) * s["x"] + c * s["z"]
        return (1 - b1) * s["z"] + b1 * s["x"]

    return init, step


# --------------------------------------------------------------------------- Muon

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(u, steps=5, eps=1e-7, *, eps_mode="add"):
    """Keller Jordan's quintic Newton-Schulz orthogonalization of a matrix ``u``.

    X = u / (‖u‖_F + ε) (``eps_mode="clamp"``: / max(‖u‖_F, ε), torch's), transposed when
    rows > cols; ``steps`` times: A = XXᵀ, B = bA + cA², X = aX + BX.
    """
    a, b, c = NS_COEFFS
    norm = float(np.linalg.norm(u))
    x = u / (norm + eps if eps_mode == "add" else max(norm, eps))
    tall = u.shape[0] > u.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon(learning_rate=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
         adam_learning_rate=3e-4, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, *,
         adjust_lr="original", ema_momentum=False, ns_eps_mode="add"):
    """Muon (Keller Jordan 2024) for 2-D leaves, AdamW for the others.

    2-D:  m = μm + g;  u = g + μm (Nesterov) or m;  O = NS5(u);
          θ -= η(s · O + λθ),  s = √max(1, rows/cols) (``adjust_lr="original"``, Keller
          Jordan's) or 0.2·√max(rows, cols) (``"match_rms_adamw"``, Moonshot's; both torch's).
    other: AdamW(adam_learning_rate, adam_b1, adam_b2, adam_eps, weight_decay).
    ``ema_momentum=True`` and ``ns_eps_mode="clamp"`` give torch.optim.Muon's variant
    (m = μm + (1-μ)g, u = (1-μ)g + μm; the update direction is the same up to the ε).
    """
    adam_init, adam_step = _adam(adam_learning_rate, adam_b1, adam_b2, adam_eps, 0.0,
                                 weight_decay, False, "pytorch", decoupled=True, mask=None)

    def init(theta):
        return {"m": _zeros(theta)} if theta.ndim == 2 else adam_init(theta)

    def step(theta, g, s, t, key):
        if theta.ndim != 2:
            return adam_step(theta, g, s, t, key)
        lr = _lr_at(learning_rate, t)
        mu = momentum
        if ema_momentum:
            s["m"] = mu * s["m"] + (1 - mu) * g
            u = (1 - mu) * g + mu * s["m"] if nesterov else s["m"]
        else:
            s["m"] = mu * s["m"] + g
            u = g + mu * s["m"] if nesterov else s["m"]
        o = newton_schulz(u, ns_steps, eps_mode=ns_eps_mode)
        rows, cols = theta.shape
        scale = (math.sqrt(max(1.0, rows / cols)) if adjust_lr == "original"
                 else 0.2 * math.sqrt(max(rows, cols)))
        return theta - lr * (scale * o + weight_decay * theta)

    return init, step
