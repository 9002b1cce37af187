"""The gradient standard every layer, combinator and reference model must meet.

One registry, ``CASES``, holds at least one case per exported factory of ``funtrain.nn``
(several for layers with modes), plus ``remat.checkpoint``, ``remat.repeat`` and the ResNet
blocks. One parametrized test checks each case under float64: the jitted gradient w.r.t.
the params and the floating inputs against central finite differences
``(L(θ + εv) - L(θ - εv)) / 2ε``, ε = 1e-6, along random directions (params only, inputs
only, both, and one per leaf, at most ``MAX_LEAF_DIRECTIONS``), to a relative error below
1e-6 of ``max(|fd|, |analytic|, 1e-8)`` plus the rounding a float64 difference quotient
cannot resolve (``noise``: ~1e-8 of ``sum|out * cot|``, which only matters for leaves of
tiny effect). It also checks that no leaf that should move the output gets a zero
gradient. ``test_every_factory_has_a_case`` fails when a newly exported layer has no case.

The loss is ``sum(out * cotangent)`` with a fixed random cotangent (for stateful modules
the output of ``apply_with_state(...)[0]``). Params have the structure ``init`` gives, but
are drawn at a generic point (non-zero biases, scales != 1); integer and boolean inputs
(token ids, masks) are held fixed. Inputs are continuous random normals, so the kinks of
``relu`` and of the pools are met with probability ~0 at ε = 1e-6.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, remat
from funtrain._tree import keystr
from funtrain.nn.models import basic_block, bottleneck_block

EPS = 1e-6      # finite-difference step
RTOL = 1e-6     # |fd - analytic| / max(|fd|, |analytic|, FLOOR)
FLOOR = 1e-8
MAX_LEAF_DIRECTIONS = 40  # one-leaf directions per case (ResNet-50 has 161 leaves)
# XLA's CPU backend spends seconds per case optimising the generated code; the checked
# math is the same at level 0, and each case compiles ~3x faster.
JIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- inputs


def normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """A continuous random-normal float input."""
    return lambda rng: rng.standard_normal(shape)


def ids(vocab: int, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Integer ids in ``[0, vocab)`` (held fixed: not differentiated)."""
    return lambda rng: rng.integers(0, vocab, shape).astype(np.int32)


def const(value: Any) -> Callable[[np.random.Generator], Any]:
    return lambda rng: np.asarray(value)


def pair(*specs: Callable) -> Callable[[np.random.Generator], tuple]:
    """A tuple-valued input, e.g. an LSTM's initial carry ``(h0, c0)``."""
    return lambda rng: tuple(s(rng) for s in specs)


# A (batch, seq) padding mask: True = real token; every row keeps its first token.
PAD_MASK = const([[True, True, True, False, False], [True, True, True, True, True]])


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                      # the factory: a name in nn.__all__, "remat.x", "models.x"
    variant: str                   # which mode of it
    make: Callable[[], nn.Module]  # builds the module
    xs: tuple[Callable, ...]       # example inputs, each built from a seeded numpy RNG
    train: bool = False
    key: bool = False              # pass a (fixed) PRNG key to apply
    eval_after_train: bool = False  # stateful, eval mode: state from one train-mode apply
    zero_grad_ok: tuple[str, ...] = ()  # leaf paths whose gradient is legitimately all zero
    eps: float = EPS               # finite-difference step
    slow: bool = False
    xfail: str | None = None       # why this case cannot meet the standard (strict xfail)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}"


# jax.nn.dot_product_attention's XLA path casts the logits to float32 for the softmax
# whatever the input dtype (jax/_src/nn/functions.py, _dot_product_attention_core), so
# under float64 its loss is float32-accurate and a 1e-6 step measures rounding. Its
# gradient is compared with funtrain's own path instead (test_xla_attention_...).
XLA_ATTENTION_F32 = "jax's XLA attention computes the softmax in float32 even for float64"

# Attention's key bias adds q . b_k to every logit of a query, which softmax ignores: its
# gradient is exactly zero for any params (PyTorch's MultiheadAttention has the same).
KEY_BIAS = ("params/*key/b",)
# Likewise a bias right before a train-mode BatchNorm, which subtracts the batch mean.
BIAS_BEFORE_BN = ("params/*dense_0/b",)


