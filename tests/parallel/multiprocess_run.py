"""Run by test_parallel.py: 20 data-parallel AdamW steps on the seed MLP, as one process or
as one of several started by ``python -m funtrain launch``, by hand and then through
``fit``; the first process prints the losses as JSON."""

import json

from funtrain import parallel

parallel.initialize()  # a no-op in one process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from funtrain import data, nn, optim, train  # noqa: E402

rng = np.random.default_rng(0)
dataset = data.ArrayDataset(x=rng.standard_normal((640, 784)).astype(np.float32),
                            y=rng.integers(0, 10, 640).astype(np.int32))
loader = data.Loader(dataset, 32, key=jax.random.key(2), drop_remainder=True,
                     process_index=jax.process_index(), process_count=jax.process_count())
model = nn.mlp([256, 10])
opt = optim.adamw(1e-3)
params = model.init(jax.random.key(0), jnp.zeros((1, 784)))
mesh = parallel.mesh(data=-1)
state = parallel.shard_state(train.TrainState.create(params, opt, jax.random.key(1)), mesh)
step = train.make_train_step(train.classifier_loss(model), opt)
losses = []
for batch in loader.epoch(0):
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
# the same epoch through fit, whose feed (host data, per process) splits each batch alike
# with eval data each process reads its part of (each process evaluated its part as if
# it were the whole batch: their metrics differed)
split = {"process_index": jax.process_index(), "process_count": jax.process_count()}
eval_set = data.Loader(dataset, 64, drop_remainder=True, **split)
state = parallel.shard_state(train.TrainState.create(params, opt, jax.random.key(1)), mesh)
eval_step = train.make_eval_step(train.classifier_eval(model))
trained, history = train.fit(state, step, loader, epochs=1, progress=False, log_every=1,
                             eval_step=eval_step, eval_data=eval_set)
# the whole eval data in every process gives the same means
whole_eval = train.evaluate(eval_step, trained.params, data.Loader(dataset, 64))
evals = multihost_utils.process_allgather(jnp.array([history.eval[-1]["loss"],
                                                     history.eval[-1]["accuracy"]]))
# a mesh on which every process holds all rows wants the whole batch from each process: a
# Loader reading one process's part trained each on other rows as if they were all
refused = None
whole = parallel.mesh(data=1, tensor=-1)
try:
    train.fit(parallel.shard_state(train.TrainState.create(params, opt, jax.random.key(1)),
                                   whole), step, loader, epochs=1, progress=False)
except ValueError as e:
    refused = str(e)
if jax.process_index() == 0:
    print(json.dumps({"processes": jax.process_count(), "devices": len(jax.devices()),
                      "local_batch": len(batch["x"]), "losses": losses,
                      "fit_losses": history.train["loss"], "evals": np.asarray(evals).tolist(),
                      "refused": refused,
                      "whole_eval": [whole_eval["loss"], whole_eval["accuracy"]]}), flush=True)
