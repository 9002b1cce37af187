"""funtrain.precision: policy parsing, casting, and loss scales under jit, scan and pytrees.

Two tests pin down bugs of jmp (DeepMind's mixed-precision library) that funtrain must not
have: its DynamicLossScale loses ``min_loss_scale`` across a jit boundary, and its
``adjust`` fails on a float16 loss scale.
"""

import copy
import pickle
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funtrain import precision
from funtrain.precision import (
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    StaticLossScale,
    all_finite,
    as_policy,
    get_policy,
    half_dtype,
)

F32, BF16, F16, F64 = (np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16,
                                              jnp.float64))
F32_MAX = np.float32(jnp.finfo(jnp.float32).max)
HALF = half_dtype()  # float16 on the CPU that CI uses

# --------------------------------------------------------------------------- policies

POLICIES = [
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("p=f32,c=bf16,o=f32", (F32, BF16, F32)),
    ("param=f32,compute=bf16,output=f32", (F32, BF16, F32)),
    ("  params = float32 ,  compute= bfloat16,output =float32  ", (F32, BF16, F32)),
    ("P=F32,C=BF16,O=F32", (F32, BF16, F32)),
    ("output=float32,compute=bfloat16,params=float32", (F32, BF16, F32)),
    ("p=f32, c=f16, o=f32", (F32, F16, F32)),
    ("params=fp32,compute=fp16,output=fp32", (F32, F16, F32)),
    ("bf16", (BF16, BF16, BF16)),
    ("  bfloat16 ", (BF16, BF16, BF16)),
    ("float16", (F16, F16, F16)),
    ("f32", (F32, F32, F32)),
    ("full", (F32, F32, F32)),
    ("half", (HALF, HALF, HALF)),
    ("c=half,o=full", (F32, HALF, F32)),
    # Missing keys: params -> float32, compute -> params, output -> compute.
    ("c=bf16", (F32, BF16, BF16)),
    ("compute=float16", (F32, F16, F16)),
    ("p=bf16", (BF16, BF16, BF16)),
    ("o=bf16", (F32, F32, BF16)),
    ("p=f16,o=f32", (F16, F16, F32)),
    ("p=f64,c=f32", (F64, F32, F32)),
    ("f64", (F64, F64, F64)),
    ("c=float8_e4m3fn,o=f32", (F32, np.dtype(jnp.float8_e4m3fn), F32)),
]


@pytest.mark.parametrize("text,expected", POLICIES, ids=[t for t, _ in POLICIES])
def test_get_policy_parses_and_round_trips(text, expected):
    policy = get_policy(text)
    assert tuple(policy) == expected
    assert all(type(d) is type(np.dtype(d)) for d in policy)  # stored as np.dtype objects
    p, c, o = expected
    assert str(policy) == f"params={p.name},compute={c.name},output={o.name}"
    assert get_policy(str(policy)) == policy
    assert as_policy(str(policy)) == policy
    assert as_policy(policy) is policy


ACCEPTED = r"\(accepted: float32 \(f32, fp32, full\), bfloat16 \(bf16\)"
POLICY_ERRORS = [
    ("", ValueError, r"get_policy: empty policy string"),
    ("   ", ValueError, r"get_policy: empty policy string"),
    ("bf17", ValueError, r"get_policy: unknown dtype 'bf17' for a bare policy " + ACCEPTED),
    ("params=f32,compute=bf17", ValueError,
     r"get_policy: unknown dtype 'bf17' for 'compute' " + ACCEPTED),
    ("p=f32,o=", ValueError, r"unknown dtype '' for 'output'"),
    ("float", ValueError, r"unknown dtype 'float'"),  # numpy's "float" is float64: refused
    ("f4", ValueError, r"unknown dtype 'f4'"),
    ("int32", ValueError, r"dtype 'int32' for a bare policy is not a floating dtype"),
    ("c=int32", ValueError, r"dtype 'int32' for 'compute' is not a floating dtype"),
    ("p=bool", ValueError, r"dtype 'bool' for 'param' is not a floating dtype"),
    ("c=complex64", ValueError, r"'complex64' for 'compute' is not a floating dtype"),
    ("p=f32,compute=bf16,params=f16", ValueError,
     r"get_policy: 'param' is given twice in .* \('p=f32' and 'params=f16'\)"),
    ("c=bf16,c=bf16", ValueError, r"'compute' is given twice"),
    ("cmpute=bf16", ValueError,
     r"get_policy: unknown key 'cmpute' in 'cmpute=bf16' \(accepted: p, param, params, c, "
     r"compute, o, output\)"),
    ("=bf16", ValueError, r"unknown key ''"),
    ("p=f32,bf16", ValueError, r"entry 'bf16' in 'p=f32,bf16' is not key=value"),
    ("p=f32,,c=bf16", ValueError, r"empty entry in 'p=f32,,c=bf16'"),
    ("bf16,", ValueError, r"entry 'bf16' in 'bf16,' is not key=value"),
    (None, TypeError, r"get_policy: text must be a string .* got NoneType"),
    (jnp.bfloat16, TypeError, r"get_policy: text must be a string"),
]


