"""batch_norm: PyTorch's convention against torch, flax's against numpy and flax.linen,
float32 statistics under bf16, cross-device statistics, composition (jit, remat, repeat,
with_policy, grad) and errors that name the layer's key path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import nn, remat, train

RNG = np.random.default_rng(0)
KEY = jax.random.key(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws the same data whether it runs alone or after others."""
    RNG.bit_generator.state = np.random.default_rng(0).bit_generator.state


def batch(*shape, step=0):
    """Random float32 with a different mean and spread per channel and per step."""
    c = shape[-1]
    loc = np.linspace(-1.0, 2.0, c) + 0.3 * step
    spread = np.linspace(0.5, 3.0, c) * (1.0 + 0.1 * step)
    return (RNG.standard_normal(shape) * spread + loc).astype(np.float32)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


def grad_close(a, b, tol=1e-5):
    """Gradients are sums over the batch: the error bound scales with their size."""
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(b).max())))


def tree_close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: close(x, y, tol), a, b)


def tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def bn_states(tree):
    """Every BatchNorm state (a dict with count/mean/var) in a model state."""
    if isinstance(tree, dict) and {"count", "mean", "var"} <= set(tree):
        return [tree]
    return [s for v in (tree or {}).values() for s in bn_states(v)]


# ----------------------------------------------------------------------------- torch


def to_torch(x):
    """channels last -> channels first (N, C, ...)."""
    return np.moveaxis(x, -1, 1).copy()


def from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (16, 3), (8, 7, 3)],
                         ids=["BatchNorm2d", "BatchNorm1d-NC", "BatchNorm1d-NLC"])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch(shape, affine):
    """Train outputs and input/param gradients each step, running stats and count after
    10 steps, then eval outputs and gradients: all as torch's BatchNorm to 1e-5."""
    torch = pytest.importorskip("torch")
    c = shape[-1]
    bn = nn.batch_norm(use_scale=affine, use_bias=affine)
    params, state = bn.init(KEY, jnp.zeros((1, *shape[1:])))
    tbn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c, affine=affine)
    assert tbn.momentum == 0.1 and tbn.eps == 1e-5
    if affine:
        params = {"scale": jnp.asarray(batch(c) + 1.0), "bias": jnp.asarray(batch(c))}
        with torch.no_grad():
            tbn.weight.copy_(torch.from_numpy(np.array(params["scale"])))
            tbn.bias.copy_(torch.from_numpy(np.array(params["bias"])))
    else:
        assert params == {}

    def loss(p, x, s, g, train):
        y, new = bn.apply(p, x, state=s, train=train)
        return jnp.sum(y * g), (y, new)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=4)

    def torch_run(x, g):
        tx = torch.from_numpy(to_torch(x)).requires_grad_(True)
        ty = tbn(tx)
        (ty * torch.from_numpy(to_torch(g))).sum().backward()
        dp = {}
        if affine:
            dp = {"scale": tbn.weight.grad.numpy().copy(), "bias": tbn.bias.grad.numpy().copy()}
            tbn.weight.grad = tbn.bias.grad = None
        return from_torch(ty), dp, from_torch(tx.grad)

    tbn.train()
    for step in range(10):
        x, g = batch(*shape, step=step), batch(*shape)
        (dp, dx), (y, state) = grad(params, x, state, g, True)
        ty, tdp, tdx = torch_run(x, g)
        close(y, ty)
        grad_close(dx, tdx)
        jax.tree.map(grad_close, dp, tdp)
    close(state["mean"], tbn.running_mean.numpy())
    close(state["var"], tbn.running_var.numpy())
    assert int(state["count"]) == int(tbn.num_batches_tracked) == 10
    assert {k: v.dtype for k, v in state.items()} == {
        "mean": jnp.float32, "var": jnp.float32, "count": jnp.int32}

    tbn.eval()
    x, g = batch(*shape, step=3), batch(*shape)
    (dp, dx), (y, same) = grad(params, x, state, g, False)
    ty, tdp, tdx = torch_run(x, g)
    close(y, ty)
    grad_close(dx, tdx)
    jax.tree.map(grad_close, dp, tdp)
    tree_equal(same, state)  # eval mode leaves the state as it came


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_running_variance_matches_torch_for_inputs_far_from_zero(offset):
    """Two-pass statistics: E[x^2] - E[x]^2 would cancel in float32 far from zero."""
    torch = pytest.importorskip("torch")
    x = batch(8, 5, 5, 3) + offset
    bn = nn.batch_norm()
    params, state = bn.init(KEY, x)
    _, state = bn.apply(params, x, state=state, train=True)
    tbn = torch.nn.BatchNorm2d(3)
    tbn(torch.from_numpy(to_torch(x)))
    close(state["var"], tbn.running_var.numpy())


