"""Gradient checkpointing: exact gradients, real memory savings, flat compile, clear errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, optim, profile, remat, train


def assert_tree_close(a, b, rtol=1e-6):
    """Max abs difference <= rtol x the largest gradient entry (leaves whose true gradient
    is 0, e.g. attention's key bias, carry only rounding noise)."""
    a, b = jax.tree.map(np.asarray, (a, b))  # numpy: no eager program per leaf shape
    scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b)) or 1.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert float(np.max(np.abs(x - y))) <= rtol * scale


def grads(model, params, x, **kw):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, **kw) ** 2)))(params)


def stack(n, width):
    return [m for _ in range(n) for m in (nn.dense(width), nn.relu())]


def normal(shape):
    """Test input from numpy: an eager jax.random call compiles threefry per shape."""
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


@functools.cache  # the plain block's gradients, computed once for all the policies
def transformer_case():
    block = nn.transformer_block(16, 2)
    x = normal((2, 8, 16))
    params = block.init(jax.random.key(0), x)
    return block, x, params, grads(block, params, x)


@pytest.mark.parametrize("policy", ["nothing", "everything", "dots", "dots_no_batch",
                                    "names:attention_out,mlp_hidden"])
def test_checkpoint_policies_give_the_same_gradients(policy):
    block, x, params, want = transformer_case()
    assert_tree_close(grads(remat.checkpoint(block, policy), params, x), want)


def test_checkpoint_passes_keyword_inputs():
    """A transformer block takes mask= by keyword; checkpointed, it still does."""
    block, x, params, _ = transformer_case()
    mask = jnp.asarray(np.arange(8) < 6)[None].repeat(2, axis=0)
    assert_tree_close(grads(remat.checkpoint(block), params, x, mask=mask),
                      grads(block, params, x, mask=mask))