@pytest.mark.parametrize("text,error,match", POLICY_ERRORS,
                         ids=[repr(t) for t, _, _ in POLICY_ERRORS])
def test_get_policy_errors(text, error, match):
    with pytest.raises(error, match=match):
        get_policy(text)


def test_policy_constructor_normalises_and_validates():
    policy = Policy(jnp.float32, "bf16", np.float32)
    assert tuple(policy) == (F32, BF16, F32)
    assert all(isinstance(d, np.dtype) for d in policy)
    assert Policy() == Policy("f32", "f32", "f32")
    assert Policy("bf16") == get_policy("p=bf16")  # the same default rule as get_policy
    assert Policy(compute_dtype="f16") == get_policy("c=f16")
    assert policy.with_output("bf16") == Policy("f32", "bf16", "bf16")
    assert policy.with_compute(jnp.float16) == Policy("f32", "f16", "f32")
    assert policy.with_param("bf16") == Policy("bf16", "bf16", "f32")
    assert policy._replace(output_dtype="f16").output_dtype == F16
    assert repr(policy) == ("Policy(param_dtype=float32, compute_dtype=bfloat16, "
                            "output_dtype=float32)")
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert hash(policy) == hash(get_policy(str(policy)))
    with pytest.raises(ValueError, match=r"Policy: compute_dtype must be a floating dtype, "
                                         r"got int32"):
        Policy(jnp.float32, jnp.int32)
    with pytest.raises(ValueError, match=r"Policy: dtype 'int8' for output_dtype is not a "
                                         r"floating dtype"):
        policy.with_output("int8")
    with pytest.raises(ValueError, match=r"Policy: unknown dtype 'bf17' for param_dtype"):
        policy._replace(param_dtype="bf17")
    with pytest.raises(TypeError, match=r"Policy: param_dtype must be a dtype or its name, "
                                        r"got object"):
        Policy(object())
    # None is no dtype here (numpy would read it as float64, whatever x64 says)
    with pytest.raises(TypeError, match=r"Policy: param_dtype must be a dtype or its name, "
                                        r"got NoneType \(None\)"):
        Policy(None)


def test_as_policy_takes_dtypes_and_refuses_other_things():
    assert as_policy(jnp.bfloat16) == Policy("bf16", "bf16", "bf16")
    assert as_policy(np.dtype("float16")) == get_policy("f16")
    with pytest.raises(TypeError, match=r"as_policy: expected a Policy, its text .* got None"):
        as_policy(None)
    with pytest.raises(TypeError, match=r"as_policy: .* got dict"):
        as_policy({"compute": "bf16"})
    with pytest.raises(TypeError, match=r"Policy: output_dtype must be a dtype or its name, "
                                        r"got dict"):
        Policy("f32", "f32", {"a": 1})
    with pytest.raises(ValueError, match=r"must be a floating dtype, got int32"):
        as_policy(jnp.int32)


def test_policy_is_static_under_jit():
    policy = get_policy("p=f32,c=bf16,o=f32")
    assert jax.tree.leaves(policy) == []
    f = jax.jit(lambda x, pol: pol.cast_to_output(pol.cast_to_compute(x) * 2))
    out = f(jnp.ones(3), policy)
    assert out.dtype == F32
    g = jax.jit(lambda x, pol: pol.cast_to_compute(x), static_argnums=1)
    assert g(jnp.ones(3), policy).dtype == BF16
    assert jax.tree.map(lambda x: x, {"policy": policy})["policy"] == policy


