"""Wrappers: masked, partition, freeze, multi_steps, apply_if_finite, inject_hyperparams."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funtrain import optim
from funtrain.optim.transforms import ScaleByAdamState
from funtrain.optim.wrappers import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    MaskedNode,
    MaskedState,
    MultiStepsState,
    PartitionState,
    apply_if_finite,
    freeze,
    inject_hyperparams,
    masked,
    multi_steps,
    partition,
)


# Test inputs are cast on the host and moved with device_put: jnp.asarray would compile a
# program for each new shape and dtype.
def make_params():
    rng = np.random.default_rng(0)
    return jax.device_put({"dense": {"w": rng.standard_normal((3, 2)).astype(np.float32),
                                     "b": rng.standard_normal(2).astype(np.float32)},
                           "embed": rng.standard_normal((4, 3)).astype(np.float32)})


def grads_like(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jax.device_put(rng.standard_normal(p.shape).astype(p.dtype)),
                        params)


def assert_trees_equal(a, b):
    """Same structure and bitwise-equal leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def assert_trees_close(a, b):
    """Same structure and dtypes, values equal up to rounding.

    jit and eager can differ in the last bit: XLA fuses ``mu * v + g`` differently from
    two separate eager ops (plain ``sgd(momentum=0.9)`` shows it, without any wrapper).
    """
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def run(opt, params, grads_seq, *, jit):
    """Updates and states of ``opt`` fed ``grads_seq``, the params moving as it says."""
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init_state(params)
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optim.apply_updates(params, u)
        out.append((u, state))
    return out, params


class ToyAdamState(NamedTuple):
    mu: Any
    nu: Any
    count: Any


