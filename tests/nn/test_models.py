"""Reference models: exact param counts, shapes, errors, remat tags, and a few train steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import losses, nn, optim, remat, train


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (34, 21_797_672),
                                            (50, 25_557_032)])
def test_resnet_param_counts_equal_torchvision(depth, expected):
    model = nn.models.resnet(depth, 1000)
    params, state = jax.eval_shape(model.init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert count(params) == expected
    assert model.stateful
    assert "running" not in str(jax.tree.structure(params))
    assert state["layer1"]["0"]["bn1"]["mean"].shape == (64,)


def test_resnet_keys_follow_torchvision_and_imagenet_shapes():
    model = nn.models.resnet(18, 10)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)
    assert sorted(params) == ["bn1", "conv1", "fc", "layer1", "layer2", "layer3", "layer4"]
    assert sorted(params["layer2"]["0"]) == ["bn1", "bn2", "conv1", "conv2", "downsample"]
    assert "downsample" not in params["layer1"]["0"]
    assert params["conv1"]["w"].shape == (7, 7, 3, 64)
    out, _ = jax.eval_shape(lambda p, s, x: model.apply(p, x, state=s), params, state, x)
    assert out.shape == (2, 10)


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50, 101, 152\]"):
        nn.models.resnet(20)
    with pytest.raises(ValueError, match="stem must be 'imagenet' or 'cifar'"):
        nn.models.resnet(18, stem="mnist")


def test_gpt2_small_has_exactly_124_439_808_params():
    model = nn.models.gpt(50257, 1024, 12, 12, 768)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16), jnp.int32))
    assert count(params) == 124_439_808
    assert set(params) == {"wte", "wpe", "h", "ln_f"}
    assert len(params["h"]) == 12


TINY = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16)


def test_gpt_init_follows_gpt2():
    model = nn.models.gpt(**TINY)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    std = lambda a: float(np.std(np.asarray(a)))
    assert abs(std(params["wte"]["embedding"]) - 0.02) < 0.005
    block = params["h"]["block_0"]
    assert abs(std(block["mlp"]["dense_0"]["w"]) - 0.02) < 0.005
    assert abs(std(block["mlp"]["dense_1"]["w"]) - 0.02 / 2) < 0.003  # 1 / sqrt(2 * 2)


def test_gpt_is_causal_and_tied():
    model = nn.models.gpt(**TINY)
    # numpy ids and jitted applies: eager, this GPT compiled ~120 one-op programs
    ids = np.random.default_rng(1).integers(0, 32, (2, 8)).astype(np.int32)
    params = model.init(jax.random.key(0), ids)
    apply = jax.jit(model.apply)
    logits = apply(params, ids)
    assert logits.shape == (2, 8, 32)
    changed_ids = ids.copy()
    changed_ids[:, 5:] = (ids[:, 5:] + 1) % 32
    changed = apply(params, changed_ids)
    np.testing.assert_allclose(logits[:, :5], changed[:, :5], rtol=1e-5, atol=1e-6)
    # The head is the token embedding: its gradient collects both uses.
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, ids))))(params)
    assert "lm_head" not in params and np.abs(np.asarray(g["wte"]["embedding"])).sum() > 0


def test_gpt_gelu_approximate_is_the_tanh_gelu_of_gpt2(monkeypatch):
    # OpenAI's GPT-2 checkpoints use the tanh GELU; the exact one moves their logits
    ids = np.random.default_rng(1).integers(0, 32, (2, 8)).astype(np.int32)
    exact, tanh = nn.models.gpt(**TINY), nn.models.gpt(**TINY, gelu_approximate=True)
    params = exact.init(jax.random.key(0), ids)
    assert jax.tree.structure(tanh.init(jax.random.key(0), ids)) == jax.tree.structure(params)
    params = jax.tree.map(lambda w: 30 * w, params)  # GELU's two forms differ off 0
    got = jax.jit(tanh.apply)(params, ids)
    assert float(jnp.max(jnp.abs(got - exact.apply(params, ids)))) > 1e-4
    real = jax.nn.gelu
    monkeypatch.setattr(jax.nn, "gelu", lambda x, approximate=True: real(x, approximate=True))
    np.testing.assert_allclose(got, jax.jit(exact.apply)(params, ids), rtol=1e-4, atol=1e-5)


def test_gpt_errors():
    model = nn.models.gpt(**TINY)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        model.apply(params, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(TypeError, match="expected integer token ids"):
        model.apply(params, jnp.zeros((1, 8)))
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_head \(4\)"):
        nn.models.gpt(32, 8, 1, 4, 10)
    dropping = nn.models.gpt(**TINY, dropout=0.1)  # named the embedding's dropout "root"
    with pytest.raises(ValueError, match=r"^gpt.*: train=True with dropout=0.1 needs a PRNG key"):
        dropping.apply(params, jnp.zeros((1, 8), jnp.int32), train=True)


def test_gpt_tags_for_remat_policies():
    model = nn.models.gpt(**TINY)
    ids = np.zeros((2, 8), np.int32)
    params = model.init(jax.random.key(0), ids)
    saved = remat.checkpoint(model, "names:attention_out,mlp_hidden")
    loss = lambda m, p: jnp.mean(m.apply(p, ids) ** 2)
    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(saved, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, ids))(params))
    assert "attention_out" in jaxpr and "mlp_hidden" in jaxpr


@pytest.mark.slow  # over 10 s on 2 cores
def test_tiny_gpt_learns_a_sequence_with_dropout():
    model = nn.models.gpt(**TINY, dropout=0.1)
    ids = np.tile(np.arange(9, dtype=np.int32) % 32, (4, 1))
    batch = {"x": ids[:, :-1], "y": ids[:, 1:]}

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], key=key, train=True)
        return losses.softmax_cross_entropy(logits, batch["y"])

    opt = optim.adamw(3e-3)
    state = train.TrainState.create(model.init(jax.random.key(0), batch["x"]), opt,
                                    jax.random.key(1))
    step = train.make_train_step(loss_fn, opt)
    first = None
    for _ in range(40):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
