"""funtrain.interop.from_torch: PyTorch state_dicts onto funtrain params and model state."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import interop, nn
from funtrain.interop import from_torch

torch = pytest.importorskip("torch")
tnn = torch.nn


# ----------------------------------------------------------------- torchvision's ResNet-18


class BasicBlock(tnn.Module):
    """torchvision.models.resnet.BasicBlock, same module names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inplanes, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes))

    def forward(self, x):  # noqa: ANN001, ANN201
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(tnn.Module):
    """torchvision.models.resnet18's module names and forward pass."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layer = tnn.Sequential(BasicBlock(inplanes, planes, stride),
                                   BasicBlock(planes, planes))
            setattr(self, f"layer{i + 1}", layer)
            inplanes = planes
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(512, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _trained_statistics(model: tnn.Module, x: torch.Tensor) -> None:
    """Random BatchNorm affine params, then running statistics from train-mode passes."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, tnn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.momentum = None  # cumulative averages: statistics that fit the activations
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(x + 0.1 * i)


def test_resnet18_matches_torchvision_layout_in_eval_mode():
    torch.manual_seed(0)
    tmodel = ResNet18(10)
    x = torch.randn(2, 3, 32, 32)
    _trained_statistics(tmodel, x)
    tmodel.bn1.num_batches_tracked.fill_(11)
    tmodel.eval()
    with torch.no_grad():
        expected = tmodel(x).numpy()

    model = nn.models.resnet(18, 10)
    # Only shapes and dtypes are read: eval_shape skips drawing 11M random weights.
    p_template, s_template = jax.eval_shape(model.init, jax.random.key(0),
                                            jnp.zeros((1, 32, 32, 3)))
    params, state = from_torch(p_template, tmodel.state_dict(), model_state=s_template)

    assert jax.tree.structure(params) == jax.tree.structure(p_template)
    assert jax.tree.structure(state) == jax.tree.structure(s_template)
    for got, want in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p_template,
                                                                            s_template)),
                         strict=True):
        assert isinstance(got, jax.Array)
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    sd = tmodel.state_dict()
    np.testing.assert_array_equal(params["conv1"]["w"],
                                  sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["w"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(state["layer2"]["0"]["downsample"]["1"]["var"],
                                  sd["layer2.0.downsample.1.running_var"].numpy())
    # num_batches_tracked -> count (int64 -> the template's int32).
    assert int(state["bn1"]["count"]) == 11
    assert int(state["layer4"]["1"]["bn2"]["count"]) == 2
    assert state["bn1"]["count"].dtype == jnp.int32

    apply = jax.jit(lambda p, s, x: model.apply(p, x, state=s, train=False)[0])
    out = apply(params, state, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    scale = np.abs(expected).max()
    assert scale > 0.1  # a meaningful comparison, not all zeros
    # float32 through 18 layers, XLA's convolutions against oneDNN's (which picks its
    # algorithm by the CPU's instruction set): agreement to ~1e-5 of the logits' scale.
    # A wrong layout is off by O(scale).
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=2e-5 * scale)


# ----------------------------------------------------------------- smaller models


def _template(model: nn.Module, x: jax.Array) -> object:
    """Shapes and dtypes only (from_torch reads nothing else): no random-init compiles."""
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _mlp() -> tuple[tnn.Module, nn.Module]:
    torch.manual_seed(0)
    tmodel = tnn.Sequential(tnn.Linear(3, 5), tnn.ReLU(), tnn.Linear(5, 2))
    return tmodel, nn.serial(nn.dense(5), nn.relu(), nn.dense(2))


@pytest.mark.parametrize("rename", [
    {"dense_0": "0", "dense_1": "2"},  # layer prefixes
    {"dense_0/w": "0.weight", "dense_0/b": "0.bias", "dense_1": "2"},  # whole paths win
    lambda p: p.replace("dense_0", "0").replace("dense_1", "2").replace("/w", ".weight")
    .replace("/b", ".bias"),
])
def test_mlp_with_rename(rename):
    tmodel, model = _mlp()
    template = _template(model, jnp.zeros((1, 3)))
    params = from_torch(template, tmodel.state_dict(), rename=rename)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.apply(params, jnp.asarray(x)), expected, rtol=1e-5,
                               atol=1e-6)


def test_rename_callable_returning_none_keeps_the_default_key():
    tmodel = tnn.Linear(3, 2)
    model = nn.dense(2)
    template = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    params = from_torch(template, tmodel.state_dict(), rename=lambda p: None)
    np.testing.assert_array_equal(params["w"], tmodel.weight.detach().numpy().T)


def test_numpy_arrays_and_bf16_tensors_take_the_template_dtype():
    tmodel, model = _mlp()
    template = _template(model, jnp.zeros((1, 3)))
    sd = {k: v.numpy().astype(np.float64) for k, v in tmodel.state_dict().items()}
    sd["2.bias"] = tmodel.state_dict()["2.bias"].to(torch.bfloat16)
    params = from_torch(template, sd, rename={"dense_0": "0", "dense_1": "2"})
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(params["dense_0"]["w"], sd["0.weight"].T, rtol=1e-7)
    np.testing.assert_allclose(params["dense_1"]["b"], sd["2.bias"].float().numpy())


def test_template_dtype_bf16():
    tmodel = tnn.Linear(3, 2)
    model = nn.dense(2, param_dtype=jnp.bfloat16)
    template = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    params = from_torch(template, tmodel.state_dict())
    assert params["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_matches_torch(kind):
    torch.manual_seed(0)
    tmodel = (tnn.LSTM if kind == "lstm" else tnn.GRU)(3, 4, batch_first=True)
    model = getattr(nn, kind)(4)
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    params = from_torch(_template(model, jnp.asarray(x)), tmodel.state_dict())
    np.testing.assert_array_equal(params["w_hh"], tmodel.weight_hh_l0.detach().numpy().T)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(model.apply(params, jnp.asarray(x)), expected, rtol=1e-5,
                               atol=1e-5)


def test_embed_and_norms_are_taken_as_is():
    torch.manual_seed(0)
    tmodel = tnn.Sequential(tnn.Embedding(7, 4), tnn.LayerNorm(4), tnn.GroupNorm(2, 4))
    for m in (tmodel[1], tmodel[2]):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.normal_()
    model = nn.serial(nn.embed(7, 4, name="0"), nn.layer_norm(name="1"),
                      nn.group_norm(2, name="2"))
    params = from_torch(_template(model, jnp.zeros((1, 3), jnp.int32)), tmodel.state_dict())
    sd = tmodel.state_dict()
    np.testing.assert_array_equal(params["0"]["embedding"], sd["0.weight"].numpy())
    for i in ("1", "2"):
        np.testing.assert_array_equal(params[i]["scale"], sd[f"{i}.weight"].numpy())
        np.testing.assert_array_equal(params[i]["bias"], sd[f"{i}.bias"].numpy())


def test_loaded_params_do_not_share_memory_with_the_torch_tensors():
    """numpy() shares a tensor's memory, and jnp.asarray on CPU kept it: a later optimizer
    step or train-mode forward in torch changed the funtrain params already loaded."""
    torch.manual_seed(0)
    tmodel = tnn.Sequential(tnn.Embedding(7, 4), tnn.LayerNorm(4))
    model = nn.serial(nn.embed(7, 4, name="0"), nn.layer_norm(name="1"))
    params = from_torch(_template(model, jnp.zeros((1, 3), jnp.int32)), tmodel.state_dict())
    before = jax.tree.map(np.array, params)
    with torch.no_grad():
        for t in tmodel.parameters():
            t.add_(1.0)  # in place, as optimizer.step() does
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_conv_transpose_reads_torch_s_in_out_layout_by_its_layer_name():
    """A square ConvTranspose's weight (in, out, *k) has a conv's shape: read by name."""
    torch.manual_seed(0)
    tconv = tnn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
    model = nn.serial(nn.conv_transpose(4, 3, strides=2, padding=1))
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)  # NCHW
    xl = jnp.asarray(x.transpose(0, 2, 3, 1))
    params = from_torch(_template(model, xl), tconv.state_dict(),
                        rename={"conv_transpose_0": ""})
    with torch.no_grad():
        expected = tconv(torch.from_numpy(x)).numpy()
    out = np.asarray(model.apply(params, xl)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _conv1d_bn() -> tuple[tnn.Module, nn.Module]:
    torch.manual_seed(0)
    tmodel = tnn.Sequential(tnn.Conv1d(3, 4, 3, padding=1), tnn.BatchNorm1d(4))
    model = nn.serial(nn.conv(4, 3, padding=1, name="0"), nn.batch_norm(name="1"))
    return tmodel, model


def test_conv1d_and_batch_norm_state():
    tmodel, model = _conv1d_bn()
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)  # (N, C, L)
    tmodel.train()
    with torch.no_grad():
        tmodel(torch.from_numpy(x))
    tmodel.eval()
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    xl = jnp.asarray(x.transpose(0, 2, 1))  # channels last
    p_template, s_template = _template(model, xl)
    params, state = from_torch(p_template, tmodel.state_dict(), model_state=s_template)
    assert params["0"]["w"].shape == (3, 3, 4)
    assert int(state["1"]["count"]) == 1
    out, _ = model.apply(params, xl, state=state)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1), expected, rtol=1e-5,
                               atol=1e-5)