def toy_adam(b1=0.9, b2=0.999, eps=1e-8):
    """A test-local Adam direction (no lr): nonlinear in the grads, unlike SGD."""

    def init_state(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ToyAdamState(zeros, zeros, jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        t = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        u = jax.tree.map(lambda m, v: (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps),
                         mu, nu)
        return u, ToyAdamState(mu, nu, t)

    return optim.Optimizer(init_state, update)


# --------------------------------------------------------------------------- masked


MASK = {"dense": {"w": True, "b": False}, "embed": True}


def test_masked_applies_inner_to_true_leaves_and_passes_the_others():
    params = make_params()
    g1, g2 = grads_like(params, 1), grads_like(params, 2)
    opt = masked(optim.sgd(0.1, momentum=0.9), MASK)
    state = opt.init_state(params)
    assert isinstance(state, MaskedState)
    u1, state = opt.update(g1, state, params)
    u2, state = opt.update(g2, state, params)
    # Reference: the same SGD on the masked-in leaves alone.
    sub = lambda t: {"w": t["dense"]["w"], "embed": t["embed"]}
    ref = optim.sgd(0.1, momentum=0.9)
    rs = ref.init_state(sub(params))
    r1, rs = ref.update(sub(g1), rs, sub(params))
    r2, rs = ref.update(sub(g2), rs, sub(params))
    for u, r, g in ((u1, r1, g1), (u2, r2, g2)):
        np.testing.assert_array_equal(u["dense"]["w"], r["w"])
        np.testing.assert_array_equal(u["embed"], r["embed"])
        np.testing.assert_array_equal(u["dense"]["b"], g["dense"]["b"])
    # The inner state covers the masked-in leaves only.
    trace = state.inner_state[0].trace
    assert isinstance(trace["dense"]["b"], MaskedNode)
    np.testing.assert_array_equal(trace["dense"]["w"], rs[0].trace["w"])
    assert len(jax.tree.leaves(trace)) == 2


def test_masked_takes_a_mask_function_of_the_params():
    params = make_params()
    g = grads_like(params, 1)
    seen = []

    def mask_fn(p):
        seen.append(jax.tree.structure(p))
        return jax.tree.map(lambda x: x.ndim == 2, p)

    opt = masked(optim.sgd(0.5), mask_fn)
    u, _ = opt.update(g, opt.init_state(params), params)
    assert seen and all(s == jax.tree.structure(params) for s in seen)
    np.testing.assert_allclose(u["embed"], -0.5 * g["embed"])
    np.testing.assert_array_equal(u["dense"]["b"], g["dense"]["b"])
    # Without params the function is called on the grads.
    u_np, _ = opt.update(g, opt.init_state(params))
    np.testing.assert_array_equal(u_np["embed"], u["embed"])


def test_masked_errors_name_the_key_paths():
    params = make_params()
    bad = {"dense": {"w": True}, "embed": True, "head": False}
    with pytest.raises(ValueError, match=r"masked: mask do not match the structure of params\. "
                                         r"Missing key paths in mask: dense/b\. Extra key "
                                         r"paths in mask: head"):
        masked(optim.sgd(0.1), bad).init_state(params)
    int_mask = {"dense": {"w": True, "b": 1}, "embed": False}
    with pytest.raises(TypeError, match=r"masked: mask leaves must be Python bools \(per leaf, "
                                        r"static.*\) or bool arrays \(per element\), got int "
                                        r"\(1\) at key path dense/b"):
        masked(optim.sgd(0.1), int_mask)
    with pytest.raises(TypeError, match=r"masked: opt must be an Optimizer .*got function"):
        masked(lambda g: g, MASK)
    opt = masked(optim.sgd(0.1), lambda p: jax.tree.map(lambda _: True, p))
    with pytest.raises(ValueError, match=r"masked: mask is a function of the params; pass"):
        opt.update(None, opt.init_state(params))
    drops = optim.Optimizer(lambda p: optim.EmptyState(), lambda g, s, p=None: ({}, s))
    opt = masked(drops, MASK)
    with pytest.raises(ValueError, match=r"masked: the inner optimizer returned 0 update "
                                         r"leaves for 2 gradient leaves"):
        opt.update(grads_like(params, 1), opt.init_state(params), params)


# --------------------------------------------------------------------------- partition


LABELS = {"dense": {"w": "body", "b": "head"}, "embed": "body"}


def test_partition_gives_each_group_its_optimizer():
    params = make_params()
    g1, g2 = grads_like(params, 1), grads_like(params, 2)
    opts = {"body": optim.sgd(0.1, momentum=0.9), "head": optim.sgd(1.0),
            "unused": optim.sgd(3.0, momentum=0.5)}
    for labels in (LABELS, lambda p: LABELS):
        opt = partition(opts, labels)
        state = opt.init_state(params)
        assert isinstance(state, PartitionState)
        assert sorted(state.inner_states) == ["body", "head", "unused"]
        assert jax.tree.leaves(state.inner_states["unused"][0].trace) == []
        u1, state = opt.update(g1, state, params)
        u2, state = opt.update(g2, state, params)
        np.testing.assert_allclose(u1["dense"]["w"], -0.1 * g1["dense"]["w"], rtol=1e-6)
        np.testing.assert_allclose(u2["embed"], -0.1 * (0.9 * g1["embed"] + g2["embed"]),
                                   rtol=1e-6)
        np.testing.assert_allclose(u2["dense"]["b"], -1.0 * g2["dense"]["b"], rtol=1e-6)
        body_trace = state.inner_states["body"][0].trace
        assert isinstance(body_trace["dense"]["b"], MaskedNode)
        assert len(jax.tree.leaves(body_trace)) == 2


def test_partition_errors():
    params = make_params()
    opts = {"body": optim.sgd(0.1), "head": optim.sgd(1.0)}
    labels = {"dense": {"w": "bdy", "b": "head"}, "embed": "bdy"}
    with pytest.raises(ValueError, match=r"partition: no optimizer for label 'bdy' at key "
                                         r"paths dense/w, embed\. opts_by_label has the labels "
                                         r"\['body', 'head'\]"):
        partition(opts, labels).init_state(params)
    with pytest.raises(ValueError, match=r"Missing key paths in labels: embed"):
        partition(opts, {"dense": {"w": "body", "b": "head"}}).init_state(params)
    with pytest.raises(TypeError, match=r"partition: labels leaves must be str labels .*got "
                                        r"int \(3\) at key path dense/b"):
        partition(opts, {"dense": {"w": "body", "b": 3}, "embed": "body"}).init_state(params)
    with pytest.raises(TypeError, match=r"partition: opts_by_label must be a dict .*got list"):
        partition([optim.sgd(0.1)], LABELS)
    with pytest.raises(ValueError, match=r"partition: opts_by_label is empty"):
        partition({}, LABELS)
    with pytest.raises(TypeError, match=r"partition: opts_by_label\['head'\] must be an "
                                        r"Optimizer .*got float"):
        partition({"body": optim.sgd(0.1), "head": 0.1}, LABELS)
    opt = partition(opts, LABELS)
    other = partition({"body": optim.sgd(0.1)}, {"dense": {"w": "body", "b": "body"},
                                                 "embed": "body"})
    with pytest.raises(ValueError, match=r"partition: the state has the labels \['body'\], "
                                         r"expected \['body', 'head'\]"):
        opt.update(grads_like(params, 1), other.init_state(params), params)


# --------------------------------------------------------------------------- freeze


def test_freeze_zeroes_frozen_leaves_and_keeps_no_state_for_them():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.ones(2)}
    g = {"w": jnp.full((2, 2), 3.0, jnp.bfloat16), "b": jnp.full(2, 2.0)}
    frozen = {"w": True, "b": False}
    u, state = freeze(frozen).update(g, freeze(frozen).init_state(params))
    assert state == optim.EmptyState()
    assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(u["w"], 0.0)
    np.testing.assert_array_equal(u["b"], 2.0)
    # The idiom: the optimizer sees only the trainable leaves, freeze zeroes the rest.
    opt = optim.chain(masked(optim.sgd(0.1, momentum=0.9, weight_decay=0.1),
                             {"w": False, "b": True}), freeze(frozen))
    outs, final = run(opt, params, [g, g, g], jit=False)
    np.testing.assert_array_equal(final["w"], params["w"])
    assert not np.allclose(final["b"], params["b"])
    assert len(jax.tree.leaves(outs[-1][1][0].inner_state[1].trace)) == 1


def test_freeze_errors():
    params = make_params()
    with pytest.raises(ValueError, match=r"freeze: mask do not match .*Missing key paths in "
                                         r"mask: embed"):
        freeze({"dense": {"w": True, "b": False}}).init_state(params)
    with pytest.raises(TypeError, match=r"freeze: mask leaves must be Python bools .*got "
                                        r"str \('yes'\) at key path embed"):
        freeze({"dense": {"w": True, "b": False}, "embed": "yes"}).init_state(params)


# --------------------------------------------------------------------------- element-wise masks


def elementwise_mask():
    """A mixed mask for make_params(): a jax array, a broadcast (1, n) numpy array, a bool."""
    rng = np.random.default_rng(7)
    return {"dense": {"w": jnp.asarray(rng.random((3, 2)) < 0.5), "b": False},
            "embed": np.array([[True, False, True]])}


def full_masks(mask, params):
    """Each leaf's mask as a full-shape numpy bool array."""
    return jax.tree.map(lambda m, p: np.broadcast_to(np.asarray(m), p.shape), mask, params)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_elementwise_all_true_or_all_false_equals_the_per_leaf_masks(as_array):
    params = make_params()
    params["dense"]["b"] = params["dense"]["b"].astype(jnp.bfloat16)
    g1, g2 = grads_like(params, 1), grads_like(params, 2)
    per_leaf = {"dense": {"w": True, "b": False}, "embed": True}
    arrays = jax.tree.map(lambda m, p: as_array(np.full(p.shape, m)), per_leaf, params)
    broadcast = jax.tree.map(lambda m, p: as_array(np.full((1,) * p.ndim, m)), per_leaf, params)
    for mask in (arrays, broadcast):
        # freeze: zeros where True, the gradient where False, dtypes kept (bf16 too).
        uf, sf = freeze(mask).update(g1, freeze(mask).init_state(params))
        assert sf == optim.EmptyState()
        assert_trees_equal(uf, freeze(per_leaf).update(g1, optim.EmptyState())[0])
        # masked: all-True is the inner optimizer on the leaf, all-False the gradient.
        opt, ref = masked(optim.sgd(0.1, momentum=0.9), mask), masked(
            optim.sgd(0.1, momentum=0.9), per_leaf)
        s, rs = opt.init_state(params), ref.init_state(params)
        for g in (g1, g2):
            u, s = opt.update(g, s, params)
            r, rs = ref.update(g, rs, params)
            assert_trees_equal(u, r)
        # The array-masked leaf keeps a momentum buffer, all zeros: it only saw zeros.
        trace = s.inner_state[0].trace
        assert isinstance(rs.inner_state[0].trace["dense"]["b"], MaskedNode)
        assert trace["dense"]["b"].shape == (2,)
        np.testing.assert_array_equal(trace["dense"]["b"], 0.0)
        assert_trees_equal(trace["dense"]["w"], rs.inner_state[0].trace["dense"]["w"])


def test_freeze_elementwise_zeroes_exactly_the_masked_elements():
    params = make_params()
    params["embed"] = params["embed"].astype(jnp.bfloat16)
    g = grads_like(params, 3)
    g["embed"] = g["embed"].at[0, 0].set(jnp.nan)  # frozen there: the update is 0
    mask = elementwise_mask()
    u, _ = freeze(mask).update(g, freeze(mask).init_state(params), params)
    for got, m, want in zip(jax.tree.leaves(u), jax.tree.leaves(full_masks(mask, params)),
                            jax.tree.leaves(g), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.where(m, 0.0, np.asarray(want, np.float32)))


def test_frozen_elements_stay_in_the_evaluated_params_of_ema_and_schedule_free():
    """freeze's docstring: with ema or schedule-free, the compositions it gives keep the
    frozen elements fixed in the params evaluated (ema_params, schedule_free_eval_params)
    too, not only in the trained ones."""
    p0 = {"w": jnp.array([1.0, 2.0, 3.0])}
    frozen = {"w": jnp.array([True, False, False])}
    trainable = {"w": ~frozen["w"]}
    cases = [(optim.ema(optim.chain(optim.adam(0.1), freeze(frozen)), 0.5),
              lambda s, p: optim.ema_params(s)),
             (optim.chain(masked(optim.schedule_free_adamw(0.1), trainable), freeze(frozen)),
              optim.schedule_free_eval_params)]
    for opt, evaluated in cases:
        p, s = p0, opt.init_state(p0)
        for _ in range(3):
            u, s = opt.update(jax.tree.map(lambda w: 2.0 * (w - 5.0), p), s, p)
            p = optim.apply_updates(p, u)
        for tree in (p, evaluated(s, p)):
            assert float(tree["w"][0]) == 1.0 and np.all(np.asarray(tree["w"][1:]) != [2, 3])


def test_masked_elementwise_adam_matches_a_float64_reference():
    """masked(adam) with array, broadcast and bool mask leaves, against numpy float64 written
    from Adam's rule (PyTorch's, eps outside the root) and masked's documented semantics:
    g~ = where(m, g, 0), Adam on g~, u = where(m, u', g)."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((3, 4)), "v": rng.standard_normal((2, 3)),
          "b": rng.standard_normal(4), "c": rng.standard_normal(2)}
    masks = {"w": rng.random((3, 4)) < 0.5, "v": np.array([[True, False, True]]),
             "b": True, "c": False}
    grads = [{k: rng.standard_normal(x.shape) for k, x in p0.items()} for _ in range(5)]
    full = {k: np.broadcast_to(np.asarray(m), p0[k].shape) for k, m in masks.items()}
    with jax.enable_x64(True):
        mask = {**masks, "w": jnp.asarray(masks["w"])}  # a jax array and a numpy one
        opt = masked(optim.adam(lr, b1=b1, b2=b2, eps=eps), mask)
        params = {k: jnp.asarray(x) for k, x in p0.items()}
        state = opt.init_state(params)
        p = {k: x.copy() for k, x in p0.items()}
        m = {k: np.zeros_like(x) for k, x in p0.items()}
        v = {k: np.zeros_like(x) for k, x in p0.items()}
        for t, g in enumerate(grads, start=1):
            updates, state = opt.update({k: jnp.asarray(x) for k, x in g.items()}, state,
                                        params)
            params = optim.apply_updates(params, updates)
            for k in p0:
                gk = np.where(full[k], g[k], 0.0)
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                step = -lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
                u = np.where(full[k], step, g[k])
                assert updates[k].dtype == jnp.float64
                np.testing.assert_allclose(updates[k], u, rtol=1e-12, atol=1e-15)
                p[k] = p[k] + u
        for k in p0:
            np.testing.assert_allclose(params[k], p[k], rtol=1e-12, atol=1e-15)
        adam = next(s for s in state.inner_state if isinstance(s, ScaleByAdamState))
        # The Python False leaf has no state; the array-masked leaves keep the whole leaf's,
        # with moments exactly 0 where the mask has always been False.
        assert isinstance(adam.mu["c"], MaskedNode) and isinstance(adam.nu["c"], MaskedNode)
        for k in ("w", "v", "b"):
            assert adam.mu[k].shape == p0[k].shape
            np.testing.assert_allclose(adam.mu[k], m[k], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(adam.nu[k], v[k], rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(np.asarray(adam.mu[k])[~full[k]], 0.0)
            np.testing.assert_array_equal(np.asarray(adam.nu[k])[~full[k]], 0.0)


def test_masked_elementwise_keeps_an_inf_in_a_masked_out_element_out_of_the_state():
    params = make_params()
    mask = elementwise_mask()
    full = full_masks(mask, params)
    g = grads_like(params, 4)
    out = np.argwhere(~full["dense"]["w"])[0]
    bad = jax.tree.map(lambda x: x, g)
    bad["dense"]["w"] = bad["dense"]["w"].at[tuple(out)].set(jnp.inf)
    opt = masked(toy_adam(), mask)
    u, s = opt.update(g, opt.init_state(params), params)
    ub, sb = opt.update(bad, opt.init_state(params), params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(sb))
    assert_trees_equal(sb, s)
    w, wb = np.asarray(u["dense"]["w"]), np.asarray(ub["dense"]["w"])
    np.testing.assert_array_equal(wb[full["dense"]["w"]], w[full["dense"]["w"]])
    assert wb[tuple(out)] == np.inf  # passed through, as a False leaf's gradient would be


def test_elementwise_broadcast_masks_equal_their_full_shape_masks():
    params = make_params()  # embed is (4, 3), dense/w (3, 2)
    gs = [grads_like(params, s) for s in range(3)]
    rng = np.random.default_rng(5)
    for small in ({"dense": {"w": np.array([[True, False]]), "b": np.array(True)},
                   "embed": jnp.asarray(rng.random((4, 1)) < 0.5)},
                  {"dense": {"w": jnp.array([False, True]), "b": False},
                   "embed": np.array([True, False, True])}):
        big = jax.tree.map(lambda m, p: m if isinstance(m, bool) else  # bools stay static
                           np.broadcast_to(np.asarray(m), p.shape), small, params)
        for make in (lambda m: masked(optim.sgd(0.1, momentum=0.9), m),
                     lambda m: optim.chain(optim.sgd(0.1), freeze(m))):
            outs, _ = run(make(small), params, gs, jit=False)
            refs, _ = run(make(big), params, gs, jit=False)
            for (u, s), (r, rs) in zip(outs, refs, strict=True):
                assert_trees_equal(u, r)
                assert_trees_equal(s, rs)


def pruned_problem():
    """A linear model, its data, and a (3, 2) weight with some elements pruned."""
    rng = np.random.default_rng(11)
    params = {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    alive = np.array([[True, False], [False, True], [True, True]])
    return jax.device_put((params, x, y, alive))


def mse_loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def test_elementwise_masks_under_jit_of_a_grad_step():
    params, x, y, alive = pruned_problem()

    def make(m):  # train the alive weights with Adam, keep the pruned ones where they are
        return optim.chain(masked(optim.adam(0.1), {"w": m, "b": True}),
                           freeze({"w": ~m, "b": False}))

    def step(opt, p, s):
        u, s = opt.update(jax.grad(mse_loss)(p, x, y), s, p)
        return optim.apply_updates(p, u), s

    opt = make(alive)
    captured = jax.jit(functools.partial(step, opt))  # the mask a constant of the closure
    # The mask a traced argument: the optimizer is built inside the jitted step.
    traced = jax.jit(lambda p, s, m: step(make(m), p, s))
    eager = functools.partial(step, opt)
    runs = []
    for fn in (eager, captured, lambda p, s: traced(p, s, alive)):
        p, s = params, opt.init_state(params)
        for _ in range(4):
            p, s = fn(p, s)
        runs.append((p, s))
    for p, s in runs[1:]:
        assert_trees_close(p, runs[0][0])
        assert_trees_close(s, runs[0][1])
    p = runs[0][0]
    dead = ~np.asarray(alive)
    np.testing.assert_array_equal(np.asarray(p["w"])[dead], np.asarray(params["w"])[dead])
    assert not np.allclose(np.asarray(p["w"])[~dead], np.asarray(params["w"])[~dead])
    assert mse_loss(p, x, y) < mse_loss(params, x, y)


def test_elementwise_mask_function_of_the_params_under_jit():
    params, x, y, _ = pruned_problem()
    # Arrays computed from the (traced) params: only the large weights train.
    mask_fn = lambda p: {"w": jnp.abs(p["w"]) > 0.5, "b": False}
    opt = masked(optim.sgd(0.1), mask_fn)
    g = jax.grad(mse_loss)(params, x, y)
    u, _ = jax.jit(opt.update)(g, opt.init_state(params), params)
    big = np.abs(np.asarray(params["w"])) > 0.5
    np.testing.assert_allclose(u["w"], np.where(big, -0.1 * np.asarray(g["w"]), g["w"]),
                               rtol=1e-6)
    np.testing.assert_array_equal(u["b"], g["b"])


def test_python_bool_and_numpy_bool_masks_stay_static():
    params = make_params()
    mask = {"dense": {"w": np.True_, "b": False}, "embed": jnp.ones((4, 3), bool)}
    opt = masked(optim.sgd(0.1, momentum=0.9), mask)
    trace = opt.init_state(params).inner_state[0].trace
    assert isinstance(trace["dense"]["b"], MaskedNode)  # a False leaf keeps no state
    assert trace["dense"]["w"].shape == (3, 2) and trace["embed"].shape == (4, 3)
    assert len(jax.tree.leaves(trace)) == 2


def test_elementwise_mask_errors_name_the_key_paths():
    params = make_params()
    float_mask_fn = lambda p: {"dense": {"w": True, "b": False}, "embed": jnp.zeros((4, 3))}
    for name, wrap in (("masked", lambda m: masked(optim.sgd(0.1), m)), ("freeze", freeze)):
        floats = {"dense": {"w": jnp.ones((3, 2)), "b": False}, "embed": True}
        with pytest.raises(TypeError, match=rf"{name}: the mask at key path dense/w has "
                                            r"dtype float32; use a bool array \(e\.g\. "
                                            r"mask != 0\)"):
            wrap(floats)  # at construction: the dtype needs no params
        ints = {"dense": {"w": True, "b": False}, "embed": np.ones((4, 3), np.int8)}
        with pytest.raises(TypeError, match=rf"{name}: the mask at key path embed has dtype "
                                            r"int8; use a bool array"):
            wrap(ints)
        with pytest.raises(TypeError, match=rf"{name}: the mask at key path embed has dtype "
                                            r"float32; use a bool array"):
            wrap(float_mask_fn).init_state(params)  # a function: checked when called
        for shape in ((4,), (2, 4, 3), (3, 3)):
            bad = {"dense": {"w": True, "b": False}, "embed": np.ones(shape, bool)}
            shape_re = str(shape).replace("(", r"\(").replace(")", r"\)")
            with pytest.raises(ValueError, match=rf"{name}: the mask at key path embed has "
                                                 rf"shape {shape_re}, which does not "
                                                 r"broadcast to the leaf's shape \(4, 3\)"):
                wrap(bad).init_state(params)
        wrong = {"dense": {"w": np.ones((3, 2), bool)}, "embed": True}
        with pytest.raises(ValueError, match=rf"{name}: mask do not match the structure of "
                                             r"params\. Missing key paths in mask: dense/b"):
            wrap(wrong).init_state(params)
    # Checked again in update: grads of another shape than the mask.
    opt = freeze({"w": np.ones((1, 2), bool)})
    with pytest.raises(ValueError, match=r"freeze: the mask at key path w has shape \(1, 2\), "
                                         r"which does not broadcast to the leaf's shape \(3,\)"):
        opt.update({"w": jnp.ones(3)}, optim.EmptyState())


# --------------------------------------------------------------------------- properties

SHAPES = [(), (2,), (2, 3)]
trees = st.recursive(st.integers(0, len(SHAPES) - 1),
                     lambda children: st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                                      children, min_size=1, max_size=3),
                     max_leaves=6)


@settings(max_examples=25, deadline=None)
@given(shape_tree=trees, data=st.data())
def test_masked_and_freeze_property(shape_tree, data):
    """Any mix of per-leaf bools and element-wise bool arrays: masked(sgd momentum) and
    freeze follow where(mask, ...); partition gives each label its optimizer."""
    leaves, treedef = jax.tree.flatten(shape_tree)
    rng = np.random.default_rng(len(leaves))
    mk = lambda: treedef.unflatten([jnp.asarray(rng.standard_normal(SHAPES[i]), jnp.float32)
                                    for i in leaves])
    params, g1, g2 = mk(), mk(), mk()
    masks = []
    for i in leaves:
        if data.draw(st.booleans()):
            masks.append(data.draw(st.booleans()))
        else:
            n = int(np.prod(SHAPES[i]))
            bits = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
            masks.append(jnp.asarray(np.array(bits, bool).reshape(SHAPES[i])))
    mask = treedef.unflatten(masks)
    leaves_of = treedef.flatten_up_to

    opt = masked(optim.sgd(0.1, momentum=0.9), mask)
    state = opt.init_state(params)
    u1, state = opt.update(g1, state, params)
    u2, state = opt.update(g2, state, params)
    for m, a1, a2, x1, x2 in zip(masks, leaves_of(u1), leaves_of(u2), leaves_of(g1),
                                 leaves_of(g2), strict=True):
        mm = np.broadcast_to(np.asarray(m), np.shape(x1))
        np.testing.assert_allclose(a1, np.where(mm, -0.1 * np.asarray(x1), x1), rtol=1e-6)
        np.testing.assert_allclose(a2, np.where(mm, -0.1 * (0.9 * np.asarray(x1) + x2), x2),
                                   rtol=1e-5, atol=1e-7)
    # Momentum buffers for the leaves that are not masked out whole.
    assert len(jax.tree.leaves(state.inner_state[0].trace)) == sum(m is not False
                                                                   for m in masks)

    uf, sf = freeze(mask).update(g1, freeze(mask).init_state(params), params)
    assert sf == optim.EmptyState()
    for m, a, x in zip(masks, leaves_of(uf), leaves_of(g1), strict=True):
        np.testing.assert_array_equal(a, np.where(np.asarray(m), 0.0, x))

    keep = [m is True for m in masks]  # partition's labels are per leaf
    labels = treedef.unflatten(["x" if k else "y" for k in keep])
    up, _ = partition({"x": optim.sgd(0.1), "y": freeze(True)}, labels).update(
        g1, partition({"x": optim.sgd(0.1), "y": freeze(True)}, labels).init_state(params),
        params)
    for k, a, x in zip(keep, leaves_of(up), leaves_of(g1), strict=True):
        np.testing.assert_allclose(a, -0.1 * x if k else np.zeros_like(x), rtol=1e-6)


# --------------------------------------------------------------------------- multi_steps


def linear_problem(n):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.standard_normal(n)
    return x, y  # numpy: slicing a jax array eagerly compiles a program per slice size


def mse(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam_like"])
def test_multi_steps_equals_one_step_on_the_k_times_larger_batch(inner):
    k, m, rounds = 3, 4, 4
    with jax.enable_x64(True):
        make = {"sgd_momentum": lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
                "adam_like": lambda: optim.chain(toy_adam(),
                                                 optim.scale_by_learning_rate(0.1))}[inner]
        x, y = linear_problem(k * m * rounds)
        p0 = {"w": jnp.zeros(3, jnp.float64), "b": jnp.zeros((), jnp.float64)}

        big = make()

        @jax.jit
        def big_step(p, s, xb, yb):
            u, s = big.update(jax.grad(mse)(p, xb, yb), s, p)
            return optim.apply_updates(p, u), s

        acc = multi_steps(make(), k)

        @jax.jit
        def micro_step(p, s, xb, yb):
            u, s = acc.update(jax.grad(mse)(p, xb, yb), s, p)
            return optim.apply_updates(p, u), s, u

        pb, sb = p0, big.init_state(p0)
        pm, sm = p0, acc.init_state(p0)
        for r in range(rounds):
            lo = r * k * m
            pb, sb = big_step(pb, sb, x[lo:lo + k * m], y[lo:lo + k * m])
            for j in range(k):
                before = sm
                sl = slice(lo + j * m, lo + (j + 1) * m)
                pm, sm, u = micro_step(pm, sm, x[sl], y[sl])
                assert isinstance(sm, MultiStepsState)
                if j < k - 1:  # zero updates, inner state bitwise untouched
                    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(u))
                    assert_trees_equal(sm.inner_state, before.inner_state)
                    assert int(sm.mini_step) == j + 1
            assert int(sm.mini_step) == 0 and int(sm.gradient_step) == r + 1
            assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(sm.acc_grads))
            for a, b in zip(jax.tree.leaves(pm), jax.tree.leaves(pb), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert not np.allclose(pm["w"], 0.0)


def test_multi_steps_accumulates_low_precision_grads_in_float32():
    params = {"w": jnp.zeros(2, jnp.bfloat16)}
    opt = multi_steps(optim.sgd(1.0), 4)
    state = opt.init_state(params)
    assert state.acc_grads["w"].dtype == jnp.float32
    # In bfloat16, 1 + 1/256 rounds back to 1: a bf16 sum would lose the three small grads.
    for g in (1.0, 1 / 256, 1 / 256, 1 / 256):
        u, state = opt.update({"w": jnp.full(2, g, jnp.bfloat16)}, state, params)
    assert u["w"].dtype == jnp.bfloat16
    expected = -np.asarray(jnp.asarray((1 + 3 / 256) / 4, jnp.bfloat16), np.float32)
    assert expected != -0.25
    np.testing.assert_array_equal(np.asarray(u["w"], np.float32), expected)


def test_multi_steps_every_k_1_is_the_inner_optimizer():
    params = make_params()
    gs = [grads_like(params, s) for s in range(3)]
    outs, _ = run(multi_steps(optim.sgd(0.1, momentum=0.9), 1), params, gs, jit=False)
    refs, _ = run(optim.sgd(0.1, momentum=0.9), params, gs, jit=False)
    for (u, s), (r, rs) in zip(outs, refs, strict=True):
        assert_trees_close(u, r)
        assert_trees_close(s.inner_state, rs)


def test_multi_steps_errors():
    with pytest.raises(ValueError, match=r"multi_steps: every_k must be a positive int, got 0"):
        multi_steps(optim.sgd(0.1), 0)
    with pytest.raises(TypeError,
                       match=r"multi_steps: every_k must be a positive int, got 2\.0 \(float\)"):
        multi_steps(optim.sgd(0.1), 2.0)
    with pytest.raises(TypeError,
                       match=r"multi_steps: every_k must be a positive int, got True \(bool\)"):
        multi_steps(optim.sgd(0.1), True)
    with pytest.raises(TypeError, match=r"multi_steps: opt must be an Optimizer"):
        multi_steps(0.1, 2)
    params = make_params()
    opt = multi_steps(optim.sgd(0.1), 2)
    with pytest.raises(ValueError, match=r"multi_steps\.update: grads do not match .*Missing "
                                         r"key paths in grads: embed"):
        opt.update({"dense": params["dense"]}, opt.init_state(params), params)


# --------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_skips_bitwise_and_counts():
    params = make_params()
    params["dense"]["b"] = params["dense"]["b"].astype(jnp.bfloat16)
    opt = apply_if_finite(optim.sgd(0.1, momentum=0.9), max_consecutive_errors=2)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    p, s = params, opt.init_state(params)
    assert isinstance(s, ApplyIfFiniteState)
    for seed in (1, 2):
        p, s = step(p, s, grads_like(params, seed))
    assert bool(s.last_finite) and int(s.notfinite_count) == 0
    bad_leaf = [np.inf, np.nan, -np.inf]
    for i, bad in enumerate(bad_leaf[:2]):
        g = grads_like(params, 10 + i)
        g["embed"] = g["embed"].at[1, 2].set(bad)
        p2, s2 = step(p, s, g)
        assert_trees_equal(p2, p)
        assert_trees_equal(s2.inner_state, s.inner_state)
        assert not bool(s2.last_finite)
        assert int(s2.notfinite_count) == i + 1 and int(s2.total_notfinite) == i + 1
        p, s = p2, s2
    # A third non-finite step in a row is more than max_consecutive_errors=2: applied anyway.
    g = grads_like(params, 20)
    g["dense"]["b"] = g["dense"]["b"].at[0].set(-np.inf)
    p3, s3 = step(p, s, g)
    assert int(s3.notfinite_count) == 3 and int(s3.total_notfinite) == 3
    assert not np.isfinite(np.asarray(p3["dense"]["b"], np.float32)[0])
    assert int(s3.inner_state[0].count) == int(s.inner_state[0].count) + 1
    # A finite step resets the consecutive count, not the total.
    _, s4 = step(p, s3, grads_like(params, 21))
    assert bool(s4.last_finite) and int(s4.notfinite_count) == 0
    assert int(s4.total_notfinite) == 3


def test_apply_if_finite_errors():
    with pytest.raises(ValueError, match=r"apply_if_finite: max_consecutive_errors must be "
                                         r"an int >= 0, got -1"):
        apply_if_finite(optim.sgd(0.1), -1)
    with pytest.raises(TypeError, match=r"apply_if_finite: max_consecutive_errors must be an "
                                        r"int >= 0, got 1\.5 \(float\)"):
        apply_if_finite(optim.sgd(0.1), 1.5)
    with pytest.raises(TypeError, match=r"apply_if_finite: opt must be an Optimizer"):
        apply_if_finite("sgd", 3)


# --------------------------------------------------------------------------- jit == no jit


WRAPPED = {
    "masked": lambda: masked(optim.sgd(0.1, momentum=0.9), MASK),
    "partition": lambda: partition({"body": optim.sgd(0.1, momentum=0.9),
                                    "head": freeze(True)}, LABELS),
    "freeze": lambda: optim.chain(optim.sgd(0.1), freeze(MASK)),
    "masked_elementwise": lambda: masked(optim.sgd(0.1, momentum=0.9), elementwise_mask()),
    "freeze_elementwise": lambda: optim.chain(optim.sgd(0.1), freeze(elementwise_mask())),
    "multi_steps": lambda: multi_steps(optim.sgd(0.1, momentum=0.9), 2),
    "apply_if_finite": lambda: apply_if_finite(optim.sgd(0.1, momentum=0.9), 1),
    "inject_hyperparams": lambda: inject_hyperparams(optim.sgd, static_args=("momentum",))(
        learning_rate=lambda t: 0.1 / (1.0 + t), momentum=0.9),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_jit_and_no_jit_agree(name):
    params = make_params()
    gs = [grads_like(params, s) for s in range(4)]
    if name == "apply_if_finite":  # one skipped step, one applied anyway
        gs[2]["embed"] = gs[2]["embed"].at[0, 0].set(np.nan)
        gs[3]["embed"] = gs[3]["embed"].at[1, 0].set(np.inf)
    eager, p_eager = run(WRAPPED[name](), params, gs, jit=False)
    jitted, p_jit = run(WRAPPED[name](), params, gs, jit=True)
    for (ue, se), (uj, sj) in zip(eager, jitted, strict=True):
        assert_trees_close(ue, uj)
        assert_trees_close(se, sj)
    assert_trees_close(p_eager, p_jit)


# --------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_changing_the_lr_does_not_recompile():
    params = make_params()
    g = grads_like(params, 1)
    opt = inject_hyperparams(optim.sgd)(learning_rate=0.1)
    traces = 0

    def step(p, s, g):
        nonlocal traces
        traces += 1
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s, u

    step = jax.jit(step)
    state = opt.init_state(params)
    assert isinstance(state, InjectHyperparamsState)
    lr0 = state.hyperparams["learning_rate"]
    assert lr0.dtype == jnp.float32 and lr0.shape == ()
    np.testing.assert_allclose(lr0, 0.1)
    for lr in (0.1, 0.01, 0.5, 0.002):  # the first, then three changes
        state = state._replace(hyperparams={**state.hyperparams,
                                            "learning_rate": jnp.asarray(lr)})
        params, state, u = step(params, state, g)
        np.testing.assert_allclose(u["embed"], -lr * g["embed"], rtol=1e-6)
        np.testing.assert_allclose(state.hyperparams["learning_rate"], lr, rtol=1e-7)
    assert traces == 1
    assert int(state.count) == 4


def sgd_trajectory_pair(opt, ref, jit, *, same_state=True):
    """Run the injected ``opt`` and the plain ``ref`` side by side; compare updates, states.

    With a scheduled lr the states differ in structure (the injected factory gets an array,
    not a schedule, so it keeps no lr step count); then only the momentum buffers compare.
    """
    params = make_params()
    gs = [grads_like(params, s) for s in range(4)]
    outs, _ = run(opt, params, gs, jit=jit)
    refs, _ = run(ref, params, gs, jit=jit)
    for (u, s), (r, rs) in zip(outs, refs, strict=True):
        assert_trees_close(u, r)
        if same_state:
            assert_trees_close(s.inner_state, rs)
        else:
            assert_trees_close(s.inner_state[0].trace, rs[0].trace)
    return outs


def test_inject_hyperparams_plain_sgd_matches_sgd_jitted():
    sgd_trajectory_pair(inject_hyperparams(optim.sgd)(learning_rate=0.1), optim.sgd(0.1),
                        jit=True)


def test_inject_hyperparams_momentum_matches_sgd_without_jit():
    outs = sgd_trajectory_pair(inject_hyperparams(optim.sgd)(learning_rate=0.05, momentum=0.9),
                               optim.sgd(0.05, momentum=0.9), jit=False)
    np.testing.assert_allclose(outs[-1][1].hyperparams["momentum"], 0.9)


def test_inject_hyperparams_momentum_matches_sgd_jitted():
    sgd_trajectory_pair(inject_hyperparams(optim.sgd)(learning_rate=0.05, momentum=0.9),
                        optim.sgd(0.05, momentum=0.9), jit=True)


def test_inject_hyperparams_static_args_and_schedules():
    schedule = lambda t: 0.1 * 0.5 ** t
    opt = inject_hyperparams(optim.sgd, static_args=("momentum",))(schedule, momentum=0.9,
                                                                   nesterov=True)
    params = make_params()
    state = opt.init_state(params)
    assert sorted(state.hyperparams) == ["learning_rate"]  # momentum static, nesterov a bool
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1)
    outs = sgd_trajectory_pair(opt, optim.sgd(schedule, momentum=0.9, nesterov=True),
                               jit=True, same_state=False)
    for t, (_, s) in enumerate(outs):
        np.testing.assert_allclose(s.hyperparams["learning_rate"], schedule(t), rtol=1e-6)
        assert s.hyperparams["learning_rate"].dtype == jnp.float32


def test_inject_hyperparams_keeps_dtypes_static_and_injects_what_jit_reads():
    """A dtype class is no schedule (mu_dtype=jnp.bfloat16 once became a float); an
    injected adagrad lr_decay and ema decay work under jit, as injected arrays must."""
    params = make_params()
    opt = inject_hyperparams(optim.adam)(learning_rate=1e-3, mu_dtype=jnp.bfloat16)
    state = opt.init_state(params)
    assert sorted(state.hyperparams) == ["learning_rate"]
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state.inner_state[0].mu))
    grads = jax.tree.map(jnp.ones_like, params)
    for injected, plain in [
            (inject_hyperparams(optim.adagrad)(0.1, lr_decay=0.5), optim.adagrad(0.1, 0.5)),
            (inject_hyperparams(optim.ema)(optim.sgd(0.1), decay=0.5),
             optim.ema(optim.sgd(0.1), 0.5))]:
        s, ref = injected.init_state(params), plain.init_state(params)
        for _ in range(2):
            u, s = jax.jit(injected.update)(grads, s, params)
            want, ref = plain.update(grads, ref, params)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 optim.ema_params(s), optim.ema_params(ref))


def test_inject_hyperparams_errors():
    with pytest.raises(TypeError, match=r"inject_hyperparams: factory must be a callable"):
        inject_hyperparams(optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"inject_hyperparams\(sgd\): static_args must be a "
                                        r"tuple of argument names, got the str 'momentum'"):
        inject_hyperparams(optim.sgd, static_args="momentum")
    with pytest.raises(TypeError, match=r"inject_hyperparams\(sgd\): static_args must hold "
                                        r"argument names \(str\), got int \(1\)"):
        inject_hyperparams(optim.sgd, static_args=(1,))
    with pytest.raises(ValueError, match=r"inject_hyperparams\(sgd\): static_args names "
                                         r"\['lr'\] that sgd does not take"):
        inject_hyperparams(optim.sgd, static_args=("lr",))
    with pytest.raises(ValueError, match=r"sgd: momentum must be >= 0\.0, got -1"):
        inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=-1.0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lr'"):
        inject_hyperparams(optim.sgd)(lr=0.1)
    # a mask function is no schedule: injected, it got the count and silently decayed
    # nothing (bare-array params) or failed later with a structure error
    decay_matrices = optim.labels_to_mask(lambda path, p: p.ndim > 1)
    with pytest.raises(TypeError, match=r"inject_hyperparams\(adamw\): mask is a schedule; it "
                                        r"must return a real number, got dtype bool at count 0; "
                                        r"if mask is not a schedule, pass "
                                        r"static_args=\('mask',\)"):
        inject_hyperparams(optim.adamw)(0.1, weight_decay=0.5, mask=decay_matrices)
    inject_hyperparams(optim.adamw, static_args=("mask",))(0.1, mask=decay_matrices)
    # an int setting, injected as a float array, is refused: say to keep it static
    with pytest.raises(TypeError, match=r"schedule_free_adamw: warmup_steps must be an int >= "
                                        r"0, got Array\(2\., .*; inject_hyperparams injects "
                                        r"numbers as float arrays: pass "
                                        r"static_args=\('warmup_steps',\) to keep warmup_steps "
                                        r"an int"):
        inject_hyperparams(optim.schedule_free_adamw)(1e-3, warmup_steps=2)
    inject_hyperparams(optim.schedule_free_adamw, static_args=("warmup_steps",))(
        1e-3, warmup_steps=2)
    inject_hyperparams(optim.sgd)(learning_rate=1, momentum=0)  # ints that are floats: fine
    opt = inject_hyperparams(optim.sgd)(learning_rate=0.1)
    params = make_params()
    state = opt.init_state(params)
    state = state._replace(hyperparams={**state.hyperparams, "lr": jnp.asarray(0.2)})
    with pytest.raises(ValueError, match=r"inject_hyperparams\(sgd\): state\.hyperparams has "
                                         r"the keys \['learning_rate', 'lr'\], expected "
                                         r"\['learning_rate'\]"):
        opt.update(grads_like(params, 0), state, params)


# --------------------------------------------------------------------------- composition, optax


def test_wrappers_compose_under_jit():
    params = make_params()
    opt = apply_if_finite(multi_steps(masked(optim.sgd(0.1, momentum=0.9), MASK), 2), 3)
    gs = [grads_like(params, s) for s in range(4)]
    gs[1]["dense"]["w"] = gs[1]["dense"]["w"].at[0, 0].set(np.nan)  # skipped entirely
    outs, final = run(opt, params, gs, jit=True)
    assert [int(s.inner_state.mini_step) for _, s in outs] == [1, 1, 0, 1]
    assert int(outs[-1][1].total_notfinite) == 1
    mean = jax.tree.map(lambda a, b: (a + b) / 2, gs[0], gs[2])
    u = outs[2][0]
    np.testing.assert_allclose(u["embed"], -0.1 * mean["embed"], rtol=1e-6)
    np.testing.assert_allclose(u["dense"]["b"], mean["dense"]["b"], rtol=1e-6)


def test_matches_optax():
    optax = pytest.importorskip("optax")
    params = make_params()
    gs = [grads_like(params, s) for s in range(6)]
    bad = [dict(g) for g in gs]  # inf in steps 3 and 4: skipped once, then applied anyway
    for i in (3, 4):
        bad[i]["embed"] = bad[i]["embed"].at[0, 0].set(np.inf)
    pairs = [
        (masked(optim.sgd(0.1, momentum=0.9), MASK),
         optax.masked(optax.sgd(0.1, momentum=0.9), MASK)),
        (multi_steps(optim.sgd(0.1, momentum=0.9), 3),
         optax.MultiSteps(optax.sgd(0.1, momentum=0.9), 3).gradient_transformation()),
        (apply_if_finite(optim.sgd(0.1, momentum=0.9), 1),
         optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 1), bad),
        (inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9),
         optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)),
    ]
    for ours, theirs, *seq in pairs:
        s_ours, s_theirs, p = ours.init_state(params), theirs.init(params), params
        for g in (seq[0] if seq else gs):
            u, s_ours = ours.update(g, s_ours, p)
            r, s_theirs = theirs.update(g, s_theirs, p)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         u, r)
            p = optim.apply_updates(p, u)


# --------------------------------------------------------------------------- ema


def test_ema_follows_a_float64_reference():
    """e_0 = p_0, e_t = d e_{t-1} + (1 - d) p_t over Adam's params (torch's EMA convention),
    against numpy float64 with a hand-written Adam; the updates pass through unchanged."""
    decay, lr, b1, b2, eps = 0.9, 0.1, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    grads = rng.standard_normal((6, 5))
    with jax.enable_x64(True):
        opt = optim.ema(optim.adam(lr, b1=b1, b2=b2, eps=eps), decay=decay)
        params = {"w": jnp.asarray(p0)}
        state = opt.init(params)
        plain = optim.adam(lr, b1=b1, b2=b2, eps=eps)
        plain_state = plain.init(params)
        p, m, v, e = p0.copy(), np.zeros(5), np.zeros(5), p0.copy()
        for t, g in enumerate(grads, start=1):
            updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
            plain_updates, plain_state = plain.update({"w": jnp.asarray(g)}, plain_state, params)
            np.testing.assert_array_equal(updates["w"], plain_updates["w"])
            params = optim.apply_updates(params, updates)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            e = decay * e + (1 - decay) * p
            np.testing.assert_allclose(optim.ema_params(state)["w"], e, rtol=1e-12)
        np.testing.assert_allclose(params["w"], p, rtol=1e-12)


def test_ema_keeps_float32_for_low_precision_params_and_casts_back_for_a_train_state():
    from funtrain import train

    params = {"w": jnp.ones(3, jnp.bfloat16)}
    opt = optim.ema(optim.sgd(0.1))
    state = train.TrainState.create(params, opt, jax.random.key(0))
    assert state.opt_state.ema["w"].dtype == jnp.float32
    assert optim.ema_params(state)["w"].dtype == jnp.bfloat16
    assert optim.ema_params(state.opt_state)["w"].dtype == jnp.float32


def test_ema_params_of_an_ema_inside_partition_fills_in_the_other_params():
    from funtrain import train

    params = {"body": jnp.ones(3), "head": jnp.ones(2)}
    opt = optim.partition({"train": optim.ema(optim.adam(0.1), 0.5), "frozen": optim.freeze(True)},
                          {"body": "frozen", "head": "train"})
    state = train.TrainState.create(params, opt, jax.random.key(0))
    grads = {"body": jnp.ones(3), "head": jnp.ones(2)}
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    state = state._replace(params=optim.apply_updates(state.params, updates), opt_state=opt_state)
    got = optim.ema_params(state)
    np.testing.assert_array_equal(got["body"], state.params["body"])  # frozen: as they are
    # one step of adam at lr 0.1 moves head by -0.1; the average: 0.5 * 1 + 0.5 * 0.9
    np.testing.assert_allclose(got["head"], np.full(2, 0.95), rtol=1e-6)
    with pytest.raises(ValueError, match=r"ema_params: this ema averages some leaves only .*"
                                         r"pass the TrainState"):
        optim.ema_params(state.opt_state)


def test_ema_errors():
    with pytest.raises(ValueError, match=r"ema: decay must be a float in \[0, 1\), got 1.0"):
        optim.ema(optim.sgd(0.1), decay=1.0)
    with pytest.raises(TypeError, match="ema: opt must be an Optimizer"):
        optim.ema("adam")
    with pytest.raises(ValueError, match="ema_params: expected the state of one optim.ema"):
        optim.ema_params(optim.sgd(0.1).init({"w": jnp.ones(2)}))


def test_injected_hyperparams_finds_the_one_injected_optimizer():
    params = {"w": jnp.ones(3)}
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.inject_hyperparams(optim.adamw)(learning_rate=0.01))
    state = opt.init_state(params)
    _, state = opt.update({"w": jnp.ones(3)}, state, params)
    found = optim.injected_hyperparams(state)
    assert float(found["learning_rate"]) == pytest.approx(0.01)
    assert optim.injected_hyperparams(optim.sgd(0.1).init_state(params)) == {}
    two = optim.partition({"a": optim.inject_hyperparams(optim.sgd)(learning_rate=0.1),
                           "b": optim.inject_hyperparams(optim.sgd)(learning_rate=0.2)},
                          {"w": "a", "v": "b"})
    assert optim.injected_hyperparams(two.init_state({"w": jnp.ones(2), "v": jnp.ones(2)})) == {}
