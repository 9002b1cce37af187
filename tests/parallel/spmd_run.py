"""Run by test_parallel.py in a fresh process with 8 emulated CPU devices: trains the seed
MLP, a one-block GPT and a small CNN for 20 steps on 1 device, data parallel and FSDP, and
prints JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from funtrain import losses, nn, optim, parallel, profile, train  # noqa: E402

compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)

STEPS = 20


def problem(kind):
    rng = np.random.default_rng(0)
    if kind == "mlp":
        model = nn.mlp([256, 10])
        params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
        batches = [{"x": rng.standard_normal((32, 784)).astype(np.float32),
                    "y": rng.integers(0, 10, 32).astype(np.int32)} for _ in range(STEPS)]
        return params, train.classifier_loss(model), batches
    if kind == "cnn":  # BatchNorm: its statistics are over the global batch
        model = nn.serial(nn.conv(8, (3, 3)), nn.batch_norm(), nn.relu(),
                          nn.global_avg_pool(), nn.dense(10))
        params, model_state = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        batches = [{"x": rng.standard_normal((16, 8, 8, 3)).astype(np.float32),
                    "y": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(STEPS)]
        return (params, model_state), train.classifier_loss(model), batches
    model = nn.models.gpt(64, 16, 1, 4, 64)  # one block: every kind of leaf, half the compile
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))

    def loss(p, batch, key):
        logits = model.apply(p, batch["x"], key=key, train=True)
        return losses.softmax_cross_entropy(logits, batch["y"])

    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, 64, (16, 17)).astype(np.int32)
        batches.append({"x": tokens[:, :-1], "y": tokens[:, 1:]})
    return params, loss, batches


MLP_TENSOR = [(r"dense_0/w", P("fsdp", "tensor")), (r"dense_0/b", P("tensor")),
              (r"dense_1/w", P("tensor", None))]  # 10 classes: no fsdp split


def run(kind, layout):
    params, loss, batches = problem(kind)
    model_state = None
    if kind == "cnn":
        params, model_state = params
    opt = optim.adamw(1e-3)
    state = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state)
    step = train.make_train_step(loss, opt)
    mesh, rules = None, ()
    if layout == "dp":
        mesh = parallel.mesh(data=-1)
    elif layout == "fsdp":
        mesh = parallel.mesh(data=1, fsdp=-1)
    elif layout == "fsdp+tp":
        mesh = parallel.mesh(data=1, fsdp=4, tensor=2)
        rules = MLP_TENSOR if kind == "mlp" else parallel.tensor_rules()
    if mesh is not None:
        state = parallel.shard_state(state, mesh, rules, fsdp_min_size=1024)
    before = parallel.device_bytes((state.params, state.opt_state))
    # the leaves every device holds whole (under fsdp_min_size, or on one device)
    replicated = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                     if mesh is None or x.sharding.is_fully_replicated)
    specs = jax.tree.map(lambda x: str(x.sharding.spec) if mesh else "", state.params)
    out = []
    for i, batch in enumerate(batches):
        if i == 1:  # the first step compiled; the state it returned must not compile again
            compiles.clear()
        state, metrics = step(state, batch if mesh is None else parallel.shard_batch(batch, mesh))
        out.append(float(metrics["loss"]))
    recompiles = len(compiles)
    same = True
    if mesh is not None:  # the state after the steps sits where shard_state put it
        placed = parallel.shard_state(state, mesh, rules, fsdp_min_size=1024)
        same = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(placed.params), strict=True))
    total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    return {"losses": out, "per_device": max(before.values()), "total": total,
            "replicated": replicated,
            "kept_sharding": same, "recompiles": recompiles, "specs": jax.tree.leaves(specs)}


def fit_with_batch(batch_size):
    from funtrain import data

    model, opt = nn.mlp([10]), optim.sgd(0.1)
    state = parallel.shard_state(train.TrainState.create(
        model.init(jax.random.key(0), jnp.zeros((1, 4))), opt, jax.random.key(1)),
        parallel.mesh(data=-1))
    ds = data.ArrayDataset(x=np.zeros((48, 4), np.float32), y=np.zeros(48, np.int32))
    train.fit(state, train.make_train_step(train.classifier_loss(model), opt),
              data.Loader(ds, batch_size), progress=False)


def bad_input():
    """The message of each bad input (or None when nothing was raised)."""
    params, _, batches = problem("mlp")
    fsdp = parallel.mesh(data=1, fsdp=-1)
    cases = {
        "batch not divisible": lambda: parallel.shard_batch(
            {"x": np.zeros((12, 784))}, fsdp),
        "rule matches nothing": lambda: parallel.param_specs(params, fsdp, [("conv", P())]),
        "spec does not divide": lambda: parallel.param_specs(
            params, fsdp, [("dense_1/w", P(None, "fsdp"))]),
        "unknown mesh axis": lambda: parallel.param_specs(params, fsdp, [("w", P("model"))]),
        "axis used twice": lambda: parallel.param_specs(
            params, fsdp, [("dense_0/w", P("fsdp", "fsdp"))]),
        "bad regex": lambda: parallel.param_specs(params, fsdp, [("(", P())]),
        "tuple spec": lambda: parallel.param_specs(params, fsdp, [("w", ("fsdp", None))]),
        "mesh size": lambda: parallel.mesh(data=3),
        "fit batch not divisible": lambda: fit_with_batch(12),
    }
    out = {}
    for name, make in cases.items():
        try:
            make()
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def placements():
    """Specs ``shard_state``/``shard_batch`` give: params that are one array (their key path
    is empty) and its AdamW moments; a JAX Mesh of the user's own, with no ``fsdp`` axis."""
    opt = optim.adamw(1e-3)
    one = parallel.shard_state(train.TrainState.create(jnp.ones((256, 128)), opt,
                                                       jax.random.key(0)),
                               parallel.mesh(fsdp=-1), fsdp_min_size=1)
    own = jax.make_mesh((8,), ("data",))
    state = parallel.shard_state(train.TrainState.create({"w": jnp.ones((8, 8))}, opt,
                                                         jax.random.key(0)), own)
    batch = parallel.shard_batch({"x": np.ones((16, 3))}, own)
    # the caller's state outlives a donated step on its sharded copy (device_put aliased
    # the replicated leaves, so the step deleted them): dp, fsdp, and sharding twice
    deleted = []
    for mesh in (parallel.mesh(data=-1), parallel.mesh(fsdp=-1)):
        created = train.TrainState.create({"w": jnp.ones((64, 8)), "b": jnp.ones(8)}, opt,
                                          jax.random.key(0))
        sharded = parallel.shard_state(created, mesh, fsdp_min_size=1)
        twice = parallel.shard_state(sharded, mesh, fsdp_min_size=1)
        step = train.make_train_step(lambda p, b: jnp.sum((b["x"] @ p["w"] + p["b"]) ** 2),
                                     opt)
        rows = parallel.shard_batch({"x": np.ones((16, 64))}, mesh)
        step(twice, rows)
        deleted.append(sum(x.is_deleted() for x in jax.tree.leaves((created, sharded))))
        try:  # donated: checked before the call (XLA's CPU client segfaulted on it)
            step(twice, rows)
        except ValueError as e:
            deleted.append(str(e).split(":")[0])
    # a fused state's buffers, of sizes no device count divides (33 + 3 and 7 * 33 + 33 * 3),
    # are padded by create, so FSDP splits them (they were replicated whole)
    odd = nn.mlp([33, 3]).init(jax.random.key(0), jnp.zeros((1, 7)))
    fused = parallel.shard_state(train.TrainState.create(odd, opt, jax.random.key(0),
                                                         fused=True),
                                 parallel.mesh(fsdp=-1), fsdp_min_size=1)
    fused_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(fused.params)})
    # and it trains as the unfused state does, the padding staying zero
    plain = parallel.shard_state(train.TrainState.create(odd, opt, jax.random.key(0)),
                                 parallel.mesh(fsdp=-1), fsdp_min_size=1)
    mlp = nn.mlp([33, 3])
    step = train.make_train_step(lambda p, b: jnp.mean(mlp.apply(p, b["x"]) ** 2), opt)
    rows = parallel.shard_batch({"x": np.ones((16, 7), np.float32)}, parallel.mesh(fsdp=-1))
    for _ in range(3):
        fused, _ = step(fused, rows)
        plain, _ = step(plain, rows)
    fused_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(fused.params.unflatten()), jax.tree.leaves(plain.params), strict=True))
    fused_specs.append(fused_diff)
    fused_specs.append(float(jnp.max(jnp.abs(fused.params.buffers[1][330:]))))
    return {"one_array": [str(one.params.sharding.spec),
                          str(one.opt_state[0].mu.sharding.spec)],
            "own_mesh": [str(state.params["w"].sharding.spec),
                         str(batch["x"].sharding.spec)],
            "deleted": deleted, "fused": fused_specs}