# --------------------------------------------------------------------------- half_dtype


def _fake_devices(capability):
    device = types.SimpleNamespace() if capability is None else types.SimpleNamespace(
        compute_capability=capability)
    return lambda backend=None: [device]


@pytest.mark.parametrize("capability,expected", [
    ("8.0", BF16), ("8.6", BF16), ("9.0", BF16), ("10.0", BF16), ((9, 0), BF16),
    ("7.5", F16), ("7.0", F16), ("6.1", F16), ("gfx90a", F16), (None, F16)])
def test_half_dtype_on_gpu_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(precision.jax, "devices", _fake_devices(capability))
    assert half_dtype("gpu") == expected
    assert half_dtype("CUDA") == expected


def test_half_dtype_rule_for_other_backends(monkeypatch):
    assert half_dtype("tpu") == BF16
    assert half_dtype("TPU") == BF16
    assert half_dtype("cpu") == F16
    assert half_dtype("something-else") == F16
    assert half_dtype() == half_dtype(jax.default_backend())
    if jax.default_backend() == "cpu":
        assert half_dtype() == F16
        assert get_policy("half") == get_policy("f16")

    def no_gpu(backend=None):
        raise RuntimeError(f"Backend '{backend}' failed to initialize")

    monkeypatch.setattr(precision.jax, "devices", no_gpu)
    assert half_dtype("gpu") == F16
    with pytest.raises(TypeError, match=r"half_dtype: backend must be a string .* got int"):
        half_dtype(3)


# --------------------------------------------------------------------------- casting


def mixed_tree(key):
    return {
        "w": jnp.array([1.5, -2.25], jnp.float32),
        "h": jnp.array([0.5], jnp.bfloat16),
        "np": np.array([3.0, 4.0], np.float32),
        "i": jnp.array([1, 2], jnp.int32),
        "b": jnp.array([True, False]),
        "s": 1.5,
        "n": 7,
        "none": None,
        "key": key,
    }


@pytest.mark.parametrize("field", ["param", "compute", "output"])
@pytest.mark.parametrize("text", ["p=f16,c=bf16,o=f32", "p=bf16,c=f32,o=f16"])
def test_cast_changes_only_floating_arrays(key, field, text):
    """One spelling per cast: ``Policy.cast_to_*`` (and ``cast_tree`` for a bare dtype)."""
    policy = get_policy(text)
    dtype = getattr(policy, f"{field}_dtype")
    tree = mixed_tree(key)
    out = getattr(policy, f"cast_to_{field}")(tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for name in ("w", "h", "np"):
        assert out[name].dtype == dtype
        np.testing.assert_array_equal(np.asarray(out[name], np.float32),
                                      np.asarray(tree[name], np.float32))
    assert isinstance(out["np"], np.ndarray)  # numpy stays numpy
    for name in ("i", "b", "s", "n", "none", "key"):
        assert out[name] is tree[name], name
    same = precision.cast_tree(tree, dtype)
    assert all(a is b or (np.asarray(a) == np.asarray(b)).all() for a, b in
               zip(jax.tree.leaves(out), jax.tree.leaves(same), strict=True))


def test_cast_keeps_arrays_that_already_match_and_works_under_jit(key):
    policy = get_policy("p=f32,c=bf16,o=f32")
    x = jnp.ones(3, jnp.float32)
    assert policy.cast_to_param(x) is x  # no copy
    assert precision.cast_tree([x], "f32")[0] is x

    @jax.jit
    def f(tree):
        return policy.cast_to_compute(tree)

    out = f({"x": x, "i": jnp.arange(3), "key": key})
    assert out["x"].dtype == BF16
    assert out["i"].dtype == jnp.int32
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    with pytest.raises(ValueError, match=r"cast_tree: dtype must be a floating dtype"):
        precision.cast_tree(x, jnp.int32)


# --------------------------------------------------------------------------- all_finite


def test_all_finite():
    big = jnp.full((1000,), F32_MAX)  # its sum overflows; every value is finite
    assert bool(all_finite({"a": big, "b": jnp.ones(3, jnp.bfloat16), "i": jnp.arange(3)}))
    assert bool(all_finite({})) and bool(all_finite({"i": jnp.arange(3), "n": None}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan], jnp.bfloat16)}))
    assert not bool(all_finite([jnp.array(-jnp.inf, jnp.float16)]))
    assert not bool(all_finite({"s": float("inf")}))
    assert all_finite({"a": jnp.ones(2)}).dtype == jnp.bool_
    assert all_finite({"a": jnp.ones(2)}).shape == ()
    assert not bool(jax.jit(all_finite)({"a": jnp.array([0.0, jnp.inf]), "b": jnp.ones(2)}))


