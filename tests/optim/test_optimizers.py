"""funtrain's optimizers against the float64 references in tests/reference/optimizers.py.

Three kinds of check, all in float64 on the same small problem (a pytree with a vector, two
matrices, a 3-D leaf and a scalar; per-leaf quadratic gradients plus fixed per-step noise):

- funtrain vs reference, every optimizer and convention, to rtol 1e-10 (skipped while an
  optimizer is missing from ``funtrain.optim``);
- reference vs ``torch.optim`` (skipped without torch), for what PyTorch has;
- reference vs optax (skipped without optax), for Lion, LAMB, LARS, schedule-free and the
  optax conventions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim
from funtrain.optim import schedules
from funtrain.optim.transforms import ScaleByAdamProductState, ScaleByAdamState
from tests.reference import optimizers as ref
from tests.reference import schedules as ref_schedules

STEPS = 30
SHAPES = {"a": (3,), "b/w": (4, 3), "b/v": (2, 5), "c": (2, 3, 2), "s": ()}
_rng = np.random.default_rng(1234)
PARAMS0 = {k: _rng.standard_normal(s) for k, s in SHAPES.items()}
TARGET = {k: _rng.standard_normal(s) for k, s in SHAPES.items()}
CURV = {k: _rng.uniform(0.5, 2.0, s) for k, s in SHAPES.items()}
NOISE = [{k: 0.3 * _rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
RTOL, ATOL = 1e-10, 1e-12


def np_grad(params, t0):
    """Gradient of sum_k 0.5 c_k (θ_k - target_k)² plus step ``t0``'s fixed noise."""
    return {k: CURV[k] * (params[k] - TARGET[k]) + NOISE[t0][k] for k in params}


def nest(flat):
    """{"b/w": x} -> {"b": {"w": x}}."""
    out: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = np.asarray(v)
    return out


def reference(name, **kw):
    return ref.trajectory(getattr(ref, name)(**kw), PARAMS0, np_grad, STEPS)


def assert_trajectories_close(got, want, what, rtol=RTOL, atol=ATOL):
    assert len(got) == len(want) == STEPS + 1
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert set(a) == set(b)
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol,
                                       err_msg=f"{what}: step {t}, leaf {k}")


def run_jax(opt, eval_fn=None, keys=None):
    """Run a jax ``(init, update)`` pair (funtrain or optax) under x64 for STEPS steps.

    Returns the params trajectory (flat dicts), and with ``eval_fn(state, params)`` also the
    trajectory of its output (e.g. schedule-free evaluation params).
    """
    keys = list(SHAPES) if keys is None else keys
    with jax.enable_x64(True):
        params = nest({k: jnp.asarray(PARAMS0[k], jnp.float64) for k in keys})
        curv = nest({k: CURV[k] for k in keys})
        target = nest({k: TARGET[k] for k in keys})
        # Each step's noise from numpy: indexing a jax array eagerly compiles per step.
        noise = [nest({k: n[k] for k in keys}) for n in NOISE]

        @jax.jit
        def step(p, s, n):
            g = jax.tree.map(lambda x, c, tg, e: c * (x - tg) + e, p, curv, target, n)
            u, s = opt.update(g, s, p)
            p = jax.tree.map(lambda x, d: x + d, p, u)
            return p, s, (None if eval_fn is None else eval_fn(s, p))

        state = opt.init(params)
        traj = [flatten(params)]
        evals = [flatten(params)]
        for t in range(STEPS):
            params, state, ev = step(params, state, noise[t])
            traj.append(flatten(params))
            if eval_fn is not None:
                evals.append(flatten(ev))
    return (traj, evals) if eval_fn is not None else traj


def _lr_schedule(t):
    return 0.05 * 0.93 ** t


MASK = {"a": False, "b/w": True, "b/v": True, "c": True, "s": False}

# Scheduled betas / momentum: funtrain's schedule, and the float64 reference's (t -> value).
MOM = schedules.one_cycle_momentum(STEPS)
MOM_REF = lambda t: ref_schedules.one_cycle_momentum(t, STEPS)  # noqa: E731
MOM3 = schedules.one_cycle_momentum(STEPS, anneal="linear", three_phase=True, base_momentum=0.6)
MOM3_REF = lambda t: ref_schedules.one_cycle_momentum(  # noqa: E731
    t, STEPS, anneal="linear", three_phase=True, base_momentum=0.6)
# exactly 0 at step 11 (pct_start * STEPS - 1): that step skips the momentum buffer
MOM0 = schedules.one_cycle_momentum(STEPS, pct_start=0.4, base_momentum=0.0)
MOM0_REF = lambda t: ref_schedules.one_cycle_momentum(  # noqa: E731
    t, STEPS, pct_start=0.4, base_momentum=0.0)
B2 = schedules.linear(0.9, 0.999, 20)
B2_REF = lambda t: ref_schedules.linear(t, 0.9, 0.999, 20)  # noqa: E731


def _matrix_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


MATRIX_MASK = {k: len(s) >= 2 for k, s in SHAPES.items()}
MUON_TORCH = dict(ema_momentum=True, ns_eps_mode="clamp")
# Defazio et al. 2024, Algorithm 1 (= the facebookresearch reference): γ_t = η·warmup·√(1-β₂ᵗ).
SCHEDULE_FREE_CONVENTION = "paper"