def _dense_tanh_dense() -> nn.Module:
    return nn.serial(nn.dense(4), nn.tanh(), nn.dense(3))


CASES: list[Case] = [
    # ---- dense
    Case("dense", "bias", lambda: nn.dense(5), (normal(3, 4),)),
    Case("dense", "no_bias_3d_input", lambda: nn.dense(5, use_bias=False), (normal(2, 3, 4),)),
    # ---- conv
    Case("conv", "1d", lambda: nn.conv(4, 3), (normal(2, 7, 3),)),
    Case("conv", "2d", lambda: nn.conv(4, (3, 3)), (normal(2, 5, 6, 3),)),
    Case("conv", "2d_strided", lambda: nn.conv(4, 3, strides=2), (normal(2, 7, 6, 3),)),
    Case("conv", "2d_strides_pair_valid",
         lambda: nn.conv(4, (3, 2), strides=(2, 1), padding="VALID"), (normal(2, 7, 6, 3),)),
    Case("conv", "2d_dilated", lambda: nn.conv(3, 3, dilation=2), (normal(2, 7, 7, 2),)),
    Case("conv", "1d_dilated_strided", lambda: nn.conv(3, 3, strides=2, dilation=2),
         (normal(2, 9, 2),)),
    Case("conv", "2d_grouped", lambda: nn.conv(6, 3, feature_group_count=2),
         (normal(2, 5, 5, 4),)),
    Case("conv", "2d_depthwise", lambda: nn.conv(6, 3, feature_group_count=3),
         (normal(2, 5, 5, 3),)),
    Case("conv", "2d_int_padding", lambda: nn.conv(4, 3, padding=1, use_bias=False),
         (normal(2, 5, 6, 3),)),
    Case("conv", "2d_explicit_pairs", lambda: nn.conv(4, 3, padding=((1, 2), (0, 1))),
         (normal(2, 5, 6, 3),)),
    Case("conv", "1d_per_dim_ints", lambda: nn.conv(4, 3, strides=2, padding=(2,)),
         (normal(2, 7, 3),)),
    # ---- conv_transpose
    Case("conv_transpose", "1d_strided", lambda: nn.conv_transpose(3, 3, strides=2),
         (normal(2, 5, 2),)),
    Case("conv_transpose", "2d_same", lambda: nn.conv_transpose(4, (3, 3)),
         (normal(2, 4, 5, 3),)),
    Case("conv_transpose", "2d_strided_valid",
         lambda: nn.conv_transpose(4, 3, strides=2, padding="VALID"), (normal(2, 4, 3, 3),)),
    Case("conv_transpose", "2d_explicit_dilated",
         lambda: nn.conv_transpose(2, 3, strides=(2, 1), padding=((1, 1), (2, 0)), dilation=2,
                                   use_bias=False), (normal(2, 4, 4, 3),)),
    # ---- embed (the ids are not differentiated)
    Case("embed", "ids", lambda: nn.embed(7, 4), (ids(7, 2, 5),)),
    # ---- norms
    Case("layer_norm", "default", lambda: nn.layer_norm(), (normal(2, 3, 6),)),
    Case("layer_norm", "no_affine", lambda: nn.layer_norm(use_scale=False, use_bias=False),
         (normal(3, 5),)),
    Case("rms_norm", "default", lambda: nn.rms_norm(), (normal(2, 3, 6),)),
    Case("batch_norm", "train_pytorch", lambda: nn.batch_norm(), (normal(3, 3, 3, 4),),
         train=True),
    Case("batch_norm", "train_flax_2d_input", lambda: nn.batch_norm(convention="flax"),
         (normal(5, 4),), train=True),
    Case("batch_norm", "eval", lambda: nn.batch_norm(), (normal(3, 3, 3, 4),),
         eval_after_train=True),
    Case("group_norm", "2_groups", lambda: nn.group_norm(2), (normal(2, 3, 3, 6),)),
    Case("group_norm", "instance_no_bias", lambda: nn.group_norm(4, use_bias=False),
         (normal(2, 5, 4),)),
    # ---- dropout (deterministic given the key)
    Case("dropout", "train", lambda: nn.dropout(0.3), (normal(4, 6),), train=True, key=True),
    Case("dropout", "eval_identity", lambda: nn.dropout(0.3), (normal(4, 6),)),
    # ---- pools, every padding mode
    Case("max_pool", "2d_valid", lambda: nn.max_pool(2), (normal(2, 4, 6, 3),)),
    Case("max_pool", "2d_same_overlapping", lambda: nn.max_pool(3, strides=2, padding="SAME"),
         (normal(2, 5, 6, 3),)),
    Case("max_pool", "2d_int", lambda: nn.max_pool(3, strides=2, padding=1),
         (normal(2, 6, 6, 2),)),
    Case("max_pool", "2d_pairs", lambda: nn.max_pool((2, 3), strides=1,
                                                     padding=((1, 0), (1, 1))),
         (normal(2, 4, 5, 2),)),
    Case("max_pool", "1d_valid", lambda: nn.max_pool(2), (normal(2, 6, 3),)),
    Case("avg_pool", "2d_valid", lambda: nn.avg_pool(2), (normal(2, 4, 6, 3),)),
    Case("avg_pool", "2d_same", lambda: nn.avg_pool(3, strides=2, padding="SAME"),
         (normal(2, 5, 6, 3),)),
    Case("avg_pool", "2d_int", lambda: nn.avg_pool(3, strides=2, padding=1),
         (normal(2, 6, 6, 2),)),
    Case("avg_pool", "2d_int_count_include_pad",
         lambda: nn.avg_pool(3, strides=2, padding=1, count_include_pad=True),
         (normal(2, 6, 6, 2),)),
    Case("avg_pool", "2d_pairs", lambda: nn.avg_pool((2, 3), strides=1,
                                                     padding=((1, 0), (1, 1))),
         (normal(2, 4, 5, 2),)),
    Case("avg_pool", "1d_same", lambda: nn.avg_pool(3, strides=1, padding="SAME"),
         (normal(2, 6, 3),)),
    Case("global_avg_pool", "2d", lambda: nn.global_avg_pool(), (normal(2, 3, 4, 5),)),
    # ---- activations and shape layers
    Case("relu", "default", lambda: nn.relu(), (normal(3, 5),)),
    Case("gelu", "exact", lambda: nn.gelu(), (normal(3, 5),)),
    Case("gelu", "tanh_approx", lambda: nn.gelu(approximate=True), (normal(3, 5),)),
    Case("silu", "default", lambda: nn.silu(), (normal(3, 5),)),
    Case("tanh", "default", lambda: nn.tanh(), (normal(3, 5),)),
    Case("sigmoid", "default", lambda: nn.sigmoid(), (normal(3, 5),)),
    Case("softmax", "last_axis", lambda: nn.softmax(), (normal(3, 5),)),
    Case("softmax", "axis_1", lambda: nn.softmax(axis=1), (normal(2, 4, 3),)),
    Case("flatten", "default", lambda: nn.flatten(), (normal(2, 3, 4),)),
    Case("reshape", "minus_one", lambda: nn.reshape((-1, 2)), (normal(2, 3, 4),)),
    Case("stateless", "two_inputs", lambda: nn.stateless(lambda a, b: jnp.cos(a) * b),
         (normal(3, 4), normal(3, 4))),
    # ---- attention
    Case("multi_head_attention", "plain", lambda: nn.multi_head_attention(2),
         (normal(2, 5, 8),), zero_grad_ok=KEY_BIAS),
    Case("multi_head_attention", "causal", lambda: nn.multi_head_attention(2, causal=True),
         (normal(2, 5, 8),), zero_grad_ok=KEY_BIAS),
    Case("multi_head_attention", "padding_mask", lambda: nn.multi_head_attention(2),
         (normal(2, 5, 8), PAD_MASK), zero_grad_ok=KEY_BIAS),
    Case("multi_head_attention", "causal_mask_no_bias",
         lambda: nn.multi_head_attention(4, causal=True, use_bias=False),
         (normal(2, 5, 8), PAD_MASK)),
    Case("multi_head_attention", "dropout_train",
         lambda: nn.multi_head_attention(2, causal=True, dropout=0.3),
         (normal(2, 5, 8), PAD_MASK), train=True, key=True, zero_grad_ok=KEY_BIAS),
    Case("multi_head_attention", "xla_causal_mask",
         lambda: nn.multi_head_attention(2, causal=True, implementation="xla"),
         (normal(2, 5, 8), PAD_MASK), zero_grad_ok=KEY_BIAS, xfail=XLA_ATTENTION_F32),
    Case("multi_head_attention", "funtrain_causal_mask",
         lambda: nn.multi_head_attention(2, causal=True, implementation="funtrain"),
         (normal(2, 5, 8), PAD_MASK), zero_grad_ok=KEY_BIAS),
    # ---- recurrent
    Case("lstm", "forward", lambda: nn.lstm(3), (normal(2, 4, 2),)),
    Case("lstm", "reverse", lambda: nn.lstm(3, reverse=True), (normal(2, 4, 2),)),
    Case("lstm", "carry_return_state", lambda: nn.lstm(3, return_state=True),
         (normal(2, 4, 2), pair(normal(2, 3), normal(2, 3)))),
    Case("gru", "forward", lambda: nn.gru(3), (normal(2, 4, 2),)),
    Case("gru", "reverse", lambda: nn.gru(3, reverse=True), (normal(2, 4, 2),)),
    Case("gru", "carry_return_state", lambda: nn.gru(3, return_state=True, reverse=True),
         (normal(2, 4, 2), normal(2, 3))),
    # ---- combinators
    Case("serial", "dense_tanh_dense", _dense_tanh_dense, (normal(3, 4),)),
    Case("serial", "checkpoint_sqrt",
         lambda: nn.serial(nn.dense(4), nn.tanh(), nn.dense(4), nn.gelu(), nn.dense(3),
                           checkpoint="sqrt"), (normal(3, 4),)),
    Case("serial", "checkpoint_2_stateful_dropout",
         lambda: nn.serial(nn.dense(4), nn.batch_norm(), nn.relu(), nn.dropout(0.2),
                           nn.dense(3), checkpoint=2),
         (normal(4, 3),), train=True, key=True, zero_grad_ok=BIAS_BEFORE_BN),
    Case("residual", "identity", lambda: nn.residual(nn.dense(4), nn.tanh(), nn.dense(4)),
         (normal(3, 4),)),
    Case("residual", "shortcut_activation",
         lambda: nn.residual(nn.dense(5), nn.tanh(), nn.dense(5), shortcut=nn.dense(5),
                             activation=nn.silu()), (normal(3, 4),)),
    Case("residual", "stateful_shortcut",
         lambda: nn.residual(nn.dense(5), nn.batch_norm(),
                             shortcut=nn.serial(nn.dense(5), nn.batch_norm()),
                             activation=nn.tanh()), (normal(4, 3),), train=True,
         zero_grad_ok=BIAS_BEFORE_BN),
    Case("parallel", "tuple", lambda: nn.parallel(nn.dense(3), nn.tanh()), (normal(3, 4),)),
    Case("parallel", "sum", lambda: nn.parallel(nn.dense(4), nn.sigmoid(), combine="sum"),
         (normal(3, 4),)),
    Case("parallel", "concat_two_inputs",
         lambda: nn.parallel(nn.stateless(lambda a, b: a * b), nn.stateless(jnp.add),
                             combine="concat"), (normal(3, 4), normal(3, 4))),
    Case("with_policy", "float64",
         lambda: nn.with_policy(nn.mlp([5, 3]), "float64"), (normal(3, 4),)),
    Case("with_policy", "float64_override_stateful",
         lambda: nn.with_policy(nn.serial(nn.dense(4), nn.batch_norm(), nn.dense(3)),
                                "float64", overrides={"dense_1": "f64"}),
         (normal(4, 3),), train=True, zero_grad_ok=BIAS_BEFORE_BN),
    # ---- reference models
    Case("mlp", "relu", lambda: nn.mlp([6, 3]), (normal(3, 4),)),
    Case("mlp", "gelu", lambda: nn.mlp([6, 5, 3], activation=nn.gelu), (normal(3, 4),)),
    Case("cnn", "tiny", lambda: nn.cnn(3, channels=(2, 3)), (normal(2, 8, 8, 1),)),
    # Train-mode BatchNorm over 2 values per channel (layer4 is 1x1 at batch 2) makes the
    # loss very curved: at eps 1e-6 the central difference is off by ~1e-4 (error ~ eps^2,
    # so truncation, not a wrong gradient); eps 5e-8 gets within ~2.5e-7.
    Case("resnet", "18_cifar_train", lambda: nn.resnet(18, 4, stem="cifar", width=4),
         (normal(2, 8, 8, 3),), train=True, eps=5e-8),
    Case("resnet", "18_cifar_eval", lambda: nn.resnet(18, 4, stem="cifar", width=4),
         (normal(2, 8, 8, 3),), eval_after_train=True),
    # ResNet-50 in eval mode: in train mode at this size (batch-statistics BatchNorm over
    # 2 values, 16 blocks deep) the loss is so curved that no step meets 1e-6 in float64
    # (eps 1e-6: 6% off, 1e-8: 1e-5, 1e-9: rounding), though the error falls as eps^2
    # down to the rounding floor. The train-mode bottleneck is checked on its own below.
    Case("resnet", "50_imagenet_eval", lambda: nn.resnet(50, 3, width=2),
         (normal(1, 32, 32, 3),), eval_after_train=True),
    Case("models.bottleneck_block", "train_downsample",
         lambda: bottleneck_block(2, 2, downsample=True), (normal(2, 6, 6, 4),), train=True),
    Case("models.basic_block", "train_downsample",
         lambda: basic_block(3, 2, downsample=True), (normal(2, 5, 5, 2),), train=True),
    Case("gpt", "tiny", lambda: nn.gpt(11, 8, 2, 2, 8), (ids(11, 2, 5),),
         zero_grad_ok=KEY_BIAS),
    Case("gpt", "tiny_dropout_train", lambda: nn.gpt(11, 8, 1, 2, 8, dropout=0.2),
         (ids(11, 2, 5),), train=True, key=True, zero_grad_ok=KEY_BIAS),
    Case("gpt", "tiny_padding_mask", lambda: nn.gpt(11, 8, 1, 2, 8), (ids(11, 2, 5), PAD_MASK),
         zero_grad_ok=KEY_BIAS),
    Case("transformer_block", "padding_mask",
         lambda: nn.transformer_block(8, 2, mlp_ratio=2, causal=False),
         (normal(2, 5, 8), PAD_MASK), zero_grad_ok=KEY_BIAS),
    Case("transformer_block", "dropout_train",
         lambda: nn.transformer_block(8, 2, mlp_ratio=2, dropout=0.2),
         (normal(2, 5, 8),), train=True, key=True, zero_grad_ok=KEY_BIAS),
    Case("transformer_block", "bidirectional_attention_dropout",
         lambda: nn.transformer_block(8, 2, mlp_ratio=2, causal=False, attention_dropout=0.3),
         (normal(2, 5, 8),), train=True, key=True, zero_grad_ok=KEY_BIAS),
    # ---- remat (not in nn.__all__, but part of the standard)
    Case("remat.checkpoint", "nothing",
         lambda: remat.checkpoint(_dense_tanh_dense(), "nothing"), (normal(3, 4),)),
    Case("remat.checkpoint", "dots_stateful",
         lambda: remat.checkpoint(nn.serial(nn.dense(4), nn.batch_norm(), nn.tanh(),
                                            nn.dense(3)), "dots"),
         (normal(4, 3),), train=True, zero_grad_ok=BIAS_BEFORE_BN),
    Case("remat.checkpoint", "names_transformer_block_dropout",
         lambda: remat.checkpoint(nn.transformer_block(8, 2, mlp_ratio=2, dropout=0.2),
                                  "names:attention_out,mlp_hidden"),
         (normal(2, 5, 8),), train=True, key=True, zero_grad_ok=KEY_BIAS),
    Case("remat.repeat", "sqrt", lambda: remat.repeat(nn.serial(nn.dense(4), nn.tanh()), 4,
                                                      remat="sqrt"), (normal(3, 4),)),
    Case("remat.repeat", "block_dropout",
         lambda: remat.repeat(nn.serial(nn.dense(4), nn.tanh(), nn.dropout(0.2)), 3,
                              remat="block"), (normal(3, 4),), train=True, key=True),
    Case("remat.repeat", "sqrt_stateful",
         lambda: remat.repeat(nn.serial(nn.dense(4), nn.batch_norm(), nn.tanh()), 4,
                              remat="sqrt", segment=2), (normal(5, 4),), train=True,
         zero_grad_ok=BIAS_BEFORE_BN),
]