# ----------------------------------------------------------------------------- flax


def flax_reference(params, xs, x_eval, momentum=0.99, eps=1e-5):
    """float64 numpy from the formula: decay ``momentum``, biased batch variance."""
    scale, bias = (np.asarray(params[k], np.float64) for k in ("scale", "bias"))
    c = xs[0].shape[-1]
    mean, var, ys = np.zeros(c), np.ones(c), []
    for x in xs:
        x = np.asarray(x, np.float64)
        axes = tuple(range(x.ndim - 1))
        m, v = x.mean(axes), x.var(axes)
        ys.append((x - m) / np.sqrt(v + eps) * scale + bias)
        mean = momentum * mean + (1 - momentum) * m
        var = momentum * var + (1 - momentum) * v
    y_eval = (np.asarray(x_eval, np.float64) - mean) / np.sqrt(var + eps) * scale + bias
    return ys, mean, var, y_eval


def run_funtrain(bn, params, xs, x_eval):
    _, state = bn.init(KEY, xs[0])
    ys = []
    for x in xs:
        y, state = bn.apply(params, x, state=state, train=True)
        ys.append(y)
    y_eval, _ = bn.apply(params, x_eval, state=state)
    return ys, state, y_eval


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_flax_convention_matches_numpy(momentum):
    bn = nn.batch_norm(convention="flax", momentum=momentum)
    xs = [batch(8, 3, 3, 4, step=i) for i in range(10)]
    x_eval = batch(5, 3, 3, 4, step=2)
    params = {"scale": jnp.asarray(batch(4) + 1.0), "bias": jnp.asarray(batch(4))}
    ys, state, y_eval = run_funtrain(bn, params, xs, x_eval)
    ref_ys, mean, var, ref_eval = flax_reference(params, xs, x_eval,
                                                 0.99 if momentum is None else momentum)
    for y, r in zip(ys, ref_ys, strict=True):
        close(y, r)
    close(state["mean"], mean)
    close(state["var"], var)
    close(y_eval, ref_eval)
    assert int(state["count"]) == 10


def test_flax_convention_matches_flax_linen():
    linen = pytest.importorskip("flax.linen")
    bn = nn.batch_norm(convention="flax")
    xs = [batch(8, 3, 3, 4, step=i) for i in range(10)]
    x_eval = batch(5, 3, 3, 4, step=2)
    params = {"scale": jnp.asarray(batch(4) + 1.0), "bias": jnp.asarray(batch(4))}
    ys, state, y_eval = run_funtrain(bn, params, xs, x_eval)

    fbn = linen.BatchNorm(momentum=0.99, epsilon=1e-5)
    variables = fbn.init(KEY, xs[0], use_running_average=False)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    for x, y in zip(xs, ys, strict=True):
        fy, updates = fbn.apply(variables, x, use_running_average=False,
                                mutable=["batch_stats"])
        variables = {**variables, **updates}
        close(y, fy)
    close(state["mean"], variables["batch_stats"]["mean"])
    close(state["var"], variables["batch_stats"]["var"])
    close(y_eval, fbn.apply(variables, x_eval, use_running_average=True))