# --------------------------------------------------------------------------- loss scales

SCALES = {
    "noop": (NoOpLossScale(), 1.0),
    "static": (StaticLossScale(1024.0), 1024.0),
    "dynamic": (DynamicLossScale(initial=2.0 ** 10), 1024.0),
}


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("name", SCALES)
def test_scale_unscale_round_trip(name, dtype):
    loss_scale, factor = SCALES[name]
    assert loss_scale.loss_scale.dtype == F32 and float(loss_scale.loss_scale) == factor
    x = jnp.array([0.5, -1.25, 3e-3, 40.0], dtype)
    tree = {"x": x, "i": jnp.array([3], jnp.int32), "none": None}
    scaled = loss_scale.scale(tree)
    assert scaled["x"].dtype == dtype
    expected = (np.asarray(x, np.float32) * np.float32(factor)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(scaled["x"]), expected)
    assert scaled["i"] is tree["i"] and scaled["none"] is None
    back = loss_scale.unscale(scaled)
    assert back["x"].dtype == dtype
    np.testing.assert_array_equal(np.asarray(back["x"]), np.asarray(x))  # powers of two: exact
    z = {"z": jnp.array([0.5 - 1.25j, 3e-3j])}  # complex leaves: both parts, by the real scale
    zs = loss_scale.scale(z)["z"]
    np.testing.assert_array_equal(np.asarray(zs), np.asarray(z["z"]) * np.float32(factor))
    np.testing.assert_array_equal(np.asarray(loss_scale.unscale({"z": zs})["z"]),
                                  np.asarray(z["z"]))


def test_scale_multiplies_in_float32_and_python_floats_become_arrays():
    s = StaticLossScale(3.0)
    x = jnp.array([0.1, 1.0 / 3.0, 1000.0], jnp.bfloat16)
    expected = (np.asarray(x, np.float32) * np.float32(3.0)).astype(BF16)
    np.testing.assert_array_equal(np.asarray(s.scale(x)), expected)
    loss = s.scale(0.5)
    assert loss.dtype == F32 and float(loss) == 1.5
    with jax.enable_x64(True):  # float64 leaves are scaled in float64, never narrowed
        x64 = jnp.array([0.1, 1.0 / 3.0], jnp.float64)
        np.testing.assert_array_equal(np.asarray(s.unscale(x64)), np.asarray(x64) / 3.0)
        assert s.unscale(x64).dtype == F64
    f16 = jnp.array([60000.0], jnp.float16)  # overflows float16 once scaled: detectable
    assert not bool(all_finite(StaticLossScale(2.0 ** 15).scale(f16)))
    # Unscaling goes through float32, so a float16 gradient scaled beyond float16's
    # precision still comes back right.
    g = jnp.array([2.0 ** -20], jnp.float32)
    big = StaticLossScale(2.0 ** 30)
    assert float(big.unscale(big.scale(g))[0]) == 2.0 ** -20


def test_static_and_noop_adjust_return_themselves_and_survive_jit():
    static, noop = StaticLossScale(8.0), NoOpLossScale()
    assert static.adjust(jnp.array(False)) is static
    assert noop.adjust(False) is noop
    out = jax.jit(lambda s: s.adjust(jnp.array(False)))(static)
    assert isinstance(out, StaticLossScale) and float(out.loss_scale) == 8.0
    assert isinstance(jax.jit(lambda s: s.adjust(True))(noop), NoOpLossScale)
    assert jax.tree.leaves(noop) == []
    assert repr(static) == "StaticLossScale(loss_scale=8.0)"
    assert repr(noop) == "NoOpLossScale()"