def test_a_linear_after_a_conv_stack_reads_the_channels_first_flatten():
    """torch's nn.Flatten orders a conv output (C, H, W), funtrain's flatten (H, W, C): the
    Linear's inputs are reordered (they were loaded as they came: wrong outputs, no error);
    channels_first_flatten=False keeps them for a model that flattens channels last."""
    tmodel = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 4 * 4, 3))
    model = nn.serial(nn.conv(4, 3, padding="SAME", name="0"), nn.relu(), nn.max_pool(2),
                      nn.flatten(), nn.dense(3, name="4"))
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    xl = jnp.asarray(x.transpose(0, 2, 3, 1))
    template = _template(model, xl)
    params = from_torch(template, tmodel.state_dict())
    np.testing.assert_allclose(np.asarray(model.apply(params, xl)), expected, rtol=1e-5,
                               atol=1e-5)
    as_given = from_torch(template, tmodel.state_dict(), channels_first_flatten=False)
    np.testing.assert_array_equal(np.asarray(as_given["4"]["w"]),
                                  tmodel.state_dict()["4.weight"].numpy().T)


def test_a_linear_after_an_lstm_after_a_conv_is_not_reordered():
    # an LSTM's weight_ih_l0 does not end in "weight", so the conv before it counted as the
    # Linear's input and its columns were scrambled ([0, 2, 4, 6, 1, 3, 5, 7])
    state = {"conv.weight": torch.randn(4, 3, 3), "conv.bias": torch.randn(4),
             "rnn.weight_ih_l0": torch.randn(32, 4), "rnn.weight_hh_l0": torch.randn(32, 8),
             "rnn.bias_ih_l0": torch.randn(32), "rnn.bias_hh_l0": torch.randn(32),
             "fc.weight": torch.randn(2, 8), "fc.bias": torch.randn(2)}
    template = {"conv": {"w": jnp.zeros((3, 3, 4)), "b": jnp.zeros(4)},
                "rnn": {"w_ih": jnp.zeros((4, 32)), "w_hh": jnp.zeros((8, 32)),
                        "b_ih": jnp.zeros(32), "b_hh": jnp.zeros(32)},
                "fc": {"w": jnp.zeros((8, 2)), "b": jnp.zeros(2)}}
    params = from_torch(template, state)
    np.testing.assert_array_equal(np.asarray(params["fc"]["w"]), state["fc.weight"].numpy().T)