@pytest.mark.parametrize("kw, message", [
    ({"segment": 0, "remat": "sqrt"}, "repeat: segment must be None or an int in [1, 4], got 0"),
    ({"segment": 8, "remat": "sqrt"}, "repeat: segment must be None or an int in [1, 4], got 8"),
    ({"segment": 2.0, "remat": "sqrt"}, "repeat: segment must be None or an int"),
    ({"segment": 2}, "repeat: segment=2 is for remat='sqrt', got remat=None"),
])
def test_repeat_checks_its_segment(kw, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        remat.repeat(nn.serial(nn.dense(4), nn.relu()), 4, **kw)


@functools.cache  # the plain stack's gradients, computed once for all the segmentings
def serial_case():
    x = normal((8, 16))
    plain = nn.serial(*stack(6, 16), nn.dropout(0.1), nn.dense(4))
    params = plain.init(jax.random.key(0), x)
    kw = dict(key=jax.random.key(2), train=True)
    return x, plain, params, kw, grads(plain, params, x, **kw)


@pytest.mark.parametrize("checkpoint", ["sqrt", 1, 3, 100])
def test_serial_segments_give_the_same_gradients(checkpoint):
    x, plain, params, kw, want = serial_case()
    ck = nn.serial(*stack(6, 16), nn.dropout(0.1), nn.dense(4), checkpoint=checkpoint)
    assert jax.tree.structure(ck.init(jax.random.key(0), x)) == jax.tree.structure(params)
    assert_tree_close(grads(ck, params, x, **kw), want)
    np.testing.assert_array_equal(ck.apply(params, x, **kw), plain.apply(params, x, **kw))


def test_serial_segments_take_integer_inputs():
    """Token ids into an embedding, in a checkpointed segment: integers get no cotangent
    (the backward's cond once met an int zero on one branch and float0 on the other)."""
    layers = [nn.embed(10, 8), nn.dense(8), nn.relu(), nn.dense(2)]
    tokens = jnp.asarray(np.arange(6).reshape(2, 3), jnp.int32)
    params = nn.serial(*layers).init(jax.random.key(0), tokens)
    assert_tree_close(grads(nn.serial(*layers, checkpoint=2), params, tokens),
                      grads(nn.serial(*layers), params, tokens))
    # an empty batch: the backward's probe of the cotangent once indexed an empty array
    empty = tokens[:0]
    assert_tree_close(grads(nn.serial(*layers, checkpoint=2), params, empty),
                      grads(nn.serial(*layers), params, empty))


def test_serial_segments_differentiate_what_a_layer_closes_over():
    """A layer that closes over a value the outer jax.grad differentiates (a learned scale
    outside the params): the segment's custom_vjp once raised UnexpectedTracerError."""
    x = normal((2, 3))

    def loss(scale, params, checkpoint):
        model = nn.serial(nn.dense(4), nn.stateless(lambda h: h * scale), nn.dense(4),
                          nn.relu(), checkpoint=checkpoint)
        return jnp.sum(model.apply(params, x) ** 2)

    params = nn.serial(nn.dense(4), nn.dense(4)).init(jax.random.key(0), x)  # same keys
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    d_scale, d_params = grad(1.5, params, 2)
    want_scale, want_params = grad(1.5, params, None)
    np.testing.assert_allclose(d_scale, want_scale, rtol=1e-6)
    assert float(want_scale) != 0.0
    assert_tree_close(d_params, want_params)


@pytest.mark.parametrize("mode", [None, "block", "sqrt"])
def test_repeat_equals_the_unrolled_stack(mode):
    block = nn.serial(nn.dense(16), nn.tanh())
    deep = remat.repeat(block, 9, remat=mode)
    x = normal((4, 16))
    params = deep.init(jax.random.key(0), x)
    assert params["dense_0"]["w"].shape == (9, 16, 16)

    def unrolled(p, x):
        for i in range(9):
            x = block.apply(jax.tree.map(lambda a, i=i: a[i], p), x)
        return x

    # one program for the reference, not dozens of eager ops
    want = jax.jit(jax.grad(lambda p: jnp.sum(unrolled(p, x) ** 2)))(params)
    assert_tree_close(grads(deep, params, x), want)


def test_sqrt_segments_cut_temporary_memory():
    """The seed's stack scaled down: 36 x Linear(256, 256) + ReLU, batch 512."""
    x = jnp.ones((512, 256))
    reports = {}
    for ck in (None, "sqrt"):
        model = nn.serial(*stack(36, 256), checkpoint=ck)
        params = model.init(jax.random.key(0), x)
        step = jax.grad(lambda p, model=model: jnp.sum(model.apply(p, x) ** 2))
        reports[ck] = profile.step_report(step, params, print_table=False)
    ratio = reports["sqrt"]["temp_bytes"] / reports[None]["temp_bytes"]
    assert ratio <= 0.35, ratio


def test_repeat_program_size_is_flat_in_depth():
    """Compile time follows program size: 48 blocks lower to the same program as 4.

    (Wall-clock compile times are printed by bench/remat.py, not asserted here.)
    """
    block = nn.transformer_block(32, 4)
    x = jnp.ones((2, 8, 32))
    sizes = {}
    for n in (4, 48):
        deep = remat.repeat(block, n, remat="block")
        params = jax.eval_shape(deep.init, jax.random.key(0), x)
        f = jax.jit(jax.grad(lambda p, deep=deep: jnp.sum(deep.apply(p, x))))
        sizes[n] = len(f.lower(params).as_text())
    assert sizes[48] <= 1.05 * sizes[4], sizes


def test_offload_needs_an_accelerator():
    if jax.default_backend() != "cpu":
        pytest.skip("offload is supported on this backend")
    with pytest.raises(ValueError, match="policy 'offload' moves saved activations to host "
                                         "memory, but the default backend is 'cpu'"):
        remat.checkpoint(nn.dense(4), "offload")


@pytest.mark.parametrize("bad,message", [
    ("some", "unknown policy 'some'"),
    ("names:", "'names:' needs at least one name"),
    (3, "policy must be a name or a callable, got int"),
])
def test_bad_policies(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        remat.checkpoint(nn.dense(4), bad)


def test_bad_segment_and_repeat_arguments():
    with pytest.raises(ValueError, match="checkpoint must be 'sqrt' or a positive int"):
        nn.serial(nn.dense(2), checkpoint=0)
    with pytest.raises(ValueError, match="repeat: remat must be None, 'block' or 'sqrt'"):
        remat.repeat(nn.dense(2), 4, remat="all")
    with pytest.raises(ValueError, match="needs n divisible by the segment size"):
        remat.repeat(nn.dense(2), 5, remat="sqrt", segment=2)
    # the default segment divides n: 8 blocks in segments of 4 (ceil(sqrt(8)) = 3 once
    # made remat.repeat(block, 8, remat="sqrt") an error, its docstring example included)
    assert remat.repeat(nn.dense(2), 8, remat="sqrt").init(
        jax.random.key(0), jnp.zeros((1, 2)))["w"].shape == (8, 2, 2)
    with pytest.raises(ValueError, match=r"repeat layer .*maps an input of shape \(1, 3\)"):
        remat.repeat(nn.dense(2), 4).init(jax.random.key(0), jnp.zeros((1, 3)))
    # another repeat's params ran its own count of blocks (or failed inside scan)
    x = jnp.ones((1, 4))
    five = remat.repeat(nn.dense(4), 5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"repeat layer .*params and state must stack the 3 "
                                         r"blocks on their first axis; 'b' has shape \(5, 4\)"):
        remat.repeat(nn.dense(4), 3).apply(five, x)


@pytest.mark.parametrize("mode", [None, "block", "sqrt"])
def test_repeat_runs_a_block_without_params(mode):
    # no params and no key left scan nothing to scan over: "scan got no values"
    deep = remat.repeat(nn.serial(nn.dropout(0.5), nn.relu()), 4, remat=mode)
    x = jnp.arange(-2.0, 2.0).reshape(1, 4)
    np.testing.assert_array_equal(deep.apply(deep.init(jax.random.key(0), x), x),
                                  jax.nn.relu(x))
    kept = deep.apply({}, jnp.ones((64, 64)), key=jax.random.key(1), train=True)
    assert 0.0 < float(jnp.mean(kept > 0)) < 0.2  # four independent halvings: ~1/16 kept


def test_step_report_on_the_demo_train_step(capsys):
    model = nn.mlp([256, 10])
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    opt = optim.sgd(0.05, momentum=0.9)
    state = train.TrainState.create(params, opt, jax.random.key(1))
    step = train.make_train_step(train.classifier_loss(model), opt)
    batch = {"x": jnp.zeros((32, 64)), "y": jnp.zeros((32,), jnp.int32)}
    report = profile.step_report(step, state, batch, step_time=1e-3)
    assert report["params_bytes"] == 4 * (64 * 256 + 256 + 256 * 10 + 10)
    assert report["opt_state_bytes"] >= report["params_bytes"]
    assert report["temp_bytes"] is not None and report["flops"] > 2 * 32 * 64 * 256
    assert report["flops_per_second"] == pytest.approx(report["flops"] / 1e-3)
    out = capsys.readouterr().out
    assert "temp_bytes" in out and "MiB" in out and "GFLOP" in out
    assert not any("loop" in note for note in report["notes"])


def test_step_report_notes_that_loops_count_once():
    """XLA's FLOP count takes a loop body once: the report says so for a scanned model."""
    deep = remat.repeat(nn.dense(8), 3)
    x = jnp.ones((2, 8))
    params = deep.init(jax.random.key(0), x)
    report = profile.step_report(jax.grad(lambda p: jnp.sum(deep.apply(p, x))), params,
                                 print_table=False)
    assert any("loop" in note and "too low" in note for note in report["notes"])