# case id -> (optimizer name, kwargs shared by funtrain and the reference,
#             funtrain-only kwargs, reference-only kwargs)
CASES = {
    "rmsprop": ("rmsprop", dict(learning_rate=0.01), {}, {}),
    "rmsprop-centered-momentum-wd": ("rmsprop", dict(learning_rate=0.01, alpha=0.9,
                                                     weight_decay=0.1, momentum=0.9,
                                                     centered=True), {}, {}),
    "rmsprop-eps_in_sqrt": ("rmsprop", dict(learning_rate=0.01, eps=1e-3, eps_in_sqrt=True),
                            {}, {}),
    "rmsprop-eps_in_sqrt-centered-momentum": (
        "rmsprop", dict(learning_rate=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=True,
                        eps_in_sqrt=True), {}, {}),
    "rmsprop-momentum-schedule": ("rmsprop", dict(learning_rate=0.01, alpha=0.9, centered=True),
                                  dict(momentum=MOM), dict(momentum=MOM_REF)),
    "adagrad": ("adagrad", dict(learning_rate=0.1), {}, {}),
    "adagrad-lr_decay-wd-init": ("adagrad", dict(learning_rate=0.1, lr_decay=0.05,
                                                 weight_decay=0.1,
                                                 initial_accumulator_value=0.2), {}, {}),
    "adagrad-optax": ("adagrad", dict(learning_rate=0.1, initial_accumulator_value=0.1,
                                      eps=1e-7, eps_in_sqrt=True), {}, {}),
    "adagrad-optax-zero-init": ("adagrad", dict(learning_rate=0.1, eps=1e-3,
                                                eps_in_sqrt=True), {}, {}),
    "adadelta": ("adadelta", dict(), {}, {}),
    "adadelta-wd": ("adadelta", dict(learning_rate=0.5, rho=0.8, eps=1e-4, weight_decay=0.1),
                    {}, {}),
    "adam": ("adam", dict(learning_rate=0.05), {}, {}),
    "adam-wd": ("adam", dict(learning_rate=0.05, b1=0.8, b2=0.99, weight_decay=0.1), {}, {}),
    "adam-eps_root": ("adam", dict(learning_rate=0.05, eps=1e-3, eps_root=1e-4), {}, {}),
    "adam-schedule": ("adam", dict(learning_rate=_lr_schedule), {}, {}),
    "adam-amsgrad-pytorch": ("adam", dict(learning_rate=0.05, amsgrad=True), {}, {}),
    "adam-b1-schedule": ("adam", dict(learning_rate=0.05), dict(b1=MOM), dict(b1=MOM_REF)),
    "adam-b1-b2-schedule-product": ("adam", dict(learning_rate=_lr_schedule, weight_decay=0.1,
                                                 bias_correction="product"),
                                    dict(b1=MOM3, b2=B2), dict(b1=MOM3_REF, b2=B2_REF)),
    "adam-b2-schedule-amsgrad": ("adam", dict(learning_rate=0.05, amsgrad=True),
                                 dict(b2=B2), dict(b2=B2_REF)),
    "adam-b2-schedule-amsgrad-optax-product": (
        "adam", dict(learning_rate=0.05, amsgrad=True, amsgrad_convention="optax",
                     bias_correction="product"), dict(b2=B2), dict(b2=B2_REF)),
    "adam-amsgrad-optax": ("adam", dict(learning_rate=0.05, amsgrad=True,
                                        amsgrad_convention="optax"), {}, {}),
    "adamw": ("adamw", dict(learning_rate=0.05, weight_decay=0.1), {}, {}),
    "adamw-schedule": ("adamw", dict(learning_rate=_lr_schedule, weight_decay=0.2), {}, {}),
    "adamw-mask-tree": ("adamw", dict(learning_rate=0.05, weight_decay=0.5),
                        dict(mask=nest(MASK)), dict(mask=MASK)),
    "adamw-mask-callable": ("adamw", dict(learning_rate=0.05, weight_decay=0.5),
                            dict(mask=_matrix_mask), dict(mask=MATRIX_MASK)),
    "adamw-amsgrad-pytorch": ("adamw", dict(learning_rate=0.05, amsgrad=True), {}, {}),
    "adamw-b1-schedule": ("adamw", dict(learning_rate=0.05, weight_decay=0.1),
                          dict(b1=MOM3), dict(b1=MOM3_REF)),
    "adamw-b1-b2-schedule-product-mask": (
        "adamw", dict(learning_rate=0.05, weight_decay=0.5, bias_correction="product"),
        dict(b1=MOM, b2=B2, mask=nest(MASK)), dict(b1=MOM_REF, b2=B2_REF, mask=MASK)),
    "adamw-amsgrad-optax": ("adamw", dict(learning_rate=0.05, amsgrad=True,
                                          amsgrad_convention="optax"), {}, {}),
    "amsgrad-pytorch": ("amsgrad", dict(learning_rate=0.05, weight_decay=0.1), {}, {}),
    "amsgrad-optax": ("amsgrad", dict(learning_rate=0.05, convention="optax"), {}, {}),
    "adamax-pytorch": ("adamax", dict(learning_rate=0.05, weight_decay=0.1), {}, {}),
    "nadam-pytorch": ("nadam", dict(learning_rate=0.05, weight_decay=0.1,
                                    momentum_decay=0.05), {}, {}),
    "nadam-optax": ("nadam", dict(learning_rate=0.05, convention="optax"), {}, {}),
    "radam": ("radam", dict(learning_rate=0.05), {}, {}),
    "radam-wd": ("radam", dict(learning_rate=0.05, b2=0.99, weight_decay=0.1), {}, {}),
    "lion": ("lion", dict(learning_rate=0.01), {}, {}),
    "lion-wd-mask": ("lion", dict(learning_rate=0.01, b1=0.8, b2=0.95, weight_decay=0.5),
                     dict(mask=nest(MASK)), dict(mask=MASK)),
    "lamb": ("lamb", dict(learning_rate=0.02), {}, {}),
    "lamb-wd-mask-eps_root": ("lamb", dict(learning_rate=0.02, weight_decay=0.1,
                                           eps_root=1e-4),
                              dict(mask=_matrix_mask), dict(mask=MATRIX_MASK)),
    "lars": ("lars", dict(learning_rate=0.5, weight_decay=0.1, trust_coefficient=0.02),
             {}, {}),
    "lars-nesterov-eps": ("lars", dict(learning_rate=0.5, momentum=0.8, weight_decay=0.1,
                                       trust_coefficient=0.02, eps=0.1, nesterov=True), {}, {}),
    "lars-mask": ("lars", dict(learning_rate=0.5, weight_decay=0.5, trust_coefficient=0.02),
                  dict(mask=nest(MASK)), dict(mask=MASK)),
    "lars-momentum-schedule-to-zero": (
        "lars", dict(learning_rate=0.5, weight_decay=0.1, trust_coefficient=0.02),
        dict(momentum=MOM0), dict(momentum=MOM0_REF)),
    "rmsprop-momentum-schedule-to-zero": ("rmsprop", dict(learning_rate=0.01, alpha=0.9),
                                          dict(momentum=MOM0), dict(momentum=MOM0_REF)),
    "lars-momentum-schedule-nesterov": (
        "lars", dict(learning_rate=0.5, weight_decay=0.1, trust_coefficient=0.02,
                     nesterov=True), dict(momentum=MOM3), dict(momentum=MOM3_REF)),
    "adafactor": ("adafactor", dict(), {}, {}),
    "adafactor-wd-clip": ("adafactor", dict(learning_rate=0.05, beta2_decay=-0.5,
                                            eps=(1e-30, 1e-2), clipping_threshold=1.5,
                                            weight_decay=0.1), {}, {}),
    "schedule_free_adamw": ("schedule_free_adamw", dict(learning_rate=0.05), {},
                            dict(convention=SCHEDULE_FREE_CONVENTION)),
    "schedule_free_adamw-warmup-wd": ("schedule_free_adamw",
                                      dict(learning_rate=0.05, b1=0.8, weight_decay=0.1,
                                           warmup_steps=7), {},
                                      dict(convention=SCHEDULE_FREE_CONVENTION)),
    # the authors' schedulefree.AdamWScheduleFree (1.4): the z step warms up with the weights
    "schedule_free_adamw-schedulefree": ("schedule_free_adamw",
                                         dict(learning_rate=0.05, b1=0.8, weight_decay=0.1,
                                              warmup_steps=3, convention="schedulefree"),
                                         {}, {}),
    # funtrain's Muon follows torch.optim.Muon's code: EMA momentum, ‖u‖ clamped at ε.
    "muon": ("muon", dict(learning_rate=0.02, weight_decay=0.0, adam_learning_rate=0.01), {},
             MUON_TORCH),
    "muon-nonesterov-wd": ("muon", dict(learning_rate=0.05, momentum=0.9, nesterov=False,
                                        ns_steps=4, weight_decay=0.1, adam_learning_rate=0.02,
                                        adam_b1=0.8, adam_b2=0.99, adam_eps=1e-6), {},
                           MUON_TORCH),
    "muon-match_rms_adamw": ("muon", dict(learning_rate=0.02, weight_decay=0.05,
                                          adjust_lr="match_rms_adamw"), {}, MUON_TORCH),
}


