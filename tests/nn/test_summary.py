"""nn.summary: rows, output shapes, param/state totals, rendering, and nothing computed."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, remat

# ``import funtrain.nn.summary as S`` would give the function once ``nn`` exports it.
S = importlib.import_module("funtrain.nn.summary")
summary = S.summary


def _count(tree):
    """(elements, bytes) of the arrays (or ShapeDtypeStructs) in ``tree``."""
    leaves = jax.tree.leaves(tree)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    return sum(sizes), sum(n * x.dtype.itemsize for n, x in zip(sizes, leaves, strict=True))


def _init_shapes(model, x):
    """The shapes and dtypes ``model.init`` gives, without running it (eager init of a
    ResNet takes seconds on a busy 2-core machine)."""
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _paths(s):
    return [r.path for r in s.rows]


@pytest.fixture(scope="module")
def resnet():
    model = nn.models.resnet(18, 10, stem="cifar", width=8)
    x = jnp.zeros((2, 8, 8, 3))
    params, state = _init_shapes(model, x)
    return model, x, params, state


@pytest.mark.parametrize("make,shape,real", [(lambda: nn.mlp([16, 4]), (2, 8), True),
                                             (lambda: nn.cnn(10), (2, 8, 8, 1), False)])
def test_totals_equal_real_params_stateless(make, shape, real):
    model = make()
    x = jnp.zeros(shape)
    params = model.init(jax.random.key(0), x) if real else _init_shapes(model, x)
    s = summary(model, x)
    assert (s.total_params, s.total_param_bytes) == _count(params)
    assert s.total_state_bytes == 0
    assert (s.rows[0].params, s.rows[0].param_bytes) == _count(params)


def test_resnet_totals_and_state(resnet):
    model, x, params, state = resnet
    s = summary(model, x)
    assert (s.total_params, s.total_param_bytes) == _count(params)
    assert s.total_state_bytes == _count(state)[1] > 0
    bn = s["layer1/0/bn1"]
    assert bn.kind == "batch_norm" and bn.output == "(2, 8, 8, 8)"
    assert sorted(state["layer1"]["0"]["bn1"]) == ["count", "mean", "var"]
    assert bn.state_bytes == 8 * 4 + 8 * 4 + 4 == _count(state["layer1"]["0"]["bn1"])[1]
    assert bn.params == 16
    # A row counts its whole subtree; the shortcut sits under its own key.
    assert (s["layer1"].params, s["layer1"].param_bytes) == _count(params["layer1"])
    assert s["layer1"].state_bytes == _count(state["layer1"])[1]
    assert s["layer2/0/downsample/1"].state_bytes > 0
    assert s["layer2/0"].output == "(2, 4, 4, 16)"
    assert s["fc"].output == "(2, 10)" and s.rows[0].output == "(2, 10)"
    assert s["layer1/0/relu_0"].params == s["layer1/0/relu_0"].state_bytes == 0
    # Pre-order: each parent comes before its children, execution order among siblings.
    paths = _paths(s)
    assert paths[:5] == ["<root>", "conv1", "bn1", "relu_0", "layer1"]
    assert paths.index("layer1/0/conv1") < paths.index("layer1/0/bn1") < paths.index(
        "layer1/1") < paths.index("layer2")
    assert paths[-2:] == ["avgpool", "fc"]
    assert len(set(paths)) == len(paths)


def test_mlp_rows_and_output_shapes():
    s = summary(nn.mlp([16, 4]), jnp.zeros((2, 8)))
    got = [(r.path, r.kind, r.output, r.params, r.param_bytes, r.depth) for r in s.rows]
    assert got == [("<root>", "serial", "(2, 4)", 212, 848, 0),
                   ("dense_0", "dense", "(2, 16)", 8 * 16 + 16, 576, 1),
                   ("relu_0", "relu", "(2, 16)", 0, 0, 1),
                   ("dense_1", "dense", "(2, 4)", 16 * 4 + 4, 272, 1)]


def test_depth_limits_rows(resnet):
    model, x, _, _ = resnet
    full = summary(model, x)
    top = summary(model, x, depth=1)
    assert _paths(top) == ["<root>", "conv1", "bn1", "relu_0", "layer1", "layer2", "layer3",
                           "layer4", "avgpool", "fc"]
    assert all(r.depth <= 1 for r in top.rows)
    assert (top.total_params, top.total_state_bytes) == (full.total_params,
                                                         full.total_state_bytes)
    assert top["layer1"] == full["layer1"]
    assert _paths(summary(model, x, depth=0)) == ["<root>"]
    assert max(r.depth for r in full.rows) == 4  # layer2/0/downsample/0
    with pytest.raises(ValueError, match="depth must be None or an int >= 0"):
        summary(model, x, depth=-1)


def test_renders_a_table(resnet):
    model, x, _, _ = resnet
    s = summary(model, x, depth=2)
    text = str(s)
    lines = text.splitlines()
    assert lines[0].split() == ["Path", "Kind", "Output", "Params", "Param", "bytes",
                                "State", "bytes"]
    assert lines[-1] == f"Total: {s.total_params:,} params (689.1 KiB), state 4.8 KiB"
    assert "176,402" in lines[2] and lines[2].startswith("<root>")
    assert any(line.startswith("    layer1/0 ") for line in lines)  # indented by depth
    assert len(lines) == len(s.rows) + 4  # header, rule, rows, rule, totals
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned: numbers end together
    assert repr(s) == text

    class Printer:
        out = ""

        def text(self, t):
            self.out += t

    p = Printer()
    s._repr_pretty_(p, False)
    assert p.out == text
    # No state: no state column.
    plain = str(summary(nn.mlp([16, 4]), jnp.zeros((2, 8))))
    assert "State" not in plain and plain.endswith("Total: 212 params (848 B)")


def test_format_bytes():
    assert [S.format_bytes(n) for n in (0, 512, 1024, 1260, 5 * 2**20, 3 * 2**30)] == [
        "0 B", "512 B", "1.0 KiB", "1.2 KiB", "5.0 MiB", "3.0 GiB"]


def test_shape_dtype_struct_input_matches_array():
    model = nn.cnn(10)
    a = summary(model, jnp.zeros((2, 8, 8, 1)))
    b = summary(model, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
    assert a.rows == b.rows and a.total_params == b.total_params


def test_repeat_rows_and_stacked_params():
    block = nn.serial(nn.dense(16), nn.relu())
    model = nn.serial(nn.dense(16), remat.repeat(block, 4, remat="sqrt"), nn.dense(2))
    x = jnp.zeros((2, 16))
    params = _init_shapes(model, x)
    s = summary(model, x)
    assert _paths(s) == ["<root>", "dense_0", "repeat_0", "repeat_0/dense_0",
                         "repeat_0/relu_0", "dense_1"]
    assert s["repeat_0/dense_0"].output == "(2, 16)"  # one block's output
    assert s["repeat_0/dense_0"].params == 4 * (16 * 16 + 16)  # the stacked params
    assert (s.total_params, s.total_param_bytes) == _count(params)


def test_gpt_rows_follow_params():
    model = nn.models.gpt(100, 16, 2, 2, 32)
    ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    params = _init_shapes(model, ids)
    s = summary(model, ids)
    assert s.rows[0].kind == "gpt" and s.rows[0].output == "(2, 8, 100)"
    assert (s.total_params, s.total_param_bytes) == _count(params)
    top = [r.path for r in s.rows if r.depth == 1]
    assert top == ["wte", "wpe", "h", "ln_f"]  # the order init builds them in
    assert s["wte"].output == "-" and s["wte"].params == 100 * 32
    assert s["h"].params == s["h/block_0"].params + s["h/block_1"].params
    assert s["h/block_0/mlp/dense_0"].output == "(2, 8, 128)"
    assert s["h/block_1/attn/multi_head_attention_0"].kind == "multi_head_attention"
    # Every row with params names a real params subtree, and the top level adds up.
    for r in s.rows[1:]:
        if r.params:
            node = params
            for k in r.path.split("/"):
                node = node[k]
    assert sum(s[k].params for k in top) == s.total_params


def test_nothing_is_computed():
    # 16 GiB of activations and 128 MiB of params: only shapes ever exist.
    x = jax.ShapeDtypeStruct((1 << 20, 4096), jnp.float32)
    s = summary(nn.mlp([4096, 4096]), x)
    assert s["dense_0"].output == "(1048576, 4096)"
    assert s.total_params == 2 * (4096 * 4096 + 4096)
    assert S.format_bytes(s.total_param_bytes) == "128.0 MiB"
    s2 = summary(nn.mlp([4096, 4096]), jnp.zeros((4096, 4096)))
    assert s2["dense_1"].output == "(4096, 4096)"


def test_train_mode_and_dtypes():
    model = nn.with_policy(nn.serial(nn.dense(8), nn.dropout(0.5)), "bf16")
    s = summary(model, jnp.zeros((2, 4)), train=True)
    assert s.rows[0].output == "(2, 8) bfloat16"
    assert _paths(s) == ["<root>", "dense_0", "dropout_0"]
    tup = summary(nn.parallel(nn.dense(3), nn.dense(5)), jnp.zeros((2, 4)))
    assert tup.rows[0].output == "[(2, 3), (2, 5)]"


def test_bad_model_and_unknown_row():
    with pytest.raises(TypeError, match="model must be a Module"):
        summary(nn.dense, jnp.zeros((1, 2)))
    with pytest.raises(KeyError, match="no row 'nope'"):
        summary(nn.mlp([2]), jnp.zeros((1, 2)))["nope"]


def test_docstring_examples(monkeypatch):
    monkeypatch.setattr(nn, "summary", summary, raising=False)
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