def test_dynamic_inf_step_halves_and_period_finite_steps_grow_back():
    period = 5
    s = DynamicLossScale(initial=1024.0, period=period, factor=2, min_scale=1.0)
    s = s.adjust(jnp.array(True))
    assert int(s.counter) == 1
    s = s.adjust(jnp.array(False))
    assert float(s.loss_scale) == 512.0 and int(s.counter) == 0
    for i in range(period - 1):
        s = s.adjust(jnp.array(True))
        assert float(s.loss_scale) == 512.0 and int(s.counter) == i + 1
    s = s.adjust(jnp.array(True))  # the period-th finite step in a row
    assert float(s.loss_scale) == 1024.0 and int(s.counter) == 0
    assert s.loss_scale.dtype == F32 and s.counter.dtype == jnp.int32
    s = DynamicLossScale(initial=100.0, factor=10.0, period=1)
    assert float(s.adjust(True).loss_scale) == 1000.0
    assert float(s.adjust(False).loss_scale) == 10.0


def test_jmp_bug_1_min_scale_survives_jit_scan_and_flattening():
    """jmp's DynamicLossScale drops ``min_loss_scale`` across jit; ours keeps every field."""
    s = DynamicLossScale(initial=2.0 ** 10, period=7, factor=2.0, min_scale=4.0)

    @jax.jit
    def step(state, finite):
        return state.adjust(finite)

    cur = s
    for _ in range(20):
        cur = step(cur, jnp.array(False))
        assert isinstance(cur, DynamicLossScale)
        assert float(cur.min_scale) == 4.0
        assert float(cur.loss_scale) >= 4.0
    assert float(cur.loss_scale) == 4.0

    def body(state, finite):
        state = state.adjust(finite)
        return state, (state.loss_scale, state.min_scale)

    final, (scales, mins) = jax.jit(lambda st: jax.lax.scan(body, st, jnp.zeros(50, bool)))(s)
    assert float(final.min_scale) == 4.0 and np.all(np.asarray(mins) == 4.0)
    assert np.min(np.asarray(scales)) == 4.0 and float(final.loss_scale) == 4.0
    assert int(final.period) == 7 and float(final.factor) == 2.0

    leaves, treedef = jax.tree.flatten(cur)
    assert len(leaves) == 5
    back = jax.tree.unflatten(treedef, leaves)
    for field in ("loss_scale", "counter", "period", "factor", "min_scale"):
        assert getattr(back, field) is getattr(cur, field)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(cur)[0]]
    # a chex dataclass flattens its fields in name order
    assert paths == [".counter", ".factor", ".loss_scale", ".min_scale", ".period"]
    for clone in (pickle.loads(pickle.dumps(cur)), copy.deepcopy(cur), copy.copy(cur)):
        assert repr(clone) == repr(cur)


def test_jmp_bug_2_float16_initial_scale_adjusts_under_jit():
    """jmp's ``adjust`` crashes on a float16 loss scale; ours stores float32 whatever came."""
    s = DynamicLossScale(initial=jnp.float16(1024.0), period=jnp.int16(2),
                         factor=jnp.float16(2.0), min_scale=jnp.float16(1.0))
    assert s.loss_scale.dtype == F32 and s.factor.dtype == F32 and s.min_scale.dtype == F32
    assert s.period.dtype == jnp.int32 and s.counter.dtype == jnp.int32
    step = jax.jit(lambda st, ok: st.adjust(ok))
    s = step(s, jnp.array(False))
    assert float(s.loss_scale) == 512.0 and s.loss_scale.dtype == F32
    s = step(step(s, jnp.array(True)), jnp.array(True))
    assert float(s.loss_scale) == 1024.0 and s.loss_scale.dtype == F32
    # Growing past float16's largest value (65504) is fine: the scale is float32.
    big = DynamicLossScale(initial=jnp.float16(65504.0), period=1)
    assert float(step(big, jnp.array(True)).loss_scale) == 131008.0