# --------------------------------------------------------------------------- helpers


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _leaf_name(path: tuple[Any, ...]) -> str:
    return keystr(path).rsplit("/", 1)[-1]


def _random_params(rng: np.random.Generator, shapes: Any) -> Any:
    """float64 params at a generic point, from the abstract output of ``init``.

    Drawing them with numpy instead of running ``init`` costs no XLA compilation (eager
    ``jax.random`` compiles once per shape, seconds per model on a loaded 2-core machine),
    and a generic point is a stronger check than the initial one: biases are non-zero and
    norm scales are not 1. Weights are N(0, 1/fan_in) so activations stay O(1).
    """
    def draw(path: tuple[Any, ...], s: Any) -> np.ndarray:
        if not _is_float(s):
            raise AssertionError(f"params leaf {keystr(path)} has dtype {s.dtype}")
        if _leaf_name(path) == "scale":
            return 1.0 + 0.2 * rng.standard_normal(s.shape)
        if len(s.shape) <= 1:
            return 0.2 * rng.standard_normal(s.shape)
        fan_in = max(1, int(np.prod(s.shape[:-1])))
        return rng.standard_normal(s.shape) / np.sqrt(fan_in)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# The initial value of every model-state leaf, by leaf name (BatchNorm's running statistics).
_STATE_INIT = {"mean": 0.0, "var": 1.0, "count": 0}