# ----------------------------------------------------------------------------- precision


def test_bf16_inputs_keep_float32_statistics():
    bn = nn.batch_norm()
    x = jnp.asarray(batch(8, 4, 4, 3), jnp.bfloat16)
    params, state = bn.init(KEY, x)
    assert {k: v.dtype for k, v in state.items()} == {
        "mean": jnp.float32, "var": jnp.float32, "count": jnp.int32}
    y, new = bn.apply(params, x, state=state, train=True)
    assert y.dtype == jnp.bfloat16
    assert {k: v.dtype for k, v in new.items()} == {
        "mean": jnp.float32, "var": jnp.float32, "count": jnp.int32}
    # the statistics are those of the bf16 values, computed in float32
    y32, ref = bn.apply(params, x.astype(jnp.float32), state=state, train=True)
    tree_close(new, ref, 1e-6)
    close(y, y32, 2e-2)
    y_eval, same = bn.apply(params, x, state=new)
    assert y_eval.dtype == jnp.bfloat16
    tree_equal(same, new)


def test_with_policy_keeps_statistics_float32():
    plain = nn.serial(nn.dense(6), nn.batch_norm(), nn.relu(), nn.dense(3), nn.batch_norm())
    model = nn.with_policy(plain, "params=float32,compute=bfloat16,output=float32")
    x = jnp.asarray(batch(16, 5))
    params, state = model.init(KEY, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

    @jax.jit
    def run(params, state):
        y, new = model.apply(params, x, state=state, train=True)
        # the model run by hand on bf16 params and inputs
        bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        _, ref = plain.apply(bf16, x.astype(jnp.bfloat16), state=state, train=True)
        y_eval, same = model.apply(params, x, state=new)
        grads = jax.grad(lambda p: jnp.sum(model.apply(p, x, state=state, train=True)[0] ** 2)
                         )(params)
        return y, new, ref, y_eval, same, grads

    y, new, ref, y_eval, same, grads = run(params, state)
    assert y.dtype == y_eval.dtype == jnp.float32
    for s in bn_states(new):
        assert (s["mean"].dtype, s["var"].dtype, s["count"].dtype) == (
            jnp.float32, jnp.float32, jnp.int32)
        assert int(s["count"]) == 1
    tree_close(new, ref, 1e-6)
    tree_equal(same, new)
    # a grad through the policy reaches the float32 master params
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
               for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["dense_0"]["w"])).sum() > 0


# ----------------------------------------------------------------------------- axis_name


@pytest.mark.parametrize("shape", [(4, 6, 3), (2, 3, 4, 4, 5)])
def test_axis_name_equals_one_batch(shape):
    """vmap over devices with axis_name: outputs, running stats and input grads equal one
    apply on the concatenated batch."""
    devices, c = shape[0], shape[-1]
    x = batch(*shape)
    g = batch(*shape)
    synced, single = nn.batch_norm(axis_name="d"), nn.batch_norm()
    params, state = synced.init(KEY, x[0])
    params = {"scale": batch(c) + 1.0, "bias": batch(c)}

    def per_device(x, p):
        return synced.apply(p, x, state=state, train=True)

    # jitted: eager, the vmapped and plain applies and grads compiled ~75 one-op programs
    y, new = jax.jit(jax.vmap(per_device, in_axes=(0, None), axis_name="d"))(x, params)
    flat = x.reshape(-1, *shape[2:])
    ref_y, ref = jax.jit(lambda p, x: single.apply(p, x, state=state, train=True))(params,
                                                                                    flat)
    close(np.asarray(y).reshape(flat.shape), ref_y)
    for k in ("mean", "var"):
        assert new[k].shape == (devices, c)
        for d in range(devices):
            close(np.asarray(new[k])[d], ref[k])
    np.testing.assert_array_equal(new["count"], np.ones(devices))

    def loss(x, p):
        return jnp.sum(jax.vmap(per_device, in_axes=(0, None), axis_name="d")(x, p)[0] * g)

    def ref_loss(x, p):
        return jnp.sum(single.apply(p, x.reshape(flat.shape), state=state, train=True)[0]
                       * g.reshape(flat.shape))

    tree_close(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params),
               jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(x, params), 1e-4)