def _funtrain_factory(name):
    factory = getattr(optim, name, None)
    if factory is None:
        pytest.skip(f"funtrain.optim.{name} does not exist yet")
    return factory


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    name, kw, ft_kw, ref_kw = CASES[case]
    factory = _funtrain_factory(name)
    want = reference(name, **kw, **ref_kw)
    got = run_jax(factory(**kw, **ft_kw))
    assert_trajectories_close(got, want, f"{case}: funtrain vs reference")
    # The trajectory must move.
    assert any(not np.allclose(got[-1][k], PARAMS0[k]) for k in PARAMS0)


@pytest.mark.parametrize("case", ["schedule_free_adamw", "schedule_free_adamw-warmup-wd",
                                  "schedule_free_adamw-schedulefree"])
def test_schedule_free_eval_params_match_reference(case):
    _, kw, _, ref_kw = CASES[case]
    factory = _funtrain_factory("schedule_free_adamw")
    eval_params = _funtrain_factory("schedule_free_eval_params")
    want, states = ref.trajectory(ref.schedule_free_adamw(**kw, **ref_kw), PARAMS0, np_grad,
                                  STEPS, keep_states=True)
    want_x = [dict(PARAMS0)] + [{k: s[k]["x"] for k in s} for s in states]
    got, got_x = run_jax(factory(**kw), eval_fn=eval_params)
    assert_trajectories_close(got, want, f"{case}: y")
    assert_trajectories_close(got_x, want_x, f"{case}: eval params x")


# --------------------------------------------------------------------------- reference vs torch


