"""Writes the notebooks from the cell sources below (run: python notebooks/make_notebooks.py).

Keeping the sources here makes diffs reviewable; the .ipynb files are committed
without outputs and executed by tests/test_notebooks.py.
"""

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
        "`fit` adds epochs, evaluation, a progress bar and a history."),
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
]


def write(name: str, cells: list) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