# ----------------------------------------------------------------------------- composition


def deep_mlp(checkpoint=None):
    """Nine layers, three BatchNorms (two conventions): "sqrt" cuts it into three segments,
    each with a BatchNorm."""
    return nn.serial(nn.dense(6), nn.batch_norm(), nn.relu(), nn.dense(6),
                     nn.batch_norm(momentum=0.3), nn.relu(), nn.dense(6),
                     nn.batch_norm(convention="flax"), nn.dense(3), checkpoint=checkpoint)


def loss_and_state(model, params, state, x):
    def loss(p, x):
        y, new = model.apply(p, x, state=state, train=True)
        return jnp.sum(y ** 2), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new, grads


def test_jit_matches_eager():
    model = nn.serial(nn.dense(4), nn.batch_norm(), nn.relu(), nn.dense(3),
                      nn.batch_norm(convention="flax"))
    x = jnp.asarray(batch(6, 5))
    params, state = model.init(KEY, x)
    y, new = model.apply(params, x, state=state, train=True)
    jy, jnew = jax.jit(lambda p, s, x: model.apply(p, x, state=s, train=True))(params, state, x)
    close(jy, y, 1e-6)
    tree_close(jnew, new, 1e-6)
    assert [int(s["count"]) for s in bn_states(jnew)] == [1, 1]
    e, same = jax.jit(lambda p, s, x: model.apply(p, x, state=s))(params, new, x)
    close(e, model.apply(params, x, state=new)[0], 1e-6)
    tree_equal(same, new)


@pytest.fixture(scope="module")
def plain_run():
    model = deep_mlp()
    x = jnp.asarray(batch(8, 5))
    params, state = model.init(KEY, x)
    return params, state, x, jax.jit(loss_and_state, static_argnums=0)(model, params, state, x)


@pytest.mark.parametrize("wrap", ["checkpoint", "sqrt", 2])
def test_remat_matches_the_plain_model(wrap, plain_run):
    """remat.checkpoint and serial(checkpoint=...) give the same outputs, new state and
    gradients (params and input) as the model without checkpointing."""
    params, state, x, (ry, rnew, rgrads) = plain_run
    model = remat.checkpoint(deep_mlp()) if wrap == "checkpoint" else deep_mlp(checkpoint=wrap)
    assert jax.tree.structure(model.init(KEY, x)) == jax.tree.structure((params, state))
    y, new, grads = jax.jit(loss_and_state, static_argnums=0)(model, params, state, x)
    close(y, ry, 1e-6)
    tree_close(new, rnew, 1e-6)
    tree_close(grads, rgrads, 1e-5)
    assert [int(s["count"]) for s in bn_states(new)] == [1, 1, 1]
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))
    e, same = model.apply(params, x, state=new)
    close(e, deep_mlp().apply(params, x, state=new)[0], 1e-6)
    tree_equal(same, new)