def run_torch(make_opt, keys=None):
    torch = pytest.importorskip("torch")
    keys = list(SHAPES) if keys is None else keys
    params = [torch.nn.Parameter(torch.tensor(PARAMS0[k], dtype=torch.float64)) for k in keys]
    # torch keeps scalar state (NAdam's mu_product, step counts) in the default dtype.
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = make_opt(torch.optim, params)
        return _torch_steps(torch, opt, params, keys)
    finally:
        torch.set_default_dtype(old_dtype)


def _torch_steps(torch, opt, params, keys, scheduler=None):
    traj = [{k: PARAMS0[k].copy() for k in keys}]
    for t0 in range(STEPS):
        cur = {k: p.detach().numpy().copy() for k, p in zip(keys, params, strict=True)}
        grads = np_grad(cur, t0)
        for k, p in zip(keys, params, strict=True):
            p.grad = torch.tensor(grads[k], dtype=torch.float64)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        traj.append({k: p.detach().numpy().copy() for k, p in zip(keys, params, strict=True)})
    return traj


TORCH_CASES = {
    "rmsprop": (dict(learning_rate=0.01, alpha=0.9, eps=1e-6),
                lambda o, p: o.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, foreach=False)),
    "rmsprop-centered-momentum-wd": (
        dict(learning_rate=0.01, alpha=0.9, weight_decay=0.1, momentum=0.9, centered=True),
        lambda o, p: o.RMSprop(p, lr=0.01, alpha=0.9, weight_decay=0.1, momentum=0.9,
                               centered=True, foreach=False)),
    "adagrad-lr_decay-wd-init": (
        dict(learning_rate=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2),
        lambda o, p: o.Adagrad(p, lr=0.1, lr_decay=0.05, weight_decay=0.1,
                               initial_accumulator_value=0.2, foreach=False)),
    "adagrad": (dict(learning_rate=0.1), lambda o, p: o.Adagrad(p, lr=0.1, foreach=False)),
    "adadelta-wd": (dict(learning_rate=0.5, rho=0.8, eps=1e-4, weight_decay=0.1),
                    lambda o, p: o.Adadelta(p, lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1,
                                            foreach=False)),
    "adam-wd": (dict(learning_rate=0.05, b1=0.8, b2=0.99, weight_decay=0.1),
                lambda o, p: o.Adam(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.1,
                                    foreach=False)),
    "adam-amsgrad": (dict(learning_rate=0.05, weight_decay=0.1, amsgrad=True),
                     lambda o, p: o.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True,
                                         foreach=False)),
    "adamw": (dict(learning_rate=0.05, weight_decay=0.1),
              lambda o, p: o.AdamW(p, lr=0.05, weight_decay=0.1, foreach=False)),
    "adamw-amsgrad": (dict(learning_rate=0.05, weight_decay=0.1, amsgrad=True),
                      lambda o, p: o.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True,
                                           foreach=False)),
    "amsgrad": (dict(learning_rate=0.05, b2=0.99),
                lambda o, p: o.Adam(p, lr=0.05, betas=(0.9, 0.99), amsgrad=True, foreach=False)),
    "adamax": (dict(learning_rate=0.05, eps=1e-3, weight_decay=0.1),
               lambda o, p: o.Adamax(p, lr=0.05, eps=1e-3, weight_decay=0.1, foreach=False)),
    "nadam": (dict(learning_rate=0.05, weight_decay=0.1, momentum_decay=0.05),
              lambda o, p: o.NAdam(p, lr=0.05, weight_decay=0.1, momentum_decay=0.05,
                                   foreach=False)),
    "radam": (dict(learning_rate=0.05, b2=0.99, weight_decay=0.1),
              lambda o, p: o.RAdam(p, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1,
                                   foreach=False)),
    "adafactor": (dict(), lambda o, p: o.Adafactor(p, foreach=False)),
    "adafactor-wd-clip": (
        dict(learning_rate=0.05, beta2_decay=-0.5, eps=(1e-30, 1e-2), clipping_threshold=1.5,
             weight_decay=0.1),
        lambda o, p: o.Adafactor(p, lr=0.05, beta2_decay=-0.5, eps=(1e-30, 1e-2), d=1.5,
                                 weight_decay=0.1, foreach=False)),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_reference_matches_torch(case):
    kw, make = TORCH_CASES[case]
    name = case.split("-")[0]
    want = reference(name, **kw)
    got = run_torch(make)
    assert_trajectories_close(got, want, f"{case}: torch vs reference")


def run_torch_one_cycle(make_opt, **one_cycle_kw):
    """Like ``run_torch``, with ``OneCycleLR(max_lr=lr, total_steps=STEPS, **one_cycle_kw)``
    stepped after every ``opt.step()`` (it cycles ``momentum``, or ``betas[0]``)."""
    torch = pytest.importorskip("torch")
    keys = list(SHAPES)
    params = [torch.nn.Parameter(torch.tensor(PARAMS0[k], dtype=torch.float64)) for k in keys]
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = make_opt(torch.optim, params)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=opt.param_groups[0]["lr"], total_steps=STEPS, **one_cycle_kw)
        return _torch_steps(torch, opt, params, keys, scheduler)
    finally:
        torch.set_default_dtype(old_dtype)


