"""Quantization and sparsity on the digits, in one run: accuracy and bytes against bits and
sparsity, funtrain beside torch's ``quantize_dynamic`` and ``prune.l1_unstructured``.

The model is the seed's MLP shape on the 8x8 digits (64-256-10, ReLU), trained with AdamW
through ``fit``. Then:

- bits: float32; int8 PTQ (dequantized on the fly, and calibrated: int8 x int8 -> int32
  matmuls); int4 PTQ; int4 QAT (``quant.qat``, fine-tuned from the float model, exported
  with ``quant.quantize``);
- sparsity: one-shot magnitude pruning at 50/80/90% and 2:4, each then fine-tuned with the
  masks fixed (``sparsity.pruned(masks=...)``); 90% gradual (Zhu & Gupta's cubic schedule);
- bytes: the checkpoint's arrays file (``checkpoint.save``) and, for sparse models, the
  nonzero values plus a 1-bit mask.

Targets (issue 14): int8 PTQ within 1 point of float32, int4 QAT within 1.5, 90% gradual
magnitude pruning within 2.

    python bench/compress.py [--epochs 30] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from funtrain import data, nn, optim, quant, sparsity, train
from funtrain.train import checkpoint

HIDDEN = 256


def accuracy(model, params, test) -> float:
    logits = jax.jit(model.apply)(params, jnp.asarray(test.arrays["x"]))
    return 100.0 * float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test.arrays["y"]))


def train_model(model, params, opt, train_ds, epochs: int, seed: int):
    state = train.TrainState.create(params, opt, jax.random.key(seed))
    step = train.make_train_step(train.classifier_loss(model), opt)
    loader = data.Loader(train_ds, 64, key=jax.random.key(seed + 1), drop_remainder=True)
    state, _ = train.fit(state, step, loader, epochs=epochs, progress=False)
    return state.params


def stored_bytes(tree) -> int:
    with tempfile.TemporaryDirectory() as d:
        folder = checkpoint.save(d, tree, 0)
        return os.path.getsize(folder / "arrays.npz")


def sparse_bytes(params) -> int:
    """Nonzero float32 values plus a 1-bit mask for the kernels; the rest dense."""
    total = 0
    for w in jax.tree.leaves(params):
        w = np.asarray(w)
        total += (np.count_nonzero(w) * 4 + (w.size + 7) // 8 if w.ndim >= 2 else w.nbytes)
    return total


def torch_rows(params, test) -> dict[str, float]:
    """torch's dynamic int8 quantization and L1 unstructured pruning (90%, one-shot) of the
    same trained float MLP."""
    try:
        import torch
        from torch.ao.quantization import quantize_dynamic
        from torch.nn.utils import prune
    except ImportError:
        return {}
    torch.manual_seed(0)

    def net():
        m = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, 10))
        with torch.no_grad():
            for i, name in ((0, "dense_0"), (2, "dense_1")):
                m[i].weight.copy_(torch.tensor(np.asarray(params[name]["w"]).T))
                m[i].bias.copy_(torch.tensor(np.asarray(params[name]["b"])))
        return m.eval()

    x = torch.tensor(test.arrays["x"])
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    def acc(m) -> float:
        with torch.no_grad():
            return 100.0 * float((m(x).argmax(-1).numpy() == test.arrays["y"]).mean())

    out = {"torch float32": acc(net()),
           "torch quantize_dynamic int8": acc(quantize_dynamic(net(), {torch.nn.Linear},
                                                               dtype=torch.qint8))}
    m = net()
    for i in (0, 2):
        prune.l1_unstructured(m[i], "weight", amount=0.9)
    out["torch l1_unstructured 90% one-shot"] = acc(m)
    return out


def cnn():
    return nn.serial(nn.conv(16, 3), nn.relu(), nn.conv(32, 3), nn.relu(), nn.flatten(),
                     nn.dense(10))


def run(seed: int, epochs: int, kind: str = "mlp"
        ) -> tuple[dict[str, float], dict[str, int]]:
    train_ds, test = data.load_digits(seed=seed, flatten=kind == "mlp")
    model = nn.mlp([HIDDEN, 10]) if kind == "mlp" else cnn()
    example = jnp.zeros((1, 64) if kind == "mlp" else (1, 8, 8, 1))
    init = model.init(jax.random.key(seed), example)
    adamw = optim.adamw(1e-3, weight_decay=1e-4)
    fp32 = train_model(model, init, adamw, train_ds, epochs, seed)
    acc, size = {"float32": accuracy(model, fp32, test)}, {"float32": stored_bytes(fp32)}

    calib = [{"x": jnp.asarray(train_ds.arrays["x"][i:i + 128])} for i in range(0, 512, 128)]
    for bits in (8, 4):
        q = quant.quantize(fp32, bits=bits)
        acc[f"int{bits} PTQ"] = accuracy(model, q, test)
        size[f"int{bits} PTQ"] = stored_bytes(q)
    dyn = quant.quantize(fp32, activations="dynamic")
    acc["int8 PTQ, int8 matmuls (dynamic)"] = accuracy(model, dyn, test)
    q8 = quant.calibrate(lambda p, b: model.apply(p, b["x"]), quant.quantize(fp32), calib)
    acc["int8 PTQ, int8 matmuls (calibrated)"] = accuracy(model, q8, test)
    size["int8 PTQ, int8 matmuls (calibrated)"] = stored_bytes(q8)
    qat_params = train_model(quant.qat(model, bits=4), fp32, optim.adamw(3e-4), train_ds,
                             max(epochs // 3, 1), seed + 2)
    q4 = quant.quantize(qat_params, bits=4)
    acc["int4 QAT"], size["int4 QAT"] = accuracy(model, q4, test), stored_bytes(q4)

    tune = max(epochs // 3, 1)
    # 2:4 along each kernel's input axis (-2 for dense and conv); the CNN's first conv has
    # one input channel, so it stays dense
    two_four = sparsity.n_m(fp32, 2, 4, axis=-2, select=r"^(?!conv_0/).*(^|/)w$")
    cases = (("50%", sparsity.magnitude(fp32, 0.5)), ("80%", sparsity.magnitude(fp32, 0.8)),
             ("90%", sparsity.magnitude(fp32, 0.9)), ("2:4", two_four))
    for name, masks in cases if kind == "mlp" else cases[2:]:
        one_shot = sparsity.apply_masks(fp32, masks)
        acc[f"{name} one-shot"] = accuracy(model, one_shot, test)
        tuned = train_model(model, one_shot, sparsity.pruned(optim.adamw(3e-4), masks=masks),
                            train_ds, tune, seed + 3)
        acc[f"{name} fine-tuned"] = accuracy(model, tuned, test)
        size[f"{name} fine-tuned"] = sparse_bytes(tuned)
    steps = len(train_ds) // 64 * epochs
    gradual = sparsity.pruned(adamw, sparsity.polynomial_schedule(
        0.0, 0.9, begin_step=steps // 10, end_step=steps * 6 // 10, frequency=max(steps // 50, 1)))
    g = train_model(model, init, gradual, train_ds, epochs, seed)
    acc["90% gradual"], size["90% gradual"] = accuracy(model, g, test), sparse_bytes(g)
    acc["  (its sparsity, %)"] = 100.0 * sparsity.summary(g)["global"]
    if kind == "mlp":
        acc.update(torch_rows(fp32, test))
    return acc, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    means = {}
    for kind, label in (("mlp", f"MLP 64-{HIDDEN}-10"),
                        ("cnn", "CNN conv16-conv32-dense10")):
        runs = [run(seed, args.epochs, kind) for seed in range(args.seeds)]
        print(f"\ndigits, {label}, AdamW, {args.epochs} epochs; test accuracy (%), mean over "
              f"{args.seeds} seeds (split and init), and stored bytes")
        print(f"  {'variant':38} {'acc %':>7} {'min':>6} {'max':>6} {'bytes':>9} "
              f"{'x fp32':>7}")
        mean = means[kind] = {}
        for row in runs[0][0]:
            vals = [r[0][row] for r in runs]
            mean[row] = float(np.mean(vals))
            size = runs[0][1].get(row)
            ratio = f"{runs[0][1]['float32'] / size:7.2f}" if size else f"{'':>7}"
            print(f"  {row:38} {mean[row]:7.2f} {min(vals):6.2f} {max(vals):6.2f} "
                  f"{size if size else '':>9} {ratio}", flush=True)
    seed = nn.mlp([256, 10]).init(jax.random.key(0), jnp.zeros((1, 784)))
    fp32, kernels = stored_bytes(seed), sum(seed[k]["w"].nbytes for k in ("dense_0", "dense_1"))
    print("\nthe seed's MLP 784-256-10: checkpoint bytes (whole file; the kernels' integer "
          "values alone against their float32 bytes)")
    print(f"  {'float32':8} {fp32:9}")
    for bits in (8, 4):
        q = quant.quantize(seed, bits=bits)
        values = sum(q[k]["w"].values.nbytes for k in ("dense_0", "dense_1"))
        print(f"  {f'int{bits}':8} {stored_bytes(q):9}  {fp32 / stored_bytes(q):5.2f}x smaller "
              f"(kernel values {kernels / values:.2f}x; biases and per-channel scales stay "
              f"float32)")
    print("\ntargets (points below float32):")
    for kind, mean in means.items():
        for row, bar in (("int8 PTQ", 1.0), ("int8 PTQ, int8 matmuls (dynamic)", 1.0),
                         ("int8 PTQ, int8 matmuls (calibrated)", 1.0), ("int4 QAT", 1.5),
                         ("90% gradual", 2.0)):
            gap = mean["float32"] - mean[row]
            print(f"  {kind} {row:38} {gap:+6.2f} (bar <= {bar}): "
                  f"{'ok' if gap <= bar else 'MISSED'}")


if __name__ == "__main__":
    main()