@pytest.mark.parametrize("mode", [None, "block", "sqrt"])
def test_repeat_stacks_state_and_equals_the_blocks_one_by_one(mode):
    block = nn.serial(nn.dense(5), nn.batch_norm(), nn.relu())
    n = 4
    deep = remat.repeat(block, n, remat=mode)
    x = jnp.asarray(batch(8, 5))
    params, state = deep.init(KEY, x)
    assert params["dense_0"]["w"].shape == (n, 5, 5)
    assert jax.tree.map(jnp.shape, state) == {
        "batch_norm_0": {"mean": (n, 5), "var": (n, 5), "count": (n,)}}

    def by_hand(params, state, train=True):
        h, states = x, []
        for i in range(n):
            p, s = jax.tree.map(lambda a, i=i: a[i], (params, state))
            h, s = block.apply(p, h, state=s, train=train)
            states.append(s)
        return h, jax.tree.map(lambda *a: jnp.stack(a), *states)

    def train_loss(apply, p):
        y, new = apply(p, state)
        return jnp.sum(y ** 2), (y, new)

    @jax.jit
    def run(params):
        got = jax.grad(train_loss, argnums=1, has_aux=True)(
            lambda p, s: deep.apply(p, x, state=s, train=True), params)
        want = jax.grad(train_loss, argnums=1, has_aux=True)(by_hand, params)
        new = got[1][1]
        return got, want, deep.apply(params, x, state=new), by_hand(params, new, train=False)

    (g, (y, new)), (rg, (ry, rnew)), (e, same), (re, _) = run(params)
    close(y, ry, 1e-6)
    tree_close(new, rnew, 1e-6)
    np.testing.assert_array_equal(new["batch_norm_0"]["count"], np.ones(n))
    tree_close(g, rg, 1e-5)
    close(e, re, 1e-6)
    tree_equal(same, new)


def test_grad_flows_to_params_and_inputs_in_train_mode():
    bn = nn.batch_norm()
    x = jnp.asarray(batch(6, 3))
    params, state = bn.init(KEY, x)
    w = jnp.asarray(batch(6, 3))
    dp, dx = jax.grad(lambda p, x: jnp.sum(bn.apply(p, x, state=state, train=True)[0] * w),
                      argnums=(0, 1))(params, x)
    assert set(dp) == {"scale", "bias"}
    assert all(np.abs(np.asarray(v)).min() > 0 for v in (dp["scale"], dp["bias"]))
    assert np.abs(np.asarray(dx)).sum() > 0
    # the batch mean is part of the graph: a constant shift of the input changes nothing
    close(np.asarray(dx, np.float64).sum(axis=0), np.zeros(3), 1e-5)
    # the running statistics are not: they carry no gradient
    ds = jax.grad(lambda x: jnp.sum(bn.apply(params, x, state=state, train=True)[1]["mean"]))(x)
    np.testing.assert_array_equal(ds, np.zeros(x.shape))


# ----------------------------------------------------------------------------- errors


def shapes_of(model, x):
    """``(params, state)`` as ShapeDtypeStructs: no init compute (a ResNet's eager init is
    slow), and errors raised while tracing ``apply`` need no values."""
    return jax.eval_shape(model.init, KEY, x)


def test_missing_state_is_an_error():
    x = jnp.ones((2, 8, 8, 1))
    for model in (nn.batch_norm(), nn.models.resnet(18, 10, stem="cifar", width=2)):
        params, _ = shapes_of(model, x)
        with pytest.raises(nn.ModuleError, match=r"\(at the root\): this layer has model "
                                                 r"state .* but none was passed"):
            jax.eval_shape(lambda p, model=model: model.apply(p, x), params)
    params, _ = nn.batch_norm().init(KEY, x)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer \(at the root\): this layer "
                                             r"has model state"):
        nn.batch_norm().apply(params, x, train=True)  # eager, and in train mode too
    # nested: the missing entry is named by its key path
    model = nn.serial(nn.dense(3), nn.serial(nn.dense(3), nn.batch_norm(name="bn"),
                                             name="inner"))
    params, state = model.init(KEY, jnp.ones((2, 3)))
    with pytest.raises(nn.ModuleError, match=r"'inner': model state does not match the "
                                             r"model: missing key path\(s\) 'inner/bn'"):
        model.apply(params, jnp.ones((2, 3)), state={"inner": {}}, train=True)
    with pytest.raises(nn.ModuleError, match=r"'inner/bn': this layer has model state"):
        model.apply(params, jnp.ones((2, 3)), state={"inner": {"bn": None}}, train=True)