# ----------------------------------------------------------------- errors


def _mlp_case() -> tuple[dict, object]:
    tmodel, model = _mlp()
    return dict(tmodel.state_dict()), _template(model, jnp.zeros((1, 3)))


RENAME = {"dense_0": "0", "dense_1": "2"}


def test_missing_key_names_the_path_and_the_key_looked_for():
    sd, template = _mlp_case()
    del sd["2.bias"]
    with pytest.raises(ValueError, match=r"params 'dense_1/b' has no torch key: looked for "
                                         r"'2\.bias'"):
        from_torch(template, sd, rename=RENAME)
    # Without rename, the default key and the closest unused torch key are named.
    with pytest.raises(ValueError, match=r"'dense_0/w' has no torch key: looked for "
                                         r"'dense_0\.weight' \(closest unused key: "
                                         r"'0\.weight'\)"):
        from_torch(template, sd)


def test_unused_key_is_an_error_only_when_strict():
    sd, template = _mlp_case()
    sd["head.weight"] = torch.zeros(7, 2)
    with pytest.raises(ValueError, match=r"torch key 'head\.weight' \(shape \(7, 2\)\) "
                                         r"matches no funtrain key path"):
        from_torch(template, sd, rename=RENAME)
    params = from_torch(template, sd, rename=RENAME, strict=False)
    assert params["dense_1"]["w"].shape == (5, 2)