# case id -> (funtrain optimizer, lr, funtrain kwargs, torch optimizer, OneCycleLR kwargs);
# funtrain gets one_cycle(lr, STEPS) as its learning rate and the matching momentum schedule.
ONE_CYCLE_CASES = {
    "adam": ("adam", 0.05, dict(b2=0.99),
             lambda o, p: o.Adam(p, lr=0.05, betas=(0.9, 0.99), foreach=False), {}),
    "adam-wd-amsgrad-three_phase-linear": (
        "adam", 0.05, dict(weight_decay=0.1, amsgrad=True),
        lambda o, p: o.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True, foreach=False),
        dict(three_phase=True, anneal_strategy="linear", base_momentum=0.6)),
    "adamw": ("adamw", 0.05, dict(weight_decay=0.1),
              lambda o, p: o.AdamW(p, lr=0.05, weight_decay=0.1, foreach=False),
              dict(pct_start=0.4, base_momentum=0.8, max_momentum=0.97)),
    "rmsprop-momentum-to-zero": ("rmsprop", 0.01, dict(alpha=0.9),
                                 lambda o, p: o.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.9,
                                                        foreach=False),
                                 dict(pct_start=0.4, base_momentum=0.0, max_momentum=0.9)),
    "rmsprop-centered": ("rmsprop", 0.01, dict(alpha=0.9, centered=True),
                         lambda o, p: o.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.9,
                                                centered=True, foreach=False), {}),
}


def _one_cycle_funtrain(case):
    name, lr, kw, _, cycle_kw = ONE_CYCLE_CASES[case]
    mom_kw = {"anneal" if k == "anneal_strategy" else k: v for k, v in cycle_kw.items()}
    sched_kw = {k: v for k, v in mom_kw.items() if k in ("pct_start", "anneal", "three_phase")}
    momentum = schedules.one_cycle_momentum(STEPS, **mom_kw)
    key = "b1" if name.startswith("adam") else "momentum"
    return getattr(optim, name)(schedules.one_cycle(lr, STEPS, **sched_kw),
                                **{key: momentum}, **kw)


@pytest.mark.parametrize("case", list(ONE_CYCLE_CASES))
def test_one_cycle_cycled_momentum_matches_torch(case):
    """funtrain with one_cycle + one_cycle_momentum (PyTorch's bias correction, the default)
    against torch.optim under OneCycleLR(cycle_momentum=True), in float64."""
    _, _, _, make, cycle_kw = ONE_CYCLE_CASES[case]
    want = run_torch_one_cycle(make, **cycle_kw)
    got = run_jax(_one_cycle_funtrain(case))
    assert_trajectories_close(got, want, f"{case}: funtrain vs torch OneCycleLR")


def test_reference_with_scheduled_b1_matches_torch_one_cycle():
    """The reference's "pytorch" bias correction is torch.optim.Adam's under OneCycleLR; the
    exact ("product") correction is not."""
    make = lambda o, p: o.Adam(p, lr=0.05, betas=(0.9, 0.99), foreach=False)  # noqa: E731
    want = run_torch_one_cycle(make)
    kw = dict(learning_rate=lambda t: ref_schedules.one_cycle(t, 0.05, STEPS), b1=MOM_REF,
              b2=0.99)
    assert_trajectories_close(reference("adam", **kw), want, "reference vs torch")
    exact = reference("adam", **kw, bias_correction="product")
    assert any(not np.allclose(exact[-1][k], want[-1][k], rtol=1e-6) for k in want[-1])


def test_reference_with_scheduled_betas_matches_optax_inject_hyperparams():
    """optax's scale_by_adam with an injected (scheduled) beta also uses 1 - β_tᵗ."""
    optax = pytest.importorskip("optax")
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=MOM, b2=B2)
    want = reference("adam", learning_rate=0.05, b1=MOM_REF, b2=B2_REF)
    assert_trajectories_close(run_jax(opt), want, "optax inject_hyperparams vs reference")


MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]


@pytest.mark.parametrize("nesterov,adjust_lr", [(True, "original"), (False, "original"),
                                               (True, "match_rms_adamw")])
def test_muon_reference_matches_torch_in_float64(nesterov, adjust_lr, monkeypatch):
    """torch.optim.Muon runs Newton-Schulz in bfloat16; with that cast made a no-op it must
    match the reference's torch variant (EMA momentum, ε clamp) to 1e-10."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())
    kw = dict(learning_rate=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
              adjust_lr=adjust_lr)
    want = ref.trajectory(ref.muon(**kw, **MUON_TORCH), {k: PARAMS0[k] for k in MATRICES},
                          np_grad, STEPS)
    got = run_torch(lambda o, p: o.Muon(p, lr=0.05, momentum=0.9, nesterov=nesterov,
                                        weight_decay=0.1, adjust_lr_fn=adjust_lr),
                    keys=MATRICES)
    assert_trajectories_close(got, want, "muon: torch (float64 NS) vs reference")


def test_muon_takes_an_empty_matrix():
    # a (3, 0) weight raised ZeroDivisionError from the lr adjustment's rows / cols
    params = {"w": jnp.ones((3, 0)), "v": jnp.ones((2, 2))}
    opt = optim.muon(0.01)
    updates, _ = jax.jit(opt.update)(params, opt.init_state(params), params)
    assert updates["w"].shape == (3, 0) and bool(jnp.all(jnp.isfinite(updates["v"])))


def test_muon_reference_matches_torch_bfloat16_first_step():
    """Unpatched torch.optim.Muon (bfloat16 Newton-Schulz): one step agrees to bf16 accuracy."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    lr = 0.05
    want = ref.trajectory(ref.muon(learning_rate=lr), {k: PARAMS0[k] for k in MATRICES},
                          np_grad, 1)
    params = [torch.nn.Parameter(torch.tensor(PARAMS0[k])) for k in MATRICES]
    opt = torch.optim.Muon(params, lr=lr, weight_decay=0.0)
    grads = np_grad({k: PARAMS0[k] for k in MATRICES}, 0)
    for k, p in zip(MATRICES, params, strict=True):
        p.grad = torch.tensor(grads[k])
    opt.step()
    for k, p in zip(MATRICES, params, strict=True):
        step_got = p.detach().numpy() - PARAMS0[k]
        step_want = want[1][k] - PARAMS0[k]
        np.testing.assert_allclose(step_got, step_want, atol=0.03 * lr, err_msg=k)