def checkpoint_across_meshes():
    """Save an FSDP state on 8 devices; restore it onto 4 devices (data parallel) and onto
    one; all three then take the same next step."""
    import tempfile

    from funtrain.train import checkpoint

    params, loss, batches = problem("mlp")
    opt = optim.adamw(1e-3)
    step = train.make_train_step(loss, opt)

    def fresh():  # a new state each time: the step donates what it is given
        return train.TrainState.create(params, opt, jax.random.key(1))

    state = parallel.shard_state(fresh(), parallel.mesh(data=1, fsdp=-1), fsdp_min_size=1024)
    state, _ = step(state, parallel.shard_batch(batches[0], parallel.mesh(data=1, fsdp=-1)))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, state, 1)
        four = parallel.mesh(data=-1, devices=jax.devices()[:4])
        targets = {"8 devices, FSDP": state,
                   "4 devices, DP": parallel.shard_state(fresh(), four),
                   "1 device": fresh(),
                   "device 5": jax.device_put(fresh(), jax.devices()[5])}
        for name, target in targets.items():
            restored = checkpoint.restore(d, target=target)
            mesh = (target.params["dense_0"]["w"].sharding.mesh
                    if name not in ("1 device", "device 5") else None)
            batch = batches[1] if mesh is None else parallel.shard_batch(batches[1], mesh)
            spec = str(restored.params["dense_0"]["w"].sharding.spec) if mesh else ""
            devices = len(restored.params["dense_0"]["w"].sharding.device_set)
            ids = sorted(dv.id for leaf in jax.tree.leaves(restored) for dv in leaf.devices())
            restored, metrics = step(restored, batch)
            out[name] = {"loss": float(metrics["loss"]), "spec": spec, "devices": devices,
                         "on": sorted(set(ids))}
        wider = train.TrainState.create(nn.mlp([128, 10]).init(jax.random.key(0), jnp.zeros(
            (1, 784))), opt, jax.random.key(1))
        errors = {}
        for name, target in {"other shapes": wider, "other tree": {"params": params}}.items():
            try:
                checkpoint.restore(d, target=target)
                errors[name] = None
            except checkpoint.CheckpointError as e:
                errors[name] = str(e)
    return out, errors