def test_misshaped_key_names_both_shapes_and_layouts():
    sd, template = _mlp_case()
    sd["0.weight"] = torch.zeros(6, 3)
    with pytest.raises(ValueError, match=r"torch key '0\.weight' has shape \(6, 3\), expected "
                                         r"\(5, 3\) for params 'dense_0/w' of shape \(3, 5\)"):
        from_torch(template, sd, rename=RENAME)


def test_all_problems_are_listed_at_once():
    sd, template = _mlp_case()
    del sd["0.bias"]
    sd["2.weight"] = torch.zeros(2, 4)
    sd["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"\(3 problem\(s\)\)") as err:
        from_torch(template, sd, rename=RENAME)
    msg = str(err.value)
    assert "'dense_0/b' has no torch key" in msg
    assert "torch key '2.weight' has shape (2, 4), expected (2, 5)" in msg
    assert "torch key 'extra'" in msg


def test_batch_norm_statistics_without_model_state():
    tmodel, model = _conv1d_bn()
    p_template, s_template = _template(model, jnp.zeros((1, 6, 3)))
    with pytest.raises(ValueError, match=r"BatchNorm statistics \(3 key\(s\) such as "
                                         r"'1\.running_mean'\): pass model_state="):
        from_torch(p_template, tmodel.state_dict())
    params = from_torch(p_template, tmodel.state_dict(), strict=False)
    assert set(params) == {"0", "1"}
    # A model_state template whose statistics are missing names the state path.
    sd = {k: v for k, v in tmodel.state_dict().items() if "running_var" not in k}
    with pytest.raises(ValueError, match=r"model_state '1/var' has no torch key: looked for "
                                         r"'1\.running_var'"):
        from_torch(p_template, sd, model_state=s_template)


def test_bad_argument_types():
    _, template = _mlp_case()
    with pytest.raises(TypeError, match="state_dict must be a mapping .* got list"):
        from_torch(template, [])
    with pytest.raises(TypeError, match="rename must be a callable .* got int"):
        from_torch(template, {}, rename=3)


def test_the_module_never_imports_torch():
    """Tensors are read by duck typing, so funtrain.interop loads without torch."""
    tree = ast.parse(Path(interop.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "torch"]


def test_batch_norm_statistics_without_or_with_zero_num_batches_tracked():
    """Older PyTorch files have no num_batches_tracked, and torch sets it to 0 when it loads
    them: the loaded statistics are trained ones all the same, so eval mode accepts them."""
    model = nn.serial(nn.dense(4), nn.batch_norm())
    params, state = model.init(jax.random.key(0), jnp.zeros((2, 3)))
    sd = {"dense_0.weight": np.ones((4, 3), np.float32), "dense_0.bias": np.zeros(4, np.float32),
          "batch_norm_0.weight": np.ones(4, np.float32),
          "batch_norm_0.bias": np.zeros(4, np.float32),
          "batch_norm_0.running_mean": np.full(4, 0.5, np.float32),
          "batch_norm_0.running_var": np.full(4, 2.0, np.float32)}
    for extra in ({}, {"batch_norm_0.num_batches_tracked": np.array(0)}):
        p, s = from_torch(params, {**sd, **extra}, model_state=state)
        assert int(s["batch_norm_0"]["count"]) == 1
        y, _ = model.apply(p, jnp.ones((2, 3)), state=s)  # eval mode: no error
        np.testing.assert_allclose(y, (3.0 - 0.5) / np.sqrt(2.0 + 1e-5), rtol=1e-5)
