"""funtrain.sparsity: mask makers against numpy references, the cubic schedule against its
formula, pruned weights exactly 0 through AdamW with weight decay, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, optim, sparsity, train

MODEL = nn.mlp([32, 10])
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 16)))


def test_magnitude_per_layer_prunes_exactly_the_smallest():
    masks = sparsity.magnitude(PARAMS, 0.75)
    for layer in ("dense_0", "dense_1"):
        w = np.abs(np.asarray(PARAMS[layer]["w"])).ravel()
        k = int(np.floor(0.75 * w.size))
        want = np.ones(w.size, bool)
        want[np.argsort(w, kind="stable")[:k]] = False
        np.testing.assert_array_equal(np.asarray(masks[layer]["w"]).ravel(), want)
        assert bool(masks[layer]["b"].all())  # biases stay dense


def test_magnitude_global_uses_one_threshold():
    masks = sparsity.magnitude(PARAMS, 0.5, scope="global")
    kept = np.concatenate([np.abs(np.asarray(PARAMS[k]["w"]))[np.asarray(masks[k]["w"])]
                           for k in ("dense_0", "dense_1")])
    pruned = np.concatenate([np.abs(np.asarray(PARAMS[k]["w"]))[~np.asarray(masks[k]["w"])]
                             for k in ("dense_0", "dense_1")])
    assert pruned.max() <= kept.min()
    assert pruned.size == int(0.5 * (16 * 32 + 32 * 10))


def test_random_masks_have_the_exact_count():
    masks = sparsity.random(PARAMS, 0.9, jax.random.key(0))
    assert int((~masks["dense_0"]["w"]).sum()) == int(0.9 * 16 * 32)


@pytest.mark.parametrize("share, size", [(0.53, 100), (0.21, 300), (0.59, 3000)])
def test_the_count_is_the_decimal_share(share, size):
    """0.53 of 100 weights is 53, as a float or traced (float32 0.53 * 100 is 52.99999)."""
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(size), jnp.float32)}
    jitted = jax.jit(sparsity.magnitude)
    for masks in (sparsity.magnitude(params, share), jitted(params, share),
                  sparsity.random(params, share, jax.random.key(0))):
        assert int((~masks["w"]).sum()) == round(share * size)


def test_a_traced_share_counts_exactly_in_large_layers():
    """The count a traced (float32) share gives, as pruned() passes it: the decimal share's
    for layers up to 2^21 weights, and never past floor(share * n) + 1 of the float32 share
    beyond (the float32 resolution). A margin of n * 2^-20 once pruned 2 extra of 2^21."""
    from fractions import Fraction

    from funtrain.sparsity import _traced_count

    shares = [0.0, 0.1, 0.3, 0.5, 0.53, 0.75, 0.9, 0.999, 0.59, 0.21]
    for n in [1, 100, 4097, 10**6, 2**21, 2**24 + 5, 2**30]:
        counts = jax.jit(jax.vmap(_traced_count, (0, None)), static_argnums=1)(
            jnp.asarray(shares, jnp.float32), n)
        for share, got in zip(shares, counts.tolist(), strict=True):
            decimal = int(Fraction(repr(share)) * n)  # floor
            if n <= 2**21:
                assert got == decimal, (n, share, got)
            else:
                exact = int(Fraction(float(np.float32(share))) * n)
                assert exact <= got <= exact + 1, (n, share, got)
    n = 2**20  # the whole path, under jit, on a layer where n * 2^-20 is a whole weight
    w = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(n), jnp.float32)}
    assert int((~jax.jit(sparsity.magnitude)(w, 0.9)["w"]).sum()) == int(0.9 * n)


def test_two_four_groups_a_conv_kernel_along_its_inputs_by_default():
    # the default axis was 0: a conv's kernel height (kh = 4 grouped space silently)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 8, 5)), jnp.float32)
    keep = np.asarray(sparsity.n_m({"conv": {"w": w}}, 2, 4)["conv"]["w"])
    assert (keep.reshape(4, 3, 2, 4, 5).sum(axis=3) == 2).all()
    np.testing.assert_array_equal(keep, np.asarray(
        sparsity.n_m({"conv": {"w": w}}, 2, 4, axis=2)["conv"]["w"]))


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    masks = np.asarray(sparsity.n_m(PARAMS, 2, 4)["dense_0"]["w"])  # (16, 32): axis 0 inputs
    w = np.abs(np.asarray(PARAMS["dense_0"]["w"]))
    for g in range(4):
        block, keep = w[4 * g:4 * g + 4], masks[4 * g:4 * g + 4]
        assert (keep.sum(axis=0) == 2).all()
        top2 = np.sort(block, axis=0)[2:]
        np.testing.assert_array_equal(np.sort(block * keep, axis=0)[2:], top2)


def test_schedule_follows_zhu_and_gupta():
    s = sparsity.polynomial_schedule(0.1, 0.9, begin_step=100, end_step=500, frequency=50)
    for t in (0, 100, 149, 150, 300, 499, 500, 900):
        last = min(max(t, 100), 500)
        last = 100 + (last - 100) // 50 * 50
        want = 0.9 + (0.1 - 0.9) * (1 - (last - 100) / 400) ** 3
        np.testing.assert_allclose(float(s(t)), want, rtol=1e-6)
    assert [bool(s.due(t)) for t in (99, 100, 120, 150, 500, 550)] == [
        False, True, False, True, True, False]
    at_once = sparsity.polynomial_schedule(0.0, 0.9, begin_step=100, end_step=100)
    assert [float(at_once(t)) for t in (99, 100, 200)] == pytest.approx([0.0, 0.9, 0.9])


def test_pruned_weights_stay_exactly_zero_through_adamw_with_weight_decay():
    """200 AdamW steps with weight decay under gradual pruning to 80%: every masked weight
    is exactly 0.0 (momentum, moments and decay cannot revive it)."""
    rng = np.random.default_rng(1)  # numpy inputs: no threefry programs to compile
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    opt = sparsity.pruned(optim.adamw(1e-2, weight_decay=0.1),
                          sparsity.polynomial_schedule(0.0, 0.8, begin_step=0, end_step=100,
                                                       frequency=20))
    state = train.TrainState.create(PARAMS, opt, jax.random.key(3))
    step = train.make_train_step(train.classifier_loss(MODEL), opt)
    first = None
    for _ in range(200):
        state, metrics = step(state, {"x": x, "y": y})
        first = first if first is not None else float(metrics["loss"])
    masks = state.opt_state.masks
    for m, w in zip(jax.tree.leaves(masks), jax.tree.leaves(state.params), strict=True):
        assert (np.asarray(w)[~np.asarray(m)] == 0.0).all()
    report = sparsity.summary(state.params)
    assert report["layers"]["dense_0/w"] == pytest.approx(0.8, abs=2 / 512)
    assert float(metrics["loss"]) < first


def test_fixed_masks_prune_at_the_first_update():
    masks = sparsity.n_m(PARAMS, 2, 4)
    opt = sparsity.pruned(optim.sgd(0.1, momentum=0.9), masks=masks)
    state = opt.init_state(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, state = jax.jit(opt.update)(grads, state, PARAMS)
    new = optim.apply_updates(PARAMS, updates)
    assert sparsity.summary(new)["layers"]["dense_0/w"] == 0.5


def test_given_masks_stay_pruned_under_a_schedule_below_them():
    # masks at 50% (N:M) with a schedule starting at 0%: the first scheduled step rebuilt
    # the masks from magnitude alone, and every given pruned weight came back to life
    masks = sparsity.n_m(PARAMS, 2, 4)
    opt = sparsity.pruned(optim.sgd(0.1), sparsity.polynomial_schedule(
        0.0, 0.9, begin_step=0, end_step=100, frequency=10), masks=masks)
    params = sparsity.apply_masks(PARAMS, masks)
    state = opt.init_state(params)
    update = jax.jit(opt.update)
    for _ in range(3):
        updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
        params = optim.apply_updates(params, updates)
    for given, now, w in zip(jax.tree.leaves(masks), jax.tree.leaves(state.masks),
                             jax.tree.leaves(params), strict=True):
        assert not (np.asarray(now) & ~np.asarray(given)).any()
        assert (np.asarray(w)[~np.asarray(given)] == 0.0).all()


def test_schedule_free_evaluation_params_are_as_sparse_as_the_params():
    """schedule_free_adamw evaluates at x = (y - (1 - b1) z) / b1: its z is zeroed where
    pruned, or x (what fit evaluates and one exports) would be dense."""
    masks = sparsity.n_m(PARAMS, 2, 4)
    opt = sparsity.pruned(optim.schedule_free_adamw(1e-2), masks=masks)
    params, state = PARAMS, opt.init_state(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for _ in range(3):
        updates, state = jax.jit(opt.update)(grads, state, params)
        params = optim.apply_updates(params, updates)
    x = optim.schedule_free_eval_params(state, params)
    assert sparsity.summary(x)["layers"]["dense_0/w"] == 0.5
    kept = np.asarray(masks["dense_0"]["w"])
    assert (np.asarray(x["dense_0"]["w"])[~kept] == 0).all()
    assert (np.asarray(x["dense_0"]["w"])[kept] != np.asarray(params["dense_0"]["w"])[kept]).any()


def test_the_ema_of_pruned_params_is_as_sparse():
    """pruned(ema(opt)): the average ema_params gives (what fit evaluates and one exports)
    is zeroed where pruned too; it was dense."""
    masks = sparsity.n_m(PARAMS, 2, 4)
    opt = sparsity.pruned(optim.ema(optim.adamw(1e-2, weight_decay=0.1), 0.9), masks=masks)
    params, state = PARAMS, opt.init_state(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for _ in range(3):
        updates, state = jax.jit(opt.update)(grads, state, params)
        params = optim.apply_updates(params, updates)
    average = optim.ema_params(state)
    kept = np.asarray(masks["dense_0"]["w"])
    assert (np.asarray(average["dense_0"]["w"])[~kept] == 0).all()
    assert sparsity.summary(average)["layers"]["dense_0/w"] == 0.5


@pytest.mark.parametrize("call, message", [
    (lambda: sparsity.polynomial_schedule(0.8, 0.2),
     "final_sparsity must be >= initial_sparsity (pruning only removes weights), got 0.8"),
    (lambda: sparsity.apply_masks(PARAMS, {**sparsity.magnitude(PARAMS, 0.5),
                                           "dense_1": {"w": jnp.ones((3, 3), bool),
                                                       "b": jnp.ones(10, bool)}}),
     "key path 'dense_1/w': mask of shape (3, 3) for a param of shape (32, 10)"),
    (lambda: sparsity.n_m({"conv": {"w": jnp.ones((3, 3, 6, 8))}}, 2, 4, axis=-2),
     "key path 'conv/w' has shape (3, 3, 6, 8): its axis -2 (6) is not divisible by m=4"),
    (lambda: sparsity.n_m({"w": jnp.ones((8, 4))}, 2, 4, axis=3),  # once wrapped to axis 1
     "key path 'w' has shape (8, 4): axis 3 is out of range for 2 dimensions"),
    (lambda: sparsity.magnitude(PARAMS, 1.5), "sparsity must be in [0, 1), got 1.5"),
    (lambda: sparsity.polynomial_schedule(0.0, 0.9, begin_step=10, end_step=5),
     "need begin_step <= end_step"),
    (lambda: sparsity.pruned(optim.sgd(0.1)), "give a schedule"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_fused_params_are_a_clear_error():
    from funtrain import quant

    fused = optim.fuse(PARAMS)
    with pytest.raises(TypeError, match="params are fused"):
        sparsity.magnitude(fused, 0.5)
    with pytest.raises(TypeError, match="params are fused"):
        sparsity.apply_masks(fused, sparsity.magnitude(PARAMS, 0.5))
    # quantized kernels match no kernel path: the masks were all-True, pruning nothing
    with pytest.raises(TypeError, match=r"params are quantized \(quant.quantize\); prune "
                                        r"the float params first"):
        sparsity.magnitude(quant.quantize(PARAMS), 0.5)
    with pytest.raises(TypeError, match="params are fused"):
        sparsity.pruned(optim.sgd(0.1), sparsity.polynomial_schedule()).init_state(fused)
    with pytest.raises(TypeError, match="quantize params.unflatten"):
        quant.quantize(fused)
