"""Optimizer protocol, chain, apply_updates, and interop with optax and flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim


def params():
    return {"dense_0": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}


def test_init_is_init_state():
    opt = optim.sgd(0.1)
    assert opt.init is opt.init_state
    init, update = opt  # the optax protocol unpacks as a pair
    assert init is opt.init_state and update is opt.update


def test_chain_applies_in_order():
    p = params()
    g = jax.tree.map(jnp.ones_like, p)
    opt = optim.chain(optim.scale(2.0), optim.scale_by_learning_rate(0.5))
    u, state = opt.update(g, opt.init_state(p), p)
    np.testing.assert_allclose(u["dense_0"]["w"], -1.0)
    assert isinstance(state, tuple) and len(state) == 2


def test_chain_rejects_foreign_state():
    p = params()
    opt = optim.sgd(0.1, momentum=0.9, weight_decay=1e-4)
    other = optim.sgd(0.1)
    with pytest.raises(ValueError, match=r"chain: expected a state tuple of 3 entries .*got "
                                         r"tuple of length 1"):
        opt.update(jax.tree.map(jnp.ones_like, p), other.init_state(p), p)


def test_apply_updates_keeps_dtype_and_names_key_paths():
    p = {"w": jnp.ones(3, jnp.bfloat16), "n": jnp.zeros(2, jnp.float16)}
    u = {"w": jnp.full(3, 1e-3, jnp.float32), "n": jnp.ones(2, jnp.float32)}
    new = optim.apply_updates(p, u)
    assert new["w"].dtype == jnp.bfloat16 and new["n"].dtype == jnp.float16
    with pytest.raises(ValueError, match=r"Missing key paths in updates: n\. Extra key paths in "
                                         r"updates: m"):
        optim.apply_updates(p, {"w": u["w"], "m": u["n"]})


def test_trace_rejects_grads_of_another_structure():
    p = params()
    opt = optim.sgd(0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"Missing key paths in grads: dense_0/b"):
        opt.update({"dense_0": {"w": jnp.ones((2, 3))}}, opt.init_state(p), p)


def test_weight_decay_needs_params_and_honours_mask():
    p = params()
    g = jax.tree.map(jnp.zeros_like, p)
    opt = optim.add_decayed_weights(0.1, mask=optim.labels_to_mask(lambda path, x: x.ndim > 1))
    with pytest.raises(ValueError, match="add_decayed_weights: needs the current params"):
        opt.update(g, opt.init_state(p))
    u, _ = opt.update(g, opt.init_state(p), p)
    np.testing.assert_allclose(u["dense_0"]["w"], 0.1)
    np.testing.assert_allclose(u["dense_0"]["b"], 0.0)


def test_global_norm():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]], jnp.bfloat16)}
    assert float(optim.global_norm(tree)) == 5.0
    # a complex leaf counts |z|^2 (optax.global_norm's convention), so the norm is real
    norm = optim.global_norm({"z": jnp.array([1j, 2.0 + 2j]), "a": jnp.array([4.0])})
    assert not jnp.iscomplexobj(norm) and float(norm) == 5.0


def test_runs_inside_optax_chain():
    optax = pytest.importorskip("optax")
    p = params()
    g = jax.tree.map(jnp.ones_like, p)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9))
    state = tx.init(p)
    u, state = tx.update(g, state, p)
    # Reference: optax clip, then our SGD alone on the clipped grads (clipped in numpy).
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
    clipped = jax.tree.map(lambda x: jax.device_put(np.asarray(x) / norm), g)
    ours = optim.sgd(0.1, momentum=0.9)
    ref, _ = ours.update(clipped, ours.init_state(p), p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, ref)
    # And in the other direction, optax's transforms and ours give the same SGD.
    ox = optax.sgd(0.1, momentum=0.9)
    u_optax, _ = ox.update(g, ox.init(p), p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 ours.update(g, ours.init_state(p), p)[0], u_optax)


def test_runs_in_flax_train_state():
    pytest.importorskip("flax")
    from flax.training import train_state

    from funtrain import nn

    model = nn.mlp([8, 2])
    x, y = np.ones((4, 4), np.float32), np.zeros((4, 2), np.float32)
    # Random params from numpy in the model's shapes (an eager init compiles every op).
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape, s.dtype)),
                     jax.eval_shape(model.init, jax.random.key(0), x[:1]))
    state = train_state.TrainState.create(apply_fn=model.apply, params=p,
                                          tx=optim.sgd(0.1, momentum=0.9))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda q: jnp.mean((state.apply_fn(q, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    opt = optim.sgd(0.1, momentum=0.9)

    @jax.jit  # the reference as one program: run eagerly, each of its ops would compile
    def ref_step(q, s):
        g = jax.grad(lambda q: jnp.mean((model.apply(q, x) - y) ** 2))(q)
        u, s = opt.update(g, s, q)
        return optim.apply_updates(q, u), s

    ref_p, ref_s = p, opt.init_state(p)
    for _ in range(5):
        state = step(state)
        ref_p, ref_s = ref_step(ref_p, ref_s)
    assert int(state.step) == 5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, ref_p)


def test_clip_by_global_norm_with_non_finite_grads_is_torchs():
    # as its docstring says, and as torch.nn.utils.clip_grad_norm_ gives
    nan, inf = float("nan"), float("inf")
    for max_norm, grad, want in ((1.0, [nan, 1.0], [nan, nan]), (1.0, [inf, 1.0], [nan, 0.0]),
                                 (inf, [inf, 1.0], [nan, nan])):
        opt = optim.clip_by_global_norm(max_norm)
        grads = {"a": jnp.array(grad)}
        np.testing.assert_array_equal(opt.update(grads, opt.init_state(grads))[0]["a"], want)
