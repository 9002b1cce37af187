"""Writes the notebooks from the cell sources below, and executes them so that they are
committed with their outputs and plots (run: python notebooks/make_notebooks.py; add
--no-execute to write the sources alone, or notebook file names to write only those).

Keeping the sources here makes diffs reviewable; tests/test_notebooks.py executes the
.ipynb files again, at small sizes.
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

QUICKSTART = [
    new_markdown_cell(
        "# funtrain quickstart\n\n"
        "A model is `Module(init, apply)`, an optimizer is `Optimizer(init_state, update)`, and a "
        "training step is a pure function `(state, batch) -> (state, metrics)`.\n\n"
        "We train the seed chapter's MLP shape (here 64 → 256 → 10, since the 8×8 digits have 64 "
        "pixels) twice: first with the loop written out by hand — forward → loss → backward → "
        "update — then with `fit`."),
    new_code_cell(
        "import os\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '5'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "from funtrain import data, losses, nn, optim, train\n\n"
        "train_set, test_set = data.load_digits()\n"
        "train_set, test_set"),
    new_markdown_cell(
        "## The model\n`init` traces the example input to find every shape; the batch size is "
        "not baked in. Params are nested dicts with readable keys."),
    new_code_cell(
        "model = nn.mlp([256, 10])  # dense(256) -> relu -> dense(10), He-initialised\n"
        "key = jax.random.key(0)\n"
        "init_key, shuffle_key, run_key = jax.random.split(key, 3)\n"
        "params = model.init(init_key, jnp.zeros((1, 64)))\n"
        "jax.tree.map(jnp.shape, params)"),
    new_markdown_cell(
        "## The loop by hand\nEach step: forward (`model.apply`), loss "
        "(`losses.softmax_cross_entropy`), backward (`jax.value_and_grad`), update "
        "(`opt.update` then `optim.apply_updates`). `jax.jit` compiles the whole step."),
    new_code_cell(
        "opt = optim.sgd(0.05, momentum=0.9)\n"
        "opt_state = opt.init_state(params)\n\n"
        "def loss_fn(params, x, y):\n"
        "    logits = model.apply(params, x)                      # forward\n"
        "    return losses.softmax_cross_entropy(logits, y)       # loss\n\n"
        "@jax.jit\n"
        "def step(params, opt_state, x, y):\n"
        "    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)   # backward\n"
        "    updates, opt_state = opt.update(grads, opt_state, params)  # optimizer\n"
        "    return optim.apply_updates(params, updates), opt_state, loss\n\n"
        "loader = train_set.batches(32, key=shuffle_key, drop_remainder=True)\n"
        "hand_losses = []\n"
        "for epoch in range(EPOCHS):\n"
        "    for batch in loader.epoch(epoch):\n"
        "        params, opt_state, loss = step(params, opt_state, batch['x'], batch['y'])\n"
        "        hand_losses.append(loss)\n"
        "test_logits = model.apply(params, test_set.arrays['x'])\n"
        "hand_acc = float(losses.accuracy(test_logits, test_set.arrays['y']))\n"
        "print(f'hand-written loop: test accuracy {hand_acc:.3f}')"),
    new_markdown_cell(
        "## The same with `fit`\n`make_train_step` builds the same step (jitted, state donated); "
        "`fit` adds epochs, evaluation, a progress bar and a history. It is also faster than "
        "the loop above: the `Loader`'s data moves to the device once, and each epoch runs in "
        "one device call (a `lax.scan` over the step), so Python dispatches once per epoch. "
        "Calling `fit` again continues the training; Ctrl-C stops it at a step boundary and "
        "returns the state and history (`history.interrupted`)."),
    new_code_cell(
        "params = model.init(init_key, jnp.zeros((1, 64)))\n"
        "state = train.TrainState.create(params, opt, run_key)\n"
        "train_step = train.make_train_step(train.classifier_loss(model), opt)\n"
        "eval_step = train.make_eval_step(train.classifier_eval(model))\n"
        "state, history = train.fit(state, train_step, loader, epochs=EPOCHS,\n"
        "                           eval_step=eval_step, eval_data=test_set.batches(256))\n"
        "fit_acc = history.eval[-1]['accuracy']\n"
        "print(f'fit: test accuracy {fit_acc:.3f}')\n"
        "assert fit_acc > 0.9 and hand_acc > 0.9"),
    new_code_cell(
        "import matplotlib\n"
        "import matplotlib.pyplot as plt\n\n"
        "fig, ax = plt.subplots(figsize=(6, 3))\n"
        "ax.plot([float(v) for v in hand_losses], label='hand-written loop', alpha=0.7)\n"
        "ax.plot(history.train['loss'], label='fit', alpha=0.7)\n"
        "ax.set_yscale('log'); ax.set_xlabel('step'); ax.set_ylabel('train loss'); ax.legend()\n"
        "plt.show()"),
    new_markdown_cell(
        "## Keep going, and never lose a run\n"
        "Calling `fit` again continues from `state.step` (the data position follows it), and "
        "compiles nothing the first call compiled. With `checkpoint_dir=`, each epoch's end is "
        "saved after its evaluation; `resume=True` continues an interrupted run exactly "
        "(bitwise on CPU) and returns a finished run's evaluations without training."),
    new_code_cell(
        "import tempfile\n\n"
        "state, more = train.fit(state, train_step, loader, epochs=1, eval_step=eval_step,\n"
        "                        eval_data=test_set.batches(256), progress=False)\n"
        "print('continued to step', int(state.step), more.eval[-1])\n"
        "runs = tempfile.mkdtemp()\n"
        "state, saved = train.fit(state, train_step, loader, epochs=1, eval_step=eval_step,\n"
        "                         eval_data=test_set.batches(256), progress=False,\n"
        "                         checkpoint_dir=runs)\n"
        "_, again = train.fit(state, train_step, loader, epochs=1, eval_step=eval_step,\n"
        "                     eval_data=test_set.batches(256), progress=False,\n"
        "                     checkpoint_dir=runs, resume=True)  # finished: nothing to train\n"
        "assert again.train['step'] == [] and again.eval == saved.eval\n"
        "print('checkpoints:', train.checkpoint.all_steps(runs))"),
]

OPTIMIZERS = [
    new_markdown_cell(
        "# Optimizers and schedules\n\n"
        "The seed chapter compares SGD, Momentum, RMSProp, Adam and AdamW; we add Lion. Each is "
        "an `Optimizer(init_state, update)` built by chaining small blocks, e.g. "
        "`adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`. "
        "We train the same MLP on the digits with each and compare loss curves, accuracy and "
        "optimizer memory (`optim.state_bytes`)."),
    new_code_cell(
        "import os\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '8'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "import matplotlib.pyplot as plt\n"
        "from funtrain import data, nn, optim, train\n"
        "from funtrain.optim import schedules\n\n"
        "train_set, test_set = data.load_digits()\n"
        "model = nn.mlp([256, 10])\n"
        "params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))\n"
        "param_bytes = optim.state_bytes(params0)"),
    new_code_cell(
        "candidates = {\n"
        "    'SGD': optim.sgd(0.1),\n"
        "    'Momentum': optim.sgd(0.05, momentum=0.9),\n"
        "    'RMSProp': optim.rmsprop(1e-3),\n"
        "    'Adam': optim.adam(1e-3),\n"
        "    'AdamW': optim.adamw(1e-3, weight_decay=1e-2),\n"
        "    'Lion': optim.lion(3e-4, weight_decay=1e-1),\n"
        "}\n"
        "results, curves = {}, {}\n"
        "for name, opt in candidates.items():\n"
        "    state = train.TrainState.create(params0, opt, jax.random.key(1))\n"
        "    step = train.make_train_step(train.classifier_loss(model), opt)\n"
        "    loader = train_set.batches(32, key=jax.random.key(2), drop_remainder=True)\n"
        "    evaluate = train.make_eval_step(train.classifier_eval(model))\n"
        "    state, hist = train.fit(state, step, loader, epochs=EPOCHS, progress=False,\n"
        "                            eval_step=evaluate, eval_data=test_set.batches(512))\n"
        "    curves[name] = hist.train['loss']\n"
        "    memory = optim.state_bytes(state.opt_state) / param_bytes\n"
        "    results[name] = (hist.eval[-1]['accuracy'], memory)\n\n"
        "print(f\"{'optimizer':<10}{'test acc':>10}{'state / params':>16}\")\n"
        "for name, (acc, mem) in results.items():\n"
        "    print(f'{name:<10}{acc:>10.3f}{mem:>16.2f}')\n"
        "assert all(acc > 0.85 for acc, _ in results.values())"),
    new_markdown_cell(
        "The memory column is the seed's table: SGD keeps no state, Momentum one buffer (1×), "
        "Adam and AdamW two moments (2×), Lion one (1×)."),
    new_code_cell(
        "import numpy as np\n"
        "fig, ax = plt.subplots(figsize=(7, 3.5))\n"
        "for name, loss in curves.items():\n"
        "    smooth = np.convolve(loss, np.ones(20) / 20, mode='valid')\n"
        "    ax.plot(smooth, label=name)\n"
        "ax.set_yscale('log'); ax.set_xlabel('step'); ax.set_ylabel('train loss (smoothed)')\n"
        "ax.legend(); plt.show()"),
    new_markdown_cell(
        "## Schedules\nEvery schedule is a pure, jittable `step -> value`; pass one as any "
        "`learning_rate`. Where PyTorch has the same scheduler, the value at step `t` equals "
        "PyTorch's learning rate after `t` calls of `scheduler.step()`."),
    new_code_cell(
        "T = 200\n"
        "scheds = {\n"
        "    'constant': schedules.constant(1.0),\n"
        "    'step_decay': schedules.step_decay(1.0, 50, 0.5),\n"
        "    'multistep_decay': schedules.multistep_decay(1.0, [60, 120, 160], 0.3),\n"
        "    'exponential_decay': schedules.exponential_decay(1.0, 0.98),\n"
        "    'cosine_annealing': schedules.cosine_annealing(1.0, T),\n"
        "    'cosine_warm_restarts': schedules.cosine_warm_restarts(1.0, 30, t_mult=2),\n"
        "    'warmup_cosine': schedules.warmup_cosine(1.0, 20, T),\n"
        "    'linear': schedules.linear(1.0, 0.1, 150),\n"
        "    'polynomial': schedules.polynomial(1.0, 0.0, 2.0, T),\n"
        "    'one_cycle': schedules.one_cycle(1.0, T),\n"
        "    'cyclic (triangular2)': schedules.cyclic(0.1, 1.0, 25, mode='triangular2'),\n"
        "    'join (warmup, then decay)': schedules.join(\n"
        "        [schedules.linear(0.0, 1.0, 20), schedules.exponential_decay(1.0, 0.97)], [20]),\n"
        "}\n"
        "steps = jnp.arange(T)\n"
        "fig, axes = plt.subplots(3, 4, figsize=(12, 7), sharex=True)\n"
        "for ax, (name, fn) in zip(axes.ravel(), scheds.items()):\n"
        "    ax.plot(steps, jax.jit(jax.vmap(fn))(steps)); ax.set_title(name, fontsize=9)\n"
        "fig.tight_layout(); plt.show()"),
]

MIXED_PRECISION = [
    new_markdown_cell(
        "# Mixed precision\n\n"
        "The seed chapter's recipe: keep FP32 master weights, run forward and backward in half "
        "precision, scale the loss so small gradients don't underflow, and update in FP32. "
        "In funtrain a `Policy` says which dtype each part uses, `make_train_step(policy=...)` "
        "applies it, and a loss scale lives in the `TrainState`."),
    new_code_cell(
        "import os\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '5'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "import matplotlib.pyplot as plt\n"
        "from funtrain import data, losses, nn, optim, precision, train\n\n"
        "for text in ['bf16', 'params=float32,compute=bfloat16,output=float32', 'p=f32,c=half',\n"
        "             'float16']:\n"
        "    print(f'{text!r:52} -> {precision.get_policy(text)}')\n"
        "print('half on this backend is', precision.half_dtype())"),
    new_markdown_cell("## FP32 vs BF16 vs FP16 with dynamic loss scaling"),
    new_code_cell(
        "train_set, test_set = data.load_digits()\n"
        "model = nn.mlp([256, 10])\n"
        "params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))\n"
        "runs = {\n"
        "    'fp32': (None, None),\n"
        "    'bf16': ('params=float32,compute=bfloat16,output=float32', None),\n"
        "    'fp16 + dynamic scale': ('params=float32,compute=float16,output=float32',\n"
        "                             precision.DynamicLossScale(initial=2.0 ** 15, period=100)),\n"
        "}\n"
        "histories = {}\n"
        "for name, (policy, scale) in runs.items():\n"
        "    opt = optim.sgd(0.05, momentum=0.9)\n"
        "    state = train.TrainState.create(params0, opt, jax.random.key(1), policy=policy,\n"
        "                                    loss_scale=scale)\n"
        "    step = train.make_train_step(train.classifier_loss(model), opt, policy=policy)\n"
        "    state, hist = train.fit(\n"
        "        state, step, train_set.batches(32, key=jax.random.key(2), drop_remainder=True),\n"
        "        epochs=EPOCHS, eval_step=train.make_eval_step(train.classifier_eval(model)),\n"
        "        eval_data=test_set.batches(512), progress=False)\n"
        "    histories[name] = hist\n"
        "    print(f\"{name:22} test accuracy {hist.eval[-1]['accuracy']:.3f}\")\n"
        "accs = [h.eval[-1]['accuracy'] for h in histories.values()]\n"
        "assert max(accs) - min(accs) < 0.03"),
    new_code_cell(
        "h = histories['fp16 + dynamic scale']\n"
        "fig, ax = plt.subplots(figsize=(6, 3))\n"
        "ax.plot(h.train['loss_scale']); ax.set_yscale('log', base=2)\n"
        "ax.set_xlabel('step'); ax.set_ylabel('loss scale')\n"
        "ax.set_title('grows by 2 every period finite steps, halves on overflow'); plt.show()\n"
        "print('skipped steps:', int(h.train['skipped_steps'][-1]))"),
    new_markdown_cell(
        "## Why scale the loss: float16 underflow\n"
        "float16's smallest subnormal is about 6e-8. Gradients smaller than that become 0. "
        "Here a loss multiplied by 1e-8 (and a learning rate 1e8 larger, so the run is the "
        "same in exact arithmetic) trains only with a loss scale."),
    new_code_cell(
        "def tiny_loss(p, batch):\n"
        "    return 1e-8 * losses.softmax_cross_entropy(model.apply(p, batch['x']), batch['y'])\n\n"
        "policy = 'params=float32,compute=float16,output=float32'\n"
        "for name, scale in [('scale = 1', precision.StaticLossScale(1.0)),\n"
        "                    ('dynamic scale', precision.DynamicLossScale())]:\n"
        "    opt = optim.sgd(0.05 * 1e8, momentum=0.9)\n"
        "    state = train.TrainState.create(params0, opt, jax.random.key(1), policy=policy,\n"
        "                                    loss_scale=scale)\n"
        "    step = train.make_train_step(tiny_loss, opt, policy=policy)\n"
        "    state, hist = train.fit(\n"
        "        state, step, train_set.batches(32, key=jax.random.key(2), drop_remainder=True),\n"
        "        epochs=2, eval_step=train.make_eval_step(train.classifier_eval(model)),\n"
        "        eval_data=test_set.batches(512), progress=False)\n"
        "    norms = hist.train['grad_norm']\n"
        "    print(f\"{name:14} mean grad norm {sum(norms) / len(norms):.2e}\"\n"
        "          f\"  test accuracy {hist.eval[-1]['accuracy']:.3f}\")"),
    new_markdown_cell(
        "## Memory\n`profile.residual_bytes` counts the residuals a backward pass keeps "
        "(activations), without running anything; in bf16 they halve. `bench/precision.py` "
        "measures this for the MLP and a transformer block."),
    new_code_cell(
        "from funtrain import profile\n"
        "block = nn.transformer_block(64, 4)\n"
        "x = jax.random.normal(jax.random.key(0), (4, 32, 64))\n"
        "bp = block.init(jax.random.key(1), x)\n"
        "loss = lambda p, b: losses.mse(block.apply(p, b['x']), b['x'])\n"
        "a32 = profile.residual_bytes(loss, bp, {'x': x})\n"
        "bf16 = 'params=float32,compute=bfloat16,output=float32'\n"
        "a16 = profile.residual_bytes(loss, bp, {'x': x}, policy=bf16)\n"
        "print(f'activations: fp32 {a32 / 2**20:.2f} MiB, bf16 {a16 / 2**20:.2f} MiB '\n"
        "      f'({a16 / a32:.2f}x)')"),
]

GRADIENT_CHECKPOINTING = [
    new_markdown_cell(
        "# Gradient checkpointing: O(n) → O(√n) activation memory\n\n"
        "Backprop keeps every layer's activations until the backward pass reaches it, so memory "
        "grows with depth n. The seed chapter keeps only √n segment boundaries and recomputes "
        "the inside of each segment on the way back. In funtrain that is "
        "`nn.serial(*layers, checkpoint='sqrt')`. `profile.step_report` reads the compiled "
        "step's temporary memory from XLA."),
    new_code_cell(
        "import os\n"
        "DEPTHS = [4, 9, 16, 25, 36, 49, 64]\n"
        "if os.environ.get('FUNTRAIN_NB_EPOCHS'):  # the test suite: fewer depths\n"
        "    DEPTHS = [4, 16, 36]\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "import matplotlib.pyplot as plt\n"
        "from funtrain import nn, profile, remat\n\n"
        "WIDTH, BATCH = 128, 256\n"
        "x = jnp.ones((BATCH, WIDTH))\n\n"
        "def temp_mib(depth, checkpoint):\n"
        "    model = nn.serial(*[m for _ in range(depth) for m in (nn.dense(WIDTH), nn.relu())],\n"
        "                      checkpoint=checkpoint)\n"
        "    params = model.init(jax.random.key(0), x)\n"
        "    grad = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))\n"
        "    return profile.step_report(grad, params, print_table=False)['temp_bytes'] / 2**20\n\n"
        "none = [temp_mib(n, None) for n in DEPTHS]\n"
        "sqrt = [temp_mib(n, 'sqrt') for n in DEPTHS]\n"
        "for n, a, b in zip(DEPTHS, none, sqrt):\n"
        "    print(f'depth {n:3d}: none {a:6.1f} MiB   sqrt {b:5.1f} MiB   ({b / a:.2f}x)')\n"
        "assert sqrt[-1] < 0.5 * none[-1]"),
    new_code_cell(
        "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
        "ax.plot(DEPTHS, none, 'o-', label='no checkpointing: O(n)')\n"
        "ax.plot(DEPTHS, sqrt, 's-', label=\"checkpoint='sqrt': O(√n)\")\n"
        "ax.set_xlabel('depth n (layers of Linear+ReLU)'); ax.set_ylabel('temporary MiB')\n"
        "ax.legend(); plt.show()"),
    new_markdown_cell(
        "## The report for one step\n`step_report` also gives argument bytes, FLOPs and "
        "compile time. For stacks of identical blocks, `remat.repeat` runs one traced block "
        "under `lax.scan`, so compile time stays flat as depth grows."),
    new_code_cell(
        "deep = remat.repeat(nn.serial(nn.dense(WIDTH), nn.relu()), 36, remat='sqrt')\n"
        "params = deep.init(jax.random.key(0), x)\n"
        "report = profile.step_report(jax.grad(lambda p: jnp.sum(deep.apply(p, x) ** 2)), params)"),
]

CUSTOM_MODULES = [
    new_markdown_cell(
        "# Writing your own module, with state\n\n"
        "A funtrain model is `Module(init, apply)`: two pure functions over a params pytree. "
        "There is no base class to inherit and no hidden attribute: a layer is a factory that "
        "returns the pair. This notebook writes a stateless layer, then a layer with *model "
        "state* (values that change during training but are not trained, like BatchNorm's "
        "running statistics), puts both in a CNN with `batch_norm`, prints its summary and "
        "trains it."),
    new_code_cell(
        "import os\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '5'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "from funtrain import data, nn, optim, train"),
    new_markdown_cell(
        "## A stateless layer\n`init(key, x)` finds shapes from the example input and returns "
        "the params; `apply(params, x, *, key=None, train=False)` is the math. `kind` names the "
        "layer in automatic keys (`scale_shift_0`) and in error messages."),
    new_code_cell(
        "def scale_shift(*, name=None):\n"
        "    \"\"\"y = x * scale + shift, one scale and shift per feature.\"\"\"\n"
        "    def init(key, x):\n"
        "        f = x.shape[-1]\n"
        "        return {'scale': jnp.ones((f,)), 'shift': jnp.zeros((f,))}\n\n"
        "    def apply(params, x, *, key=None, train=False):\n"
        "        return x * params['scale'] + params['shift']\n\n"
        "    return nn.Module(init, apply, name, 'scale_shift')\n\n"
        "layer = scale_shift()\n"
        "p = layer.init(jax.random.key(0), jnp.zeros((1, 3)))\n"
        "p, layer.apply(p, jnp.ones((2, 3)))"),
    new_markdown_cell(
        "## A layer with model state\nA stateful module sets `stateful=True`. Its `init` "
        "returns `(params, state)` and its `apply` takes `state=` and returns `(outputs, "
        "new_state)`. In train mode it returns the updated state; in eval mode the state it "
        "got. The state is a pytree like the params, so `jit`, `scan`, checkpoints and sharding "
        "treat it as any other.\n\nThis one is the identity, and keeps a running mean of "
        "what flows through it and how many training batches it saw."),
    new_code_cell(
        "def activation_stats(momentum=0.1, *, name=None):\n"
        "    \"\"\"Identity that tracks the running mean of its input per feature.\"\"\"\n"
        "    def init(key, x):\n"
        "        state = {'mean': jnp.zeros((x.shape[-1],)), 'batches': jnp.zeros((), jnp.int32)}\n"
        "        return {}, state\n\n"
        "    def apply(params, x, *, state, key=None, train=False):\n"
        "        if train:\n"
        "            batch_mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))\n"
        "            state = {'mean': (1 - momentum) * state['mean'] + momentum * batch_mean,\n"
        "                     'batches': state['batches'] + 1}\n"
        "        return x, state\n\n"
        "    return nn.Module(init, apply, name, 'activation_stats', stateful=True)"),
    new_markdown_cell(
        "## A model with both, and BatchNorm\nA combinator with a stateful child is stateful "
        "too, and threads the state through its children. `nn.summary` traces the model "
        "(nothing runs) and prints each layer's output shape, params and state bytes."),
    new_code_cell(
        "model = nn.serial(\n"
        "    nn.conv(16, 3), nn.batch_norm(), nn.relu(), nn.max_pool(2),\n"
        "    nn.conv(32, 3), nn.batch_norm(), nn.relu(), nn.max_pool(2),\n"
        "    nn.flatten(), scale_shift(), activation_stats(name='stats'), nn.dense(10))\n"
        "train_set, test_set = data.load_digits(flatten=False)  # 8x8x1 images\n"
        "x0 = jnp.zeros((1, 8, 8, 1))\n"
        "params, model_state = model.init(jax.random.key(0), x0)\n"
        "print('stateful:', model.stateful)\n"
        "print(nn.summary(model, x0))"),
    new_markdown_cell(
        "Forgetting the state is a clear error that names the layer:"),
    new_code_cell(
        "try:\n"
        "    model.apply(params, jnp.zeros((2, 8, 8, 1)))\n"
        "except ValueError as err:\n"
        "    print(err)"),
    new_markdown_cell(
        "## Training\n`TrainState` carries the model state; `classifier_loss` and "
        "`classifier_eval` thread it for a stateful model, so the loop is the same as for an "
        "MLP. (A hand-written `loss_fn(params, batch, key, model_state)` returns `(loss, "
        "metrics, new_model_state)`.)"),
    new_code_cell(
        "opt = optim.sgd(0.05, momentum=0.9)\n"
        "state = train.TrainState.create(params, opt, jax.random.key(1), model_state=model_state)\n"
        "step = train.make_train_step(train.classifier_loss(model), opt)\n"
        "eval_step = train.make_eval_step(train.classifier_eval(model))\n"
        "loader = train_set.batches(32, key=jax.random.key(2), drop_remainder=True)\n"
        "state, history = train.fit(state, step, loader, epochs=EPOCHS, eval_step=eval_step,\n"
        "                           eval_data=test_set.batches(256), progress=False)\n"
        "print(history.eval[-1])\n"
        "stats = state.model_state['stats']\n"
        "print('batches seen by activation_stats:', int(stats['batches']), '=', int(state.step))\n"
        "print('BatchNorm updates:', int(state.model_state['batch_norm_0']['count']))\n"
        "assert int(stats['batches']) == int(state.step)"),
    new_markdown_cell(
        "## Gradients through your layer\nEvery funtrain layer is tested with `jax.jit(jax.grad"
        "(...))` against finite differences in float64. Do the same for yours:"),
    new_code_cell(
        "from jax.test_util import check_grads\n"
        "with jax.enable_x64(True):\n"
        "    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), scale_shift().init(None, x0[0]))\n"
        "    x = jax.random.normal(jax.random.key(3), (4, 8, 1), jnp.float64)\n"
        "    f = jax.jit(lambda p, x: jnp.sum(jnp.sin(scale_shift().apply(p, x))))\n"
        "    check_grads(f, (p64, x), order=1, modes=['rev'])\n"
        "print('gradients match finite differences')"),
]


COMPRESSION = [
    new_markdown_cell(
        "# Quantization and sparsity\n\n"
        "A quantized or pruned model is still just params: `quant.quantize` turns the kernels "
        "into `QTensor`s (int8 or int4 values plus float32 scales), and `sparsity` makes "
        "masks and an optimizer that keeps pruned weights at exactly zero. We compress the "
        "digits MLP (64 → 256 → 10) both ways and plot accuracy against bits and sparsity. "
        "`bench/compress.py` runs the same study over 3 seeds, beside torch."),
    new_code_cell(
        "import os, tempfile\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '20'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "from funtrain import data, nn, optim, quant, sparsity, train\n"
        "from funtrain.train import checkpoint\n\n"
        "train_set, test_set = data.load_digits()\n"
        "model = nn.mlp([256, 10])\n\n"
        "def fit(params, opt, epochs, wrapped=model):\n"
        "    state = train.TrainState.create(params, opt, jax.random.key(1))\n"
        "    step = train.make_train_step(train.classifier_loss(wrapped), opt)\n"
        "    loader = train_set.batches(64, key=jax.random.key(2), drop_remainder=True)\n"
        "    return train.fit(state, step, loader, epochs=epochs, progress=False)[0].params\n\n"
        "def accuracy(params):\n"
        "    logits = jax.jit(model.apply)(params, jnp.asarray(test_set.arrays['x']))\n"
        "    return 100 * float(np.mean(np.argmax(logits, -1) == test_set.arrays['y']))\n\n"
        "def file_bytes(tree):\n"
        "    with tempfile.TemporaryDirectory() as d:\n"
        "        return os.path.getsize(checkpoint.save(d, tree, 0) / 'arrays.npz')\n\n"
        "init = model.init(jax.random.key(0), jnp.zeros((1, 64)))\n"
        "fp32 = fit(init, optim.adamw(1e-3, weight_decay=1e-4), EPOCHS)\n"
        "print(f'float32: {accuracy(fp32):.2f}%')"),
    new_markdown_cell(
        "## Post-training quantization\n"
        "Symmetric, per output channel: `scale = max|w| / 127` (int8) or `/ 7` (int4, packed "
        "two per byte). The model runs on the quantized tree as it is: `nn.dense` "
        "dequantizes on the fly, or, after `quant.calibrate` sets an input scale per layer, "
        "runs an int8 × int8 → int32 matmul."),
    new_code_cell(
        "q8, q4 = quant.quantize(fp32, bits=8), quant.quantize(fp32, bits=4)\n"
        "calib = [{'x': jnp.asarray(train_set.arrays['x'][i:i + 128])} for i in (0, 128, 256)]\n"
        "q8_int = quant.calibrate(lambda p, b: model.apply(p, b['x']), q8, calib)\n"
        "print(jax.tree.map(lambda a: (a.dtype.name, a.shape), q4['dense_0']))\n"
        "hlo = jax.jit(model.apply).lower(q8_int, jnp.zeros((2, 64))).as_text()\n"
        "print('int8 dot accumulating in int32:', 'i8' in hlo and 'i32' in hlo)"),
    new_markdown_cell(
        "## Quantization-aware training\n"
        "`quant.qat` rounds the weights in the forward pass and passes the gradient straight "
        "through, so the float params learn to survive int4. Export with `quant.quantize`."),
    new_code_cell(
        "qat_params = fit(fp32, optim.adamw(3e-4), max(EPOCHS // 3, 1),\n"
        "                 quant.qat(model, bits=4))\n"
        "q4_qat = quant.quantize(qat_params, bits=4)\n"
        "bits = {'float32': (accuracy(fp32), file_bytes(fp32)),\n"
        "        'int8 PTQ': (accuracy(q8), file_bytes(q8)),\n"
        "        'int8, int8 matmuls': (accuracy(q8_int), file_bytes(q8_int)),\n"
        "        'int4 PTQ': (accuracy(q4), file_bytes(q4)),\n"
        "        'int4 QAT': (accuracy(q4_qat), file_bytes(q4_qat))}\n"
        "for name, (acc, size) in bits.items():\n"
        "    ratio = bits['float32'][1] / size\n"
        "    print(f'{name:20} {acc:6.2f}%  {size:7,} B  ({ratio:.2f}x smaller)')"),
    new_markdown_cell(
        "## Pruning\n"
        "One-shot magnitude pruning, then fine-tuning with the masks fixed "
        "(`sparsity.pruned(opt, masks=...)` keeps pruned weights at exactly 0.0 whatever "
        "AdamW's moments and weight decay do), and gradual pruning to 90% on Zhu & Gupta's "
        "cubic schedule."),
    new_code_cell(
        "levels = [0.5, 0.7, 0.8, 0.9, 0.95]\n"
        "if os.environ.get('FUNTRAIN_NB_EPOCHS'):  # the test suite: fewer levels\n"
        "    levels = [0.5, 0.9]\n"
        "one_shot, tuned = [], []\n"
        "for s in levels:\n"
        "    masks = sparsity.magnitude(fp32, s)\n"
        "    pruned = sparsity.apply_masks(fp32, masks)\n"
        "    one_shot.append(accuracy(pruned))\n"
        "    tuned.append(accuracy(fit(pruned, sparsity.pruned(optim.adamw(3e-4), masks=masks),\n"
        "                              max(EPOCHS // 3, 1))))\n"
        "two_four = sparsity.n_m(fp32, 2, 4)\n"
        "tuned_24 = fit(sparsity.apply_masks(fp32, two_four),\n"
        "               sparsity.pruned(optim.adamw(3e-4), masks=two_four), max(EPOCHS // 3, 1))\n"
        "steps = len(train_set) // 64 * EPOCHS\n"
        "schedule = sparsity.polynomial_schedule(0.0, 0.9, begin_step=steps // 10,\n"
        "                                        end_step=steps * 6 // 10,\n"
        "                                        frequency=max(steps // 50, 1))\n"
        "gradual = fit(init, sparsity.pruned(optim.adamw(1e-3, weight_decay=1e-4), schedule),\n"
        "              EPOCHS)\n"
        "print('2:4 fine-tuned', accuracy(tuned_24), sparsity.summary(tuned_24)['layers'])\n"
        "print('90% gradual   ', accuracy(gradual), sparsity.summary(gradual)['layers'])"),
    new_code_cell(
        "fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))\n"
        "names = list(bits)\n"
        "a.bar(names, [bits[n][0] for n in names], color='tab:blue')\n"
        "a.set_ylim(min(v[0] for v in bits.values()) - 3, 100)\n"
        "a.set_ylabel('test accuracy (%)'); a.set_title('accuracy against bits')\n"
        "a.tick_params(axis='x', rotation=30)\n"
        "b.plot([100 * s for s in levels], one_shot, 'o-', label='one-shot')\n"
        "b.plot([100 * s for s in levels], tuned, 'o-', label='one-shot, fine-tuned')\n"
        "b.plot([90], [accuracy(gradual)], 's', label='gradual (Zhu & Gupta)')\n"
        "b.plot([50], [accuracy(tuned_24)], '^', label='2:4, fine-tuned')\n"
        "b.axhline(bits['float32'][0], color='grey', ls='--', label='float32')\n"
        "b.set_xlabel('sparsity (%)'); b.set_ylabel('test accuracy (%)')\n"
        "b.set_title('accuracy against sparsity'); b.legend(fontsize=8)\n"
        "fig.tight_layout()"),
]


RESUME = [
    new_markdown_cell(
        "# Checkpoints and exact resume\n\n"
        "`fit(checkpoint_dir=...)` saves atomic, checksummed checkpoints; `resume=True` picks "
        "the run up where it stopped, with the same data order, so an interrupted and "
        "resumed run gives *bitwise* the same params and losses as one that never stopped. "
        "We stop a run with a simulated Ctrl-C, resume it, compare, then look inside a "
        "checkpoint. (Notebook 04 is about *gradient* checkpointing, which saves memory.)"),
    new_code_cell(
        "import os, signal, tempfile\n"
        "EPOCHS = int(os.environ.get('FUNTRAIN_NB_EPOCHS', '4'))  # tests set 2\n\n"
        "import jax\n"
        "import jax.numpy as jnp\n"
        "import numpy as np\n"
        "from funtrain import data, nn, optim, train\n"
        "from funtrain.train import checkpoint\n\n"
        "train_set, test_set = data.load_digits()\n"
        "model = nn.mlp([256, 10])\n"
        "opt = optim.adamw(optim.schedules.warmup_cosine(1e-3, 20, 45 * EPOCHS))\n"
        "step = train.make_train_step(train.classifier_loss(model), opt)\n\n"
        "def fresh():\n"
        "    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))\n"
        "    return train.TrainState.create(params, opt, jax.random.key(1))\n\n"
        "def loader():\n"
        "    return train_set.batches(32, key=jax.random.key(2), drop_remainder=True)\n\n"
        "RUN = dict(epochs=EPOCHS, progress=False, log_every=1, steps_per_call=10)\n"
        "full_state, full = train.fit(fresh(), step, loader(), **RUN)\n"
        "print('uninterrupted:', int(full_state.step), 'steps, last loss',\n"
        "      round(full.train['loss'][-1], 4))"),
    new_markdown_cell(
        "## Interrupt\n"
        "A callback presses Ctrl-C at step 30. `fit` stops at the next chunk boundary (10 "
        "steps a device call here), saves a checkpoint and returns a live state with "
        "`history.interrupted`."),
    new_code_cell(
        "class CtrlC:\n"
        "    def on_step(self, step, metrics):\n"
        "        if step == 30:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n\n"
        "run_dir = tempfile.mkdtemp()\n"
        "state, first = train.fit(fresh(), step, loader(), **RUN, checkpoint_dir=run_dir,\n"
        "                         callbacks=[CtrlC()])\n"
        "print(first.stop_reason, '-> saved steps', checkpoint.all_steps(run_dir))"),
    new_markdown_cell(
        "## Resume\n"
        "Rerunning the same call with `resume=True` (as a restarted script would, from a "
        "fresh state) restores the checkpoint and the data position, then finishes the run."),
    new_code_cell(
        "state, rest = train.fit(fresh(), step, loader(), **RUN, checkpoint_dir=run_dir,\n"
        "                        resume=True)\n"
        "print('resumed from step', rest.resumed_from)\n"
        "same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),\n"
        "                                                jax.tree.leaves(full_state.params)))\n"
        "losses_equal = first.train['loss'] + rest.train['loss'] == full.train['loss']\n"
        "print('params bitwise equal:', same, '| losses equal:', losses_equal)\n"
        "assert same and losses_equal"),
    new_markdown_cell(
        "## Inside a checkpoint\n"
        "A step is a folder with `arrays.npz` and a JSON manifest: every leaf's key path, "
        "dtype, shape and SHA-256, the run's metadata, and a checksum of the manifest itself. "
        "`restore(target=...)` checks all of it and names the key path of any mismatch."),
    new_code_cell(
        "manifest = checkpoint.read_manifest(run_dir)\n"
        "print('step', manifest['step'], '| format', manifest['format'], '|',\n"
        "      len(manifest['leaves']), 'leaves')\n"
        "for leaf in manifest['leaves'][:4]:\n"
        "    print(f\"  {leaf['path']:24} {leaf['dtype']:8} {str(leaf['shape']):12} \"\n"
        "          f\"{leaf['sha256'][:12]}...\")\n"
        "print('fit metadata:', sorted(manifest['metadata']['fit']))\n"
        "wider = train.TrainState.create(nn.mlp([128, 10]).init(jax.random.key(0),\n"
        "                                jnp.zeros((1, 64))), opt, jax.random.key(1))\n"
        "try:\n"
        "    checkpoint.restore(run_dir, target=wider)\n"
        "except checkpoint.CheckpointError as err:\n"
        "    print(str(err)[:160], '...')"),
]


def write(name: str, cells: list, execute: bool = True) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
        cell["id"] = f"{Path(name).stem}-{i}"
    if execute:
        import nbclient

        print(f"executing {name} ...", flush=True)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    if set(flags) - {"--no-execute"}:  # --help included: never regenerate on a typo
        raise SystemExit("usage: python notebooks/make_notebooks.py [--no-execute] "
                         "[NN_name.ipynb ...]\n(re)writes the notebooks, each executed "
                         "unless --no-execute; names pick some")
    EXECUTE = "--no-execute" not in sys.argv
    ONLY = [a for a in sys.argv[1:] if not a.startswith("--")]  # e.g. 02_optimizers.ipynb
    for filename, cells in [("01_quickstart.ipynb", QUICKSTART),
                            ("02_optimizers.ipynb", OPTIMIZERS),
                            ("03_mixed_precision.ipynb", MIXED_PRECISION),
                            ("04_gradient_checkpointing.ipynb", GRADIENT_CHECKPOINTING),
                            ("05_custom_modules.ipynb", CUSTOM_MODULES),
                            ("06_compression.ipynb", COMPRESSION),
                            ("07_checkpoints_and_resume.ipynb", RESUME)]:
        if not ONLY or filename in ONLY:
            write(filename, cells, EXECUTE)