def fit_on_meshes():
    """``fit``'s device-resident path (2 epochs of 8 steps, 4 per call) on one device, data
    parallel and FSDP: the losses, the state's specs after it, and the FLOPs one device runs
    per chunk (a batch split over the devices gives each an eighth)."""
    from funtrain import data
    from funtrain.train import feed

    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((256, 784)).astype(np.float32),
                           y=rng.integers(0, 10, 256).astype(np.int32))
    model, opt = nn.mlp([256, 10]), optim.adamw(1e-3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
    step = train.make_train_step(train.classifier_loss(model), opt)
    out = {}
    for name, mesh in (("single", None), ("dp", parallel.mesh(data=-1)),
                       ("fsdp", parallel.mesh(data=1, fsdp=-1))):
        state = train.TrainState.create(params, opt, jax.random.key(1))
        if mesh is not None:
            state = parallel.shard_state(state, mesh, fsdp_min_size=1024)
        loader = data.Loader(ds, 32, key=jax.random.key(2), drop_remainder=True)
        probe = feed.DeviceFeed(loader, step, 4, ())
        kw = probe._place(state)
        flops = feed._steps_on_device.lower(
            state, probe.arrays, None, np.int32(0), step=step, size=4, batch_size=32,
            **kw).compile().cost_analysis()
        flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
        state, history = train.fit(state, step, loader, epochs=2, steps_per_call=4,
                                   progress=False, log_every=1)
        out[name] = {"losses": history.train["loss"], "flops": flops,
                     "spec": str(state.params["dense_0"]["w"].sharding.spec) if mesh else "",
                     "step": int(state.step)}
        compiles.clear()  # a second call (one more epoch; it donates state) compiles nothing
        again, _ = train.fit(state, step, loader, epochs=1, steps_per_call=4, progress=False)
        out[name].update(compiles_again=len(compiles), step_again=int(again.step))
    # the host feed (device_data=False) on the data-parallel mesh: its stacked chunks are
    # split over the devices too
    mesh = parallel.mesh(data=-1)
    state = parallel.shard_state(train.TrainState.create(params, opt, jax.random.key(1)),
                                 mesh, fsdp_min_size=1024)
    loader = data.Loader(ds, 32, key=jax.random.key(2), drop_remainder=True)
    seen = []
    probe = train.make_train_step(train.classifier_loss(model), opt)

    def watched(state, batch):  # the batch's sharding, as the step receives it
        jax.debug.inspect_array_sharding(batch["x"], callback=lambda s: seen.append(str(s)))
        return probe(state, batch)

    _, history = train.fit(state, watched, loader, epochs=2, steps_per_call=4,
                           device_data=False, progress=False, log_every=1)
    out["dp_host"] = {"losses": history.train["loss"], "batch_sharding": sorted(set(seen))}
    return out


def step_reports():
    """``profile.step_report`` of the MLP's step on one device and under FSDP on 8."""
    params, loss, batches = problem("mlp")
    opt = optim.adamw(1e-3)
    step = train.make_train_step(loss, opt)
    state = train.TrainState.create(params, opt, jax.random.key(1))
    fsdp = parallel.mesh(data=1, fsdp=-1)
    sharded = parallel.shard_state(state, fsdp, fsdp_min_size=1024)
    keys = ("devices", "params_bytes", "opt_state_bytes", "params_bytes_per_device",
            "opt_state_bytes_per_device", "argument_bytes", "temp_bytes", "flops")
    out = {}
    for name, s, b in (("single", state, batches[0]),
                       ("fsdp", sharded, parallel.shard_batch(batches[0], fsdp))):
        report = profile.step_report(step, s, b, print_table=name == "fsdp")
        out[name] = {k: report.get(k) for k in keys}
    # abstract, as a user sizes a run before allocating it: shapes with their shardings
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), sharded)
    report = profile.step_report(step, abstract, parallel.shard_batch(batches[0], fsdp),
                                 print_table=False)
    out["fsdp_abstract"] = {k: report.get(k) for k in keys}
    return out


if __name__ == "__main__":
    result = {"devices": len(jax.devices()), "bad_input": bad_input(),
              "reports": step_reports(), "fit": fit_on_meshes(), "placed": placements()}
    result["checkpoint"], result["restore_errors"] = checkpoint_across_meshes()
    for kind in sys.argv[1:] or ["mlp", "gpt", "cnn"]:
        for layout in ("single", "dp", "fsdp") + (("fsdp+tp",) if kind != "cnn" else ()):
            result[f"{kind}/{layout}"] = run(kind, layout)
    print(json.dumps(result))