def test_state_from_another_model_is_an_error():
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    model = nn.models.resnet(18, 10, stem="cifar", width=4)
    params, _ = shapes_of(model, x)

    def apply(state):
        return jax.eval_shape(lambda p, s: model.apply(p, x, state=s, train=True), params,
                              state)

    _, narrower = shapes_of(nn.models.resnet(18, 10, stem="cifar", width=2), x)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn1': model state "
                                             r"'bn1/mean' has shape \(2,\), expected \(4,\)"):
        apply(narrower)
    _, deeper = shapes_of(nn.models.resnet(34, 10, stem="cifar", width=4), x)
    with pytest.raises(nn.ModuleError, match=r"serial layer 'layer1': model state .*"
                                             r"unexpected key path\(s\) 'layer1/2'"):
        apply(deeper)
    # a state dict with the wrong keys, eager
    bn_model = nn.serial(nn.dense(3), nn.batch_norm(name="bn"))
    p, s = bn_model.init(KEY, jnp.ones((2, 3)))
    wrong = {"bn": {"mean": s["bn"]["mean"], "variance": s["bn"]["var"]}}
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn': model state must be a "
                                             r"dict with keys \['count', 'mean', 'var'\], got "
                                             r"\['mean', 'variance'\]"):
        bn_model.apply(p, jnp.ones((2, 3)), state=wrong, train=True)
    with pytest.raises(nn.ModuleError, match=r"unexpected key path\(s\) 'extra'"):
        bn_model.apply(p, jnp.ones((2, 3)), state={**s, "extra": s["bn"]}, train=True)


def test_eval_before_any_statistics_is_an_error():
    x = jnp.asarray(batch(4, 8, 8, 1))
    bn = nn.batch_norm()
    params, state = bn.init(KEY, x)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer \(at the root\): eval mode "
                                             r"\(train=False\) before any statistics exist"):
        bn.apply(params, x, state=state)
    # nested, eager: the first BatchNorm reached names itself
    model = nn.serial(nn.flatten(), nn.dense(4, name="fc0"), nn.batch_norm(name="bn1"),
                      nn.relu(), nn.residual(nn.dense(4), nn.batch_norm(name="bn"), name="block"),
                      nn.dense(10, name="fc"))
    params, state = model.init(KEY, x)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn1': eval mode"):
        model.apply(params, x, state=state)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'block/bn': eval mode"):
        model.apply(params, x, state={**state, "bn1": {**state["bn1"], "count": 1}})
    # the eval step and evaluate check every BatchNorm before running
    eval_step = train.make_eval_step(train.classifier_eval(model))
    batches = [{"x": x, "y": jnp.zeros(4, jnp.int32)}]
    match = r"eval_step: eval mode before any statistics exist: the BatchNorm state at 'bn1'"
    with pytest.raises(ValueError, match=match + r", 'block/bn' has never been updated"):
        eval_step(params, batches[0], state)
    with pytest.raises(ValueError, match=match):
        train.evaluate(eval_step, params, batches, model_state=state)
    # after one train step every BatchNorm has statistics, and eval runs
    _, trained = model.apply(params, x, state=state, train=True)
    metrics = train.evaluate(eval_step, params, batches, model_state=trained)
    assert set(metrics) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match=r"the BatchNorm state at 'block/bn' has never"):
        eval_step(params, batches[0], {**trained, "block": state["block"]})
    # a ResNet's eval step names every layer (its params and state are cheap zeros)
    resnet = nn.models.resnet(18, 10, stem="cifar", width=2)
    params, state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes_of(resnet, x))
    resnet_eval = train.make_eval_step(train.classifier_eval(resnet))
    with pytest.raises(ValueError, match=match + r", 'layer1/0/bn1', 'layer1/0/bn2', .*"
                                                 r"'layer4/1/bn2' has never been updated"):
        resnet_eval(params, batches[0], state)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn1': eval mode"):
        resnet.apply(params, x, state=state)