# --------------------------------------------------------------------------- reference vs optax


def _optax_cases():
    optax = pytest.importorskip("optax")
    contrib = pytest.importorskip("optax.contrib")

    def paper_schedule_free(lr, b1, b2, eps, wd, warmup):
        """Algorithm 1 of the paper assembled from optax parts: its bias-corrected γ_t."""
        def gamma(t):  # t counts from 1
            # (an int32 count / int is float32 in JAX even with x64: cast first)
            warm = jnp.minimum(1.0, jnp.asarray(t, jnp.float64) / warmup) if warmup else 1.0
            return lr * warm * jnp.sqrt(1 - b2 ** t)

        base = optax.chain(
            optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=False),
            optax.add_decayed_weights(wd),
            optax.scale_by_learning_rate(lambda count: gamma(count + 1)),
        )
        return contrib.schedule_free(base, learning_rate=gamma, b1=b1)

    def optax_schedule_free(lr, b1, wd, warmup):
        """optax.contrib.schedule_free_adamw with its warmup schedule in float64 (optax's
        warmup_constant_schedule computes count / warmup in float32)."""
        def sched(count):
            return lr * jnp.minimum(1.0, jnp.asarray(count, jnp.float64) / warmup)

        base = optax.chain(
            optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
            optax.add_decayed_weights(wd),
            optax.scale_by_learning_rate(sched),
        )
        return contrib.schedule_free(base, learning_rate=sched, b1=b1)

    return {
        "lion": (("lion", dict(learning_rate=0.01, b1=0.8, b2=0.95, weight_decay=0.5,
                               mask=MASK)),
                 lambda: optax.lion(0.01, b1=0.8, b2=0.95, weight_decay=0.5, mask=nest(MASK))),
        "lamb": (("lamb", dict(learning_rate=0.02, weight_decay=0.1, eps_root=1e-4,
                               mask=MATRIX_MASK)),
                 lambda: optax.lamb(0.02, eps_root=1e-4, weight_decay=0.1, mask=_matrix_mask)),
        "lars": (("lars", dict(learning_rate=0.5, weight_decay=0.1, trust_coefficient=0.02)),
                 lambda: optax.lars(0.5, weight_decay=0.1, trust_coefficient=0.02)),
        "lars-mask": (("lars", dict(learning_rate=0.5, weight_decay=0.5, trust_coefficient=0.02,
                                    mask=MASK)),
                      lambda: optax.lars(0.5, weight_decay=0.5, trust_coefficient=0.02,
                                         weight_decay_mask=nest(MASK))),
        "lars-nesterov-eps": (
            ("lars", dict(learning_rate=0.5, momentum=0.8, weight_decay=0.1,
                          trust_coefficient=0.02, eps=0.1, nesterov=True)),
            lambda: optax.lars(0.5, weight_decay=0.1, trust_coefficient=0.02, eps=0.1,
                               momentum=0.8, nesterov=True)),
        "rmsprop-eps_in_sqrt": (
            ("rmsprop", dict(learning_rate=0.01, alpha=0.9, eps=1e-3, eps_in_sqrt=True)),
            lambda: optax.rmsprop(0.01, decay=0.9, eps=1e-3, eps_in_sqrt=True)),
        "rmsprop-eps_in_sqrt-centered-momentum": (
            ("rmsprop", dict(learning_rate=0.01, alpha=0.9, eps=1e-3, momentum=0.5,
                             centered=True, eps_in_sqrt=True)),
            lambda: optax.rmsprop(0.01, decay=0.9, eps=1e-3, centered=True, momentum=0.5,
                                  eps_in_sqrt=True)),
        "adagrad-optax": (
            ("adagrad", dict(learning_rate=0.1, initial_accumulator_value=0.1, eps=1e-7,
                             eps_in_sqrt=True)),
            lambda: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=1e-7)),
        "adagrad-optax-zero-init": (
            ("adagrad", dict(learning_rate=0.1, eps=1e-3, eps_in_sqrt=True)),
            lambda: optax.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-3)),
        # optax 0.2.8's adamax is u = max(β₂u, |g| + ε), m̂/u: the same as PyTorch's.
        "adamax": (("adamax", dict(learning_rate=0.05, eps=1e-3)),
                   lambda: optax.adamax(0.05, eps=1e-3)),
        "nadam-optax": (("nadam", dict(learning_rate=0.05, convention="optax")),
                        lambda: optax.nadam(0.05)),
        "amsgrad-optax": (("amsgrad", dict(learning_rate=0.05, convention="optax")),
                          lambda: optax.amsgrad(0.05)),
        "adam-eps_root": (("adam", dict(learning_rate=0.05, eps=1e-3, eps_root=1e-4)),
                          lambda: optax.adam(0.05, eps=1e-3, eps_root=1e-4)),
        "adamw-mask": (("adamw", dict(learning_rate=0.05, weight_decay=0.5, mask=MASK)),
                       lambda: optax.adamw(0.05, weight_decay=0.5, mask=nest(MASK))),
        "schedule_free-optax": (
            ("schedule_free_adamw", dict(learning_rate=0.05, b1=0.8, weight_decay=0.1,
                                         warmup_steps=7, convention="optax")),
            lambda: optax_schedule_free(0.05, 0.8, 0.1, 7)),
        "schedule_free-optax-nowarmup": (
            ("schedule_free_adamw", dict(learning_rate=0.05, convention="optax")),
            lambda: contrib.schedule_free_adamw(0.05)),
        "schedule_free-paper": (
            ("schedule_free_adamw", dict(learning_rate=0.05, b1=0.8, weight_decay=0.1,
                                         warmup_steps=7)),
            lambda: paper_schedule_free(0.05, 0.8, 0.999, 1e-8, 0.1, 7)),
        "schedule_free-paper-nowarmup": (
            ("schedule_free_adamw", dict(learning_rate=0.05)),
            lambda: paper_schedule_free(0.05, 0.9, 0.999, 1e-8, 0.0, 0)),
    }


