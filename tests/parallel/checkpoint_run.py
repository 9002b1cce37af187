"""Run by test_parallel.py. ``python -m funtrain launch --nproc 2 checkpoint_run.py DIR``:
20 FSDP AdamW steps of the seed MLP over the two processes' devices, saving steps 10 and 20
into DIR; process 0 prints, after each save, the SHA-256 of every leaf of the whole state
(gathered to the host for the digest only). ``--die-at 20``: process 1 writes a torn part of
step 20 and exits. ``--restore`` (one process): restore DIR's latest step onto this
process's device and print the same digests."""

import argparse
import hashlib
import json
import os

from funtrain import parallel

parallel.initialize()  # a no-op in one process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from funtrain import data, nn, optim, train  # noqa: E402
from funtrain.train import checkpoint  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--die-at", type=int)
ap.add_argument("--restore", action="store_true")
args = ap.parse_args()

model = nn.mlp([256, 10])
opt = optim.adamw(1e-3)
params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
fresh = train.TrainState.create(params, opt, jax.random.key(1))


def digests(state):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        out[jax.tree_util.keystr(path)] = hashlib.sha256(
            np.ascontiguousarray(np.asarray(leaf)).tobytes()).hexdigest()
    return out


if args.restore:
    manager = checkpoint.CheckpointManager(args.dir)  # deletes a dead writer's leftovers
    step = manager.latest_step()
    state = manager.restore(target=fresh)
    print(json.dumps({"step": step, "digests": digests(state),
                      "left": sorted(os.listdir(args.dir))}), flush=True)
    raise SystemExit

rng = np.random.default_rng(0)
dataset = data.ArrayDataset(x=rng.standard_normal((640, 784)).astype(np.float32),
                            y=rng.integers(0, 10, 640).astype(np.int32))
loader = data.Loader(dataset, 32, key=jax.random.key(2), drop_remainder=True,
                     process_index=jax.process_index(), process_count=jax.process_count())
mesh = parallel.mesh(data=1, fsdp=-1)
state = parallel.shard_state(fresh, mesh, fsdp_min_size=1024)
step_fn = train.make_train_step(train.classifier_loss(model), opt)
manager = checkpoint.CheckpointManager(args.dir)
for batch in loader.epoch(0):
    state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
    step = int(state.step)
    if step % 10:
        continue
    if step == args.die_at and jax.process_index() == 1:
        def torn(folder, me, entries, values):
            (folder / f"part_{me:05d}.npz").write_bytes(b"half of a part")
            os._exit(17)
        checkpoint._write_part = torn
    found = digests(state)  # before the save: the launcher may stop process 0 during it
    if jax.process_index() == 0:
        print(json.dumps({"step": step, "digests": found}), flush=True)
    manager.save(state, step)
    if jax.process_index() == 0:
        print(json.dumps({"saved": step}), flush=True)