def test_dynamic_growth_is_capped_at_the_largest_float32():
    s = DynamicLossScale(initial=2.0 ** 127, period=1, factor=2, min_scale=1.0)
    step = jax.jit(lambda st, ok: st.adjust(ok))
    for _ in range(3):
        s = step(s, jnp.array(True))
        assert np.isfinite(np.asarray(s.loss_scale))
        assert np.asarray(s.loss_scale) == F32_MAX
    s = step(s, jnp.array(False))
    assert np.asarray(s.loss_scale) == F32_MAX / 2
    top = DynamicLossScale(initial=float(F32_MAX), factor=1e30, period=1)
    assert np.asarray(top.adjust(True).loss_scale) == F32_MAX


def reference_trajectory(initial, period, factor, min_scale, flags):
    """The update rule in plain Python with numpy float32 scalars: [(scale, counter), ...]."""
    scale = np.float32(initial)
    factor, min_scale = np.float32(factor), np.float32(min_scale)
    counter, out = 0, []
    for finite in flags:
        if finite:
            counter += 1
            if counter == period:
                with np.errstate(over="ignore"):
                    scale = min(np.float32(scale * factor), F32_MAX)
                counter = 0
        else:
            scale = max(np.float32(scale / factor), min_scale)
            counter = 0
        out.append((float(scale), counter))
    return out


@jax.jit
def _scan_scales(state, flags):
    def body(st, finite):
        st = st.adjust(finite)
        return st, (st.loss_scale, st.counter)

    return jax.lax.scan(body, state, flags)


def test_dynamic_scale_over_5000_random_steps_stays_in_range():
    rng = np.random.default_rng(0)
    # Mostly finite first (the scale climbs to the float32 cap), then mostly not (it
    # falls to the floor), then a mix.
    p_bad = np.concatenate([np.full(2000, 0.01), np.full(1500, 0.7), np.full(1500, 0.2)])
    flags = rng.random(5000) >= p_bad
    s = DynamicLossScale(initial=2.0 ** 15, period=5, factor=2.0, min_scale=2.0)
    final, (scales, counters) = _scan_scales(s, jnp.asarray(flags))
    scales, counters = np.asarray(scales), np.asarray(counters)
    assert scales.dtype == np.float32 and scales.shape == (5000,)
    assert np.all(np.isfinite(scales))
    assert np.all(scales >= 2.0)
    assert np.all((counters >= 0) & (counters < 5))
    assert scales.max() == F32_MAX and scales.min() == 2.0  # both ends were reached
    ref = reference_trajectory(2.0 ** 15, 5, 2.0, 2.0, flags)
    np.testing.assert_array_equal(scales, np.array([r[0] for r in ref], np.float32))
    np.testing.assert_array_equal(counters, [r[1] for r in ref])
    assert float(final.min_scale) == 2.0 and int(final.period) == 5


_adjust = jax.jit(lambda st, ok: st.adjust(ok))


@settings(max_examples=40, deadline=None)
@given(
    flags=st.lists(st.booleans(), min_size=1, max_size=120),
    period=st.integers(1, 6),
    factor=st.sampled_from([2.0, 1.5, 3.0, 10.0, 1e20]),
    log2_initial=st.integers(-10, 127),
    min_fraction=st.sampled_from([1.0, 0.5, 1e-3, 1e-30]),
)
def test_dynamic_scale_matches_reference_model(flags, period, factor, log2_initial,
                                               min_fraction):
    initial = 2.0 ** log2_initial
    min_scale = max(initial * min_fraction, 1e-37)
    # One compilation serves every example: all hyperparameters are array leaves.
    s = DynamicLossScale(initial=initial, period=period, factor=factor, min_scale=min_scale)
    expected = reference_trajectory(initial, period, factor, min_scale, flags)
    for finite, (ref_scale, ref_counter) in zip(flags, expected, strict=True):
        s = _adjust(s, jnp.array(finite))
        scale = np.asarray(s.loss_scale)
        assert np.isfinite(scale) and scale >= np.float32(min_scale)
        assert 0 <= int(s.counter) < period
        assert float(scale) == ref_scale and int(s.counter) == ref_counter
    assert float(s.min_scale) == float(np.float32(min_scale))
    assert int(s.period) == period