OPTAX_CASES = [
    "lion", "lamb", "lars", "lars-mask", "lars-nesterov-eps", "rmsprop-eps_in_sqrt",
    "rmsprop-eps_in_sqrt-centered-momentum", "adagrad-optax", "adagrad-optax-zero-init",
    "adamax", "nadam-optax", "amsgrad-optax", "adam-eps_root", "adamw-mask",
    "schedule_free-optax", "schedule_free-optax-nowarmup", "schedule_free-paper",
    "schedule_free-paper-nowarmup",
]


@pytest.mark.parametrize("case", OPTAX_CASES)
def test_reference_matches_optax(case):
    (name, kw), make = _optax_cases()[case]
    if name == "schedule_free_adamw":
        contrib = pytest.importorskip("optax.contrib")
        want, states = ref.trajectory(ref.schedule_free_adamw(**kw), PARAMS0, np_grad, STEPS,
                                      keep_states=True)
        want_x = [dict(PARAMS0)] + [{k: s[k]["x"] for k in s} for s in states]
        got, got_x = run_jax(make(), eval_fn=contrib.schedule_free_eval_params)
        assert_trajectories_close(got_x, want_x, f"{case}: optax vs reference, eval x")
    else:
        want = reference(name, **kw)
        got = run_jax(make())
    assert_trajectories_close(got, want, f"{case}: optax vs reference")


# --------------------------------------------------------------------------- reference sanity


def test_reference_conventions_differ_where_they_should():
    """Each named convention changes the trajectory (so the tests above can tell them apart)."""
    pairs = [
        ("rmsprop", dict(learning_rate=0.01, eps=1e-3), dict(eps_in_sqrt=True)),
        ("adagrad", dict(learning_rate=0.1, eps=1e-3), dict(eps_in_sqrt=True)),
        ("amsgrad", dict(learning_rate=0.05), dict(convention="optax")),
        ("nadam", dict(learning_rate=0.05), dict(convention="optax")),
        ("schedule_free_adamw", dict(learning_rate=0.05), dict(convention="optax")),
        ("muon", dict(learning_rate=0.05), dict(ema_momentum=True)),
    ]
    for name, kw, other in pairs:
        a = reference(name, **kw)[-1]
        b = reference(name, **kw, **other)[-1]
        assert any(not np.allclose(a[k], b[k], rtol=1e-9, atol=0) for k in a), (name, other)


def test_newton_schulz_reference_is_nearly_orthogonal():
    g = np.random.default_rng(0).standard_normal((6, 4))
    o = ref.newton_schulz(g)
    s = np.linalg.svd(o, compute_uv=False)
    assert o.shape == g.shape
    assert np.all((s > 0.5) & (s < 1.5))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    assert np.sum(o * (u @ vt)) > 0.9 * 4  # aligned with the polar factor U Vᵀ


def test_optax_schedule_free_adamw_factory_with_warmup_matches_reference_to_float32_schedule():
    """optax's own schedule_free_adamw (warmup in float32, off by one step in z) agrees with
    the reference's "optax" convention to the precision of its float32 warmup schedule."""
    contrib = pytest.importorskip("optax.contrib")
    kw = dict(learning_rate=0.05, b1=0.8, weight_decay=0.1, warmup_steps=7)
    want = reference("schedule_free_adamw", **kw, convention="optax")
    got = run_jax(contrib.schedule_free_adamw(**kw))
    assert_trajectories_close(got, want, "optax.contrib.schedule_free_adamw", rtol=1e-6,
                              atol=1e-7)
    assert all(np.array_equal(got[1][k], PARAMS0[k]) for k in PARAMS0)  # first z step: lr 0


# --------------------------------------------------------------------------- scheduled betas


def test_scheduled_betas_keep_the_float_state_unless_product():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    plain = optim.adam(1e-3).init_state(params)
    assert jax.tree.structure(optim.adam(1e-3, b1=MOM, b2=B2).init_state(params)) == \
        jax.tree.structure(plain)
    # A float beta never needs a product, whatever the convention.
    assert jax.tree.structure(optim.adam(1e-3, bias_correction="product").init_state(
        params)) == jax.tree.structure(plain)
    state = optim.adamw(1e-3, b1=MOM, bias_correction="product").init_state(params)[0]
    assert isinstance(state, ScaleByAdamProductState)
    assert state.b1_product.shape == () and float(state.b1_product) == 1.0
    assert state.b2_product == ()
    assert isinstance(plain[0], ScaleByAdamState)