def _initial_state(shapes: Any) -> Any:
    def make(path: tuple[Any, ...], s: Any) -> np.ndarray:
        name = _leaf_name(path)
        if name not in _STATE_INIT:
            raise AssertionError(f"model-state leaf {keystr(path)!r}: add its initial value "
                                 f"to _STATE_INIT in tests/nn/test_gradients.py")
        return np.full(s.shape, _STATE_INIT[name], s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def _case_params(cases: list[Case]) -> list[Any]:
    def marks(c: Case) -> list[Any]:
        out = [pytest.mark.slow] if c.slow else []
        if c.xfail:
            out.append(pytest.mark.xfail(reason=c.xfail, strict=True))
        return out

    return [pytest.param(c, id=c.id, marks=marks(c)) for c in cases]


# --------------------------------------------------------------------------- the standard


@pytest.mark.parametrize("case", _case_params(CASES))
def test_gradient_matches_finite_differences(case: Case) -> None:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    with jax.enable_x64(True):
        module = case.make()
        xs = tuple(spec(rng) for spec in case.xs)
        leaves, x_def = jax.tree.flatten(xs)
        float_at = [i for i, a in enumerate(leaves) if np.issubdtype(a.dtype, np.floating)]
        fixed = {i: jnp.asarray(a) for i, a in enumerate(leaves) if i not in float_at}

        def inputs(fxs: list[Any]) -> tuple[Any, ...]:
            merged = dict(fixed)
            merged.update(zip(float_at, fxs, strict=True))
            return jax.tree.unflatten(x_def, [merged[i] for i in range(len(leaves))])

        # The differentiated arguments, flat: params leaves, then the float input leaves.
        fxs = [np.asarray(leaves[i], np.float64) for i in float_at]
        shapes = jax.eval_shape(lambda k, *a: nn.init_with_state(module, k, *a),
                                jax.random.key(0), *inputs(fxs))
        params = _random_params(rng, shapes[0])
        state = None if shapes[1] is None else _initial_state(shapes[1])
        flat_params, p_def = jax.tree.flatten(params)
        n_params = len(flat_params)
        key = jax.random.key(7) if case.key else None
        train = case.train
        if case.eval_after_train:
            assert module.stateful and not train
            # two copies of the batch: the same statistics, and a BatchNorm in training
            # refuses one value per channel (ResNet-50's last stage is 1x1 for 32x32)
            twice = [jnp.concatenate([a, a]) for a in inputs(fxs)]
            state = jax.jit(lambda p, *a: nn.apply_with_state(module, p, *a, state=state,
                                                              train=True)[1],
                            compiler_options=JIT_OPTIONS)(params, *twice)
            assert all(int(c) > 0 for c in jax.tree.leaves(state) if c.dtype == jnp.int32)

        def forward(args: list[Any]) -> Any:
            p = jax.tree.unflatten(p_def, args[:n_params])
            return nn.apply_with_state(module, p, *inputs(args[n_params:]), state=state,
                                       key=key, train=train)[0]

        args = [*flat_params, *fxs]
        out_shape = jax.eval_shape(forward, args)
        cot = [rng.standard_normal(s.shape) for s in jax.tree.leaves(out_shape)]

        def loss(args: list[Any]) -> Any:
            outs = jax.tree.leaves(forward(args))
            value = sum(jnp.sum(o * c) for o, c in zip(outs, cot, strict=True))
            size = sum(jnp.sum(jnp.abs(o * c)) for o, c in zip(outs, cot, strict=True))
            return value, size

        # One compilation per case: the value is the finite-difference loss, the gradient
        # the analytic one (the same forward computation either way).
        value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                 compiler_options=JIT_OPTIONS)
        (_, size), grads = value_and_grad(args)
        grads = [np.asarray(g) for g in grads]
        # The rounding error of a float64 loss, divided by the step: what a finite
        # difference cannot resolve (with a 64x margin). It is ~1e-8 of |out * cot| at
        # eps 1e-6, so it only matters for leaves whose own effect is that small.
        noise = 64 * np.finfo(np.float64).eps * float(size) / case.eps

        names = ([f"params/{keystr(p)}" for p, _ in
                  jax.tree_util.tree_flatten_with_path(params)[0]]
                 + [f"input/{i}" for i in float_at])
        zero_ok = [any(fnmatch.fnmatchcase(n, pat) for pat in case.zero_grad_ok)
                   for n in names]

        # Every gradient is float64 and finite; none that should move the output is zero,
        # where zero means below 1e-10 of the largest (a cut-off leaf can get rounding).
        problems = []
        largest = max(float(np.max(np.abs(g), initial=0.0)) for g in grads)
        for name, g, ok in zip(names, grads, zero_ok, strict=True):
            top = float(np.max(np.abs(g), initial=0.0))
            if g.dtype != np.float64:
                problems.append(f"{name}: gradient dtype {g.dtype}, expected float64")
            if not np.all(np.isfinite(g)):
                problems.append(f"{name}: non-finite gradient")
            elif ok and top > 1e-10 * largest:
                problems.append(f"{name}: expected a zero gradient (zero_grad_ok), got max "
                                f"|g| = {top:.3g} (largest of any leaf {largest:.3g})")
            elif not ok and not top > 1e-10 * largest:
                problems.append(f"{name}: gradient is (all but) zero: max |g| = {top:.3g}, "
                                f"largest of any leaf {largest:.3g}")

        # Directions {arg index: vector}: params only, inputs only, both, then one per leaf.
        def direction(indices: Any) -> dict[int, np.ndarray]:
            return {i: rng.standard_normal(args[i].shape) for i in indices}

        everything = range(len(args))
        directions = []
        if n_params:
            directions.append(("params", direction(everything[:n_params])))
        if fxs:
            directions.append(("inputs", direction(everything[n_params:])))
        if n_params and fxs:
            directions.append(("params+inputs", direction(everything)))
        per_leaf = [i for i, ok in enumerate(zero_ok) if not ok] if len(args) > 1 else []
        if len(per_leaf) > MAX_LEAF_DIRECTIONS:  # big models: a fixed random sample
            per_leaf = sorted(rng.choice(per_leaf, MAX_LEAF_DIRECTIONS, replace=False))
        directions += [(names[i], direction([i])) for i in per_leaf]
        assert directions, "a case with neither params nor float inputs checks nothing"

        def moved(v: dict[int, np.ndarray], step: float) -> list[Any]:
            out = list(args)
            for i, d in v.items():
                out[i] = args[i] + step * d
            return out

        for what, v in directions:
            (plus, _), _ = value_and_grad(moved(v, case.eps))
            (minus, _), _ = value_and_grad(moved(v, -case.eps))
            fd = (float(plus) - float(minus)) / (2 * case.eps)
            analytic = float(sum(np.vdot(grads[i], d) for i, d in v.items()))
            scale = max(abs(fd), abs(analytic), FLOOR)
            if not abs(fd - analytic) <= RTOL * scale + noise:
                problems.append(f"direction {what}: finite difference {fd:.12g}, analytic "
                                f"{analytic:.12g}, relative error "
                                f"{abs(fd - analytic) / scale:.3g} (rounding allows "
                                f"{noise / scale:.2g} more)")
        assert not problems, f"{case.id}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- coverage