def test_dynamic_scale_hyperparameters_do_not_recompile():
    calls = []

    @jax.jit
    def step(st, ok):
        calls.append(1)  # runs once per trace
        return st.adjust(ok)

    for kw in [dict(), dict(initial=8.0, period=3), dict(factor=4.0, min_scale=0.5)]:
        step(DynamicLossScale(**kw), jnp.array(True))
    assert len(calls) == 1


def test_dynamic_scale_built_from_tracers_and_sentinel_leaves():
    out = jax.jit(lambda init: DynamicLossScale(initial=init, period=1).adjust(True))(3.0)
    assert float(out.loss_scale) == 6.0
    treedef = jax.tree.structure(DynamicLossScale())
    sentinel = treedef.unflatten([object()] * 5)  # skips __init__: no validation
    assert isinstance(sentinel, DynamicLossScale)
    assert repr(sentinel).startswith("DynamicLossScale(loss_scale=<object")
    batched = jax.vmap(lambda init: DynamicLossScale(initial=init).adjust(False))(
        jnp.array([4.0, 8.0]))
    np.testing.assert_array_equal(np.asarray(batched.loss_scale), [2.0, 4.0])
    assert repr(DynamicLossScale()) == ("DynamicLossScale(loss_scale=32768.0, counter=0, "
                                        "period=2000, factor=2.0, min_scale=1.0)")


def test_loss_scales_are_immutable():
    s = DynamicLossScale()
    with pytest.raises(AttributeError, match="DynamicLossScale is immutable"):
        s.loss_scale = jnp.float32(2.0)
    with pytest.raises(AttributeError, match="StaticLossScale is immutable"):
        StaticLossScale(2.0).loss_scale = 3.0


DYNAMIC_ERRORS = [
    (dict(initial=0), ValueError, r"DynamicLossScale: initial must be a finite number > 0, "
                                  r"got 0\.0"),
    (dict(initial=-1.0), ValueError, r"initial must be a finite number > 0, got -1\.0"),
    (dict(initial=float("inf")), ValueError, r"initial must be a finite number > 0, got inf"),
    (dict(initial=float("nan")), ValueError, r"initial must be a finite number > 0, got nan"),
    (dict(initial=1e39), ValueError, r"initial .* got 1e\+39 \(it overflows float32"),
    (dict(initial=1e-50), ValueError, r"initial .* got 1e-50 \(0 in float32\)"),
    (dict(initial="1024"), TypeError, r"initial must be a real number, got str"),
    (dict(initial=jnp.ones(2)), ValueError, r"initial must be a scalar, got shape \(2,\)"),
    (dict(period=0), ValueError, r"DynamicLossScale: period must be an integer in "
                                 r"\[1, 2147483647\], got 0"),
    (dict(period=2 ** 31), ValueError, r"period must be an integer in \[1, 2147483647\]"),
    (dict(period=2.5), TypeError, r"DynamicLossScale: period must be an integer >= 1 .* "
                                  r"got float \(2\.5\)"),
    (dict(period=True), TypeError, r"period must be an integer >= 1 .* got bool"),
    (dict(factor=1.0), ValueError, r"DynamicLossScale: factor must be a finite number > 1, "
                                   r"got 1\.0"),
    (dict(factor=0.5), ValueError, r"factor must be a finite number > 1, got 0\.5"),
    (dict(factor=1 + 1e-10), ValueError, r"factor .* \(1 in float32\)"),
    (dict(min_scale=0.0), ValueError, r"DynamicLossScale: min_scale must be a finite number "
                                      r"> 0, got 0\.0"),
    (dict(initial=8.0, min_scale=16.0), ValueError,
     r"DynamicLossScale: min_scale must be <= initial, got min_scale=16 and initial=8"),
]


@pytest.mark.parametrize("kwargs,error,match", DYNAMIC_ERRORS,
                         ids=[str(k) for k, _, _ in DYNAMIC_ERRORS])
def test_dynamic_loss_scale_validates_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicLossScale(**kwargs)