def test_float_betas_are_bitwise_the_same_under_either_bias_correction():
    got = run_jax(optim.adam(0.05, b1=0.8, bias_correction="product"))
    want = run_jax(optim.adam(0.05, b1=0.8))
    for a, b in zip(got, want, strict=True):
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])


def test_product_bias_correction_is_unbiased_for_a_constant_gradient():
    """m_t = (1 - prod beta_s) g exactly: the product correction gives m_hat = g at every
    step, the PyTorch one (1 - beta_t^t) does not once beta varies."""
    errors = {}
    with jax.enable_x64(True):
        g = {"w": jnp.asarray([0.3, -2.0, 5.0], jnp.float64)}
        for conv in ("pytorch", "product"):
            opt = optim.scale_by_adam(b1=MOM, b2=B2, eps=1e-300, bias_correction=conv)
            state = opt.init_state(g)
            worst = 0.0
            for _ in range(STEPS):
                u, state = opt.update(g, state)
                # m_hat / sqrt(v_hat) = g / |g| when both corrections are exact
                worst = max(worst, float(np.max(np.abs(np.asarray(u["w"]) - np.sign(g["w"])))))
            errors[conv] = worst
    assert errors["product"] < 1e-12
    assert errors["pytorch"] > 1e-3


def test_scheduled_beta_state_keeps_its_dtypes_in_scan():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    opt = optim.adam(1e-2, b1=MOM, b2=B2, bias_correction="product", mu_dtype=jnp.bfloat16)

    def body(carry, _):
        p, s = carry
        u, s = opt.update({"w": jnp.ones((3,), jnp.bfloat16)}, s, p)
        return (optim.apply_updates(p, u), s), None

    init = opt.init_state(params)
    (p, state), _ = jax.lax.scan(body, (params, init), length=5)
    assert p["w"].dtype == jnp.bfloat16
    assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, init)
    want = np.prod([float(MOM(t)) for t in range(5)])
    np.testing.assert_allclose(float(state[0].b1_product), want, rtol=1e-6)


@pytest.mark.parametrize("make,exc,message", [
    (lambda: optim.adam(b1=lambda t: 1.0), ValueError,
     r"adam: b1\(0\) must be in \[0.0, 1.0\), got 1.0"),
    (lambda: optim.adamw(b2=lambda t: -0.1), ValueError,
     r"adamw: b2\(0\) must be in \[0.0, 1.0\), got -0.1"),
    (lambda: optim.adam(b1=lambda: 0.9), TypeError,
     r"adam: b1 is a schedule, so it must take the step count"),
    (lambda: optim.adam(bias_correction="exact"), ValueError,
     r"adam: bias_correction must be 'pytorch' or 'product', got 'exact'"),
    (lambda: optim.adamw(bias_correction=None), ValueError,
     r"adamw: bias_correction must be 'pytorch' or 'product', got None"),
    (lambda: optim.scale_by_adam(b1=MOM, nesterov=True), ValueError,
     r"scale_by_adam: nesterov=True needs a float b1, got a schedule"),
    (lambda: optim.scale_by_adam(b2=lambda t: 1.5), ValueError,
     r"scale_by_adam: b2\(0\) must be in \[0.0, 1.0\), got 1.5"),
    (lambda: optim.trace(MOM, nesterov=True, dampening=0.5), ValueError,
     r"trace: nesterov=True needs dampening == 0, got dampening=0.5"),
    (lambda: optim.rmsprop(momentum=lambda t: -1.0), ValueError,
     r"rmsprop: momentum\(0\) must be >= 0.0, got -1.0"),
    (lambda: optim.lars(0.1, momentum=lambda t: jnp.ones(3)), ValueError,
     r"lars: momentum is a schedule; it must return a scalar, got shape \(3,\)"),
    # Only Adam/AdamW's betas and SGD/RMSprop/LARS's momentum take schedules so far.
    (lambda: optim.nadam(b1=MOM), TypeError, r"nadam: b1 must be a float, got function"),
])
def test_scheduled_hyperparameter_errors(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_product_bias_correction_refuses_injected_array_betas():
    opt = optim.inject_hyperparams(optim.adam)(b1=optim.schedules.one_cycle_momentum(100),
                                               bias_correction="product")
    with pytest.raises(ValueError, match=r"bias_correction='product' needs the betas' "
                                         r"schedules themselves .* static_args=\('b1', 'b2'\)"):
        opt.init_state({"w": jnp.ones(2)})


def test_an_infinite_clipping_norm_never_clips():
    # PyTorch's clip_grad_norm_(max_norm=inf) idiom: measure the norm, change nothing.
    opt = optim.clip_by_global_norm(float("inf"))
    grads = {"w": jnp.full(3, 1e10)}
    updates, _ = opt.update(grads, opt.init_state(grads))
    np.testing.assert_array_equal(updates["w"], grads["w"])


def test_clip_keeps_the_update_dtype_whatever_the_bound_s():
    """A numpy or injected float32 bound promoted bf16 updates to float32, which a fused
    state's bf16 buffer then refused."""
    grads = {"w": jnp.asarray([-2.0, 0.3, 2.0], jnp.bfloat16)}
    for opt in (optim.clip(np.float32(0.5)), optim.clip(0.5),
                optim.inject_hyperparams(optim.clip)(max_delta=jnp.asarray(0.5, jnp.float32))):
        updates, _ = opt.update(grads, opt.init_state(grads))
        assert updates["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(updates["w"], np.float32),
                                      np.clip(np.asarray(grads["w"], np.float32), -0.5, 0.5))