# Exported names that are not layer/combinator/model factories, so need no case here.
NOT_FACTORIES = {
    "Module",                                   # the type itself
    "ModuleError", "ModuleTypeError",           # errors
    "named",                                    # renames a module; changes no math
    "summary",                                  # a table of shapes and sizes, no math
    "init_with_state", "apply_with_state",      # uniform init/apply helpers (used above)
    "initializers", "models",                   # subpackages
    # initializers: make arrays, are not modules
    "variance_scaling", "he_normal", "he_uniform", "glorot_normal", "glorot_uniform",
    "lecun_normal", "lecun_uniform", "zeros", "ones", "constant", "normal", "uniform",
}


def test_every_factory_has_a_case() -> None:
    exported = set(nn.__all__)
    stale = NOT_FACTORIES - exported
    assert not stale, f"NOT_FACTORIES lists names nn no longer exports: {sorted(stale)}"
    covered = {c.name for c in CASES}
    missing = sorted(exported - NOT_FACTORIES - covered)
    assert not missing, (
        f"funtrain.nn exports {missing} without a gradient case: add a Case to CASES in "
        f"tests/nn/test_gradients.py (or, if it is not a layer, combinator or model "
        f"factory, add it to NOT_FACTORIES with a comment)")
    unknown = sorted(n for n in covered - exported if not n.startswith(("remat.", "models.")))
    assert not unknown, f"cases name factories nn does not export: {unknown}"


def test_case_ids_are_unique() -> None:
    ids_ = [c.id for c in CASES]
    assert len(ids_) == len(set(ids_)), sorted(i for i in ids_ if ids_.count(i) > 1)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_gradient_matches_funtrain_path(causal: bool) -> None:
    """implementation="xla" (float32 softmax, see XLA_ATTENTION_F32) against the
    FD-checked "funtrain" path: same params, inputs and mask, float32-level agreement."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = rng.standard_normal((2, 5, 8))
        mask = np.asarray(PAD_MASK(rng))
        xla, ours = (nn.multi_head_attention(2, causal=causal, implementation=impl)
                     for impl in ("xla", "funtrain"))
        params = _random_params(rng, jax.eval_shape(ours.init, jax.random.key(0), x, mask))
        cot = rng.standard_normal(x.shape)

        def grads(module: nn.Module) -> list[np.ndarray]:
            loss = lambda p, x: jnp.sum(module.apply(p, x, mask) * cot)
            g = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=JIT_OPTIONS)(params, x)
            return [np.asarray(a) for a in jax.tree.leaves(g)]

        expected = grads(ours)
        atol = 1e-5 * max(np.max(np.abs(g)) for g in expected)
        for a, b in zip(grads(xla), expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)