@pytest.mark.parametrize("kwargs, match", [
    ({"momentum": 1.5}, r"momentum must be a float in \[0, 1\], got 1.5"),
    ({"momentum": -0.1}, r"momentum must be a float in \[0, 1\], got -0.1"),
    ({"momentum": "0.1"}, r"momentum must be a float in \[0, 1\], got '0.1'"),
    ({"momentum": True}, r"momentum must be a float in \[0, 1\], got True"),
    ({"convention": "keras"}, r"convention must be one of \['flax', 'pytorch'\], got 'keras'"),
    ({"epsilon": 0.0}, r"epsilon must be > 0, got 0.0"),
    ({"epsilon": -1e-5}, r"epsilon must be > 0, got -1e-05"),
    ({"name": "a/b"}, r"a layer name must be a non-empty string without '/'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.batch_norm(**kwargs)


def test_bad_inputs_name_the_layer():
    model = nn.serial(nn.dense(3), nn.batch_norm(name="bn"))
    params, state = model.init(KEY, jnp.ones((2, 3)))
    # one value per channel: the variance is 0 and the output the bias alone (torch raises)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn': train=True needs more "
                                             r"than one value per channel.*shape \(1, 3\)"):
        model.apply(params, jnp.ones((1, 3)), state=state, train=True)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer 'bn': param 'bn/scale' has "
                                             r"shape \(3,\), expected \(5,\)"):
        nn.serial(nn.dense(5), nn.batch_norm(name="bn")).apply(
            params | {"dense_0": {"w": jnp.ones((3, 5)), "b": jnp.ones(5)}}, jnp.ones((2, 3)),
            state=state, train=True)
    with pytest.raises(nn.ModuleError, match=r"batch_norm layer \(at the root\): expected an "
                                             r"input of rank >= 2"):
        nn.batch_norm().init(KEY, jnp.ones(3))


def test_eval_before_statistics_is_caught_through_remat_wrappers_and_float64_state():
    """remat.checkpoint, serial(checkpoint=...) and remat.repeat trace the model (the count
    is a tracer inside), so they check an eager eval-mode call's state first."""
    x = jnp.ones((2, 3))
    block = nn.serial(nn.dense(3), nn.batch_norm(name="bn"))
    for model, where in ((remat.checkpoint(block), r"serial \(checkpointed\)"),
                         (nn.serial(nn.dense(3), nn.batch_norm(name="bn"), checkpoint=1),
                          r"serial \(checkpointed\)"),
                         (remat.repeat(block, 2), "repeat")):
        params, state = model.init(KEY, x)
        with pytest.raises(ValueError, match=where + r": eval mode before any statistics "
                                                     r"exist: the BatchNorm state at 'bn'"):
            model.apply(params, x, state=state)
        _, trained = model.apply(params, x, state=state, train=True)
        model.apply(params, x, state=trained)  # trained: fine
    with jax.enable_x64(True):
        params, state = nn.batch_norm().init(KEY, jnp.zeros((2, 3), jnp.float64))
        assert state["mean"].dtype == jnp.float64  # float64 statistics for float64 inputs


def test_an_empty_batch_leaves_the_running_statistics_as_they_are():
    """Its statistics are 0/0: they filled the state with NaN, and every later eval too."""
    bn = nn.batch_norm()
    params, state = bn.init(KEY, jnp.zeros((1, 3)))
    _, state = bn.apply(params, jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32),
                        state=state, train=True)
    y, after = jax.jit(lambda p, x, s: bn.apply(p, x, state=s, train=True))(
        params, jnp.zeros((0, 3)), state)
    assert y.shape == (0, 3)
    for k in state:
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(state[k]))


def test_an_empty_batch_keeps_the_statistics_with_an_axis_name_too():
    bn = nn.batch_norm(axis_name="d")
    params, state = bn.init(KEY, jnp.zeros((1, 3)))
    _, after = jax.vmap(lambda x: bn.apply(params, x, state=state, train=True),
                        axis_name="d", out_axes=(0, None))(jnp.zeros((2, 0, 3)))
    for k in state:
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(state[k]))