def test_static_loss_scale_and_adjust_errors():
    with pytest.raises(ValueError, match=r"StaticLossScale: scale must be a finite number > 0, "
                                         r"got 0\.0"):
        StaticLossScale(0)
    with pytest.raises(ValueError, match=r"StaticLossScale: scale .* got inf"):
        StaticLossScale(float("inf"))
    with pytest.raises(TypeError, match=r"StaticLossScale: scale must be a real number"):
        StaticLossScale(None)
    assert StaticLossScale(jnp.float16(4.0)).loss_scale.dtype == F32
    s = DynamicLossScale()
    with pytest.raises(ValueError, match=r"DynamicLossScale.adjust: grads_finite must be a "
                                         r"scalar boolean .* got shape \(3,\)"):
        s.adjust(jnp.ones(3, bool))
    with pytest.raises(TypeError, match=r"DynamicLossScale.adjust: grads_finite must be a "
                                        r"boolean .* got dtype float32"):
        s.adjust(jnp.float32(1.0))
    with pytest.raises(TypeError, match=r"StaticLossScale.adjust: grads_finite must be a "
                                        r"boolean"):
        StaticLossScale(2.0).adjust(1)


def test_all_finite_with_large_leaves_and_mixed_dtypes():
    # Small leaves are tested joined per dtype, large ones alone: a NaN anywhere is found.
    big = np.zeros(70_000, np.float32)
    tree = {"big": big, "h": np.ones(3, np.float16), "b": jnp.ones(5, jnp.bfloat16),
            "s": np.ones(4, np.float32), "i": np.arange(3)}
    assert bool(jax.jit(precision.all_finite)(tree))
    for key, bad in [("big", big.copy()), ("h", np.ones(3, np.float16)),
                     ("b", np.ones(5, np.float32)), ("s", np.ones(4, np.float32))]:
        bad[-1] = np.nan if key != "h" else np.inf
        broken = {**tree, key: bad.astype(tree[key].dtype) if key == "b" else bad}
        assert not bool(jax.jit(precision.all_finite)(broken)), key


def test_softmax_layer_keeps_only_compute_dtype_residuals():
    """nn.softmax under bf16 saves its bf16 output for the backward pass (512 B here), not
    a float32 copy (1,024 B, as jax.nn.softmax on upcast inputs keeps). Both losses also
    keep the 256 B weight vector they multiply by."""
    from funtrain import nn, profile

    x = jnp.ones((4, 64), jnp.bfloat16)
    w = jnp.arange(64.0)
    layer = nn.softmax(axis=0)

    def ours(x):
        return jnp.sum(layer.apply({}, x).astype(jnp.float32) * w)

    def upcast(x):
        return jnp.sum(jax.nn.softmax(x.astype(jnp.float32), axis=0) * w)

    assert profile.residual_bytes(ours, x) <= 512 + 256 + 16
    assert profile.residual_bytes(upcast, x) >= 1024 + 256
    # the policy as text, as a Policy and as one dtype: the same cast (4 x 64 float32 in)
    f32 = jnp.ones((4, 64))
    sizes = {profile.residual_bytes(ours, f32, policy=p) for p in
             ("bf16", precision.Policy("bf16", "bf16", "bf16"), jnp.bfloat16)}
    assert sizes == {profile.residual_bytes(ours, x)}
    np.testing.assert_allclose(np.asarray(jax.grad(ours)(x), np.float32),
                               np.asarray(jax.grad(upcast)(x), np.float32), atol=1e-2)


def test_replace_copies_without_checks_and_names_unknown_fields():
    s = DynamicLossScale(initial=8.0, period=3)
    t = s.replace(min_scale=jnp.float32(2.0))
    assert float(t.min_scale) == 2.0 and float(s.min_scale) == 1.0  # s is unchanged
    assert float(t.loss_scale) == 8.0 and int(t.period) == 3
    traced = jax.jit(lambda sc, m: sc.replace(min_scale=m))(s, jnp.float32(4.0))
    assert isinstance(traced, DynamicLossScale) and float(traced.min_scale) == 4.0
    with pytest.raises(TypeError, match=r"DynamicLossScale.replace: no field min_scal; the "
                                        r"fields are loss_scale, counter, period, factor, "
                                        r"min_scale"):
        s.replace(min_scal=1.0)
    assert not hasattr(DynamicLossScale, "from_tuple")
