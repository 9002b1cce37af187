"""Bad input, table-driven: each row raises its exception type with words that say what/where.

Every row fails before any compilation of a training step (at construction, while
tracing, or in the checked mode on the host).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, precision, train

MODEL = nn.mlp([8, 3])
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 4)))


def state(opt=None):
    return train.TrainState.create(PARAMS, opt or optim.sgd(0.1), jax.random.key(1))


def step(opt=None):
    return train.make_train_step(train.classifier_loss(MODEL), opt or optim.sgd(0.1))


GOOD = {"x": np.ones((6, 4), np.float32), "y": np.arange(6, dtype=np.int32) % 3}


def fit_with(batches, **kw):
    return train.fit(state(), step(), batches, progress=False, **kw)


def restore_other_model(tmp_path):
    train.checkpoint.save(tmp_path, state(), 0)
    other = nn.mlp([16, 3])
    target = train.TrainState.create(other.init(jax.random.key(0), jnp.zeros((1, 4))),
                                     optim.sgd(0.1), jax.random.key(1))
    train.checkpoint.restore(tmp_path, target=target)


ROWS = [
    ("dataset arrays with different leading dims", ValueError,
     r"arrays must share their leading dimension",
     lambda tmp: data.ArrayDataset(x=np.ones((5, 4)), y=np.ones(6))),
    ("batch arrays with different leading dims (traced step)", ValueError,
     r"make_train_step: batch: the arrays' leading dimensions differ .*x \(6, 4\), y \(5,\)",
     lambda tmp: step()(state(), {"x": GOOD["x"], "y": GOOD["y"][:5]})),
    ("labels out of range for cross-entropy (checked mode)", ValueError,
     r"fit: epoch 0 batch 0: labels out of range: 'y' contains 3, expected values in \[0, 3\)",
     lambda tmp: fit_with([{**GOOD, "y": GOOD["y"] + 1}], check_data=True, num_classes=3)),
    ("negative label (checked mode)", ValueError, r"labels out of range: 'y' contains -1",
     lambda tmp: data.check_batch({**GOOD, "y": GOOD["y"] - 1}, num_classes=3)),
    ("batch of the wrong feature shape for the model", ValueError,
     r"dense layer 'dense_0': expected an input with 4 features .*got input of shape \(6, 5\)",
     lambda tmp: step()(state(), {**GOOD, "x": np.ones((6, 5), np.float32)})),
    ("NaN in input data (checked mode)", ValueError,
     r"fit: epoch 0 batch 0: 'x' has 1 non-finite value\(s\) \(nan/inf\), the first at index "
     r"\(2, 1\)",
     lambda tmp: fit_with([{**GOOD, "x": np.where(np.arange(24).reshape(6, 4) == 9, np.nan,
                                                   GOOD["x"]).astype(np.float32)}],
                          check_data=True)),
    ("inf in input data (checked mode)", ValueError, r"'x' has 24 non-finite value",
     lambda tmp: data.check_batch({**GOOD, "x": np.full((6, 4), np.inf, np.float32)})),
    ("an empty dataset", ValueError, r"Loader: the dataset is empty \(0 examples\)",
     lambda tmp: data.ArrayDataset(x=np.ones((0, 4))).batches(2)),
    ("batch size <= 0", ValueError, r"Loader: batch_size must be a positive int, got 0",
     lambda tmp: data.ArrayDataset(x=np.ones((5, 4))).batches(0)),
    ("batch size larger than the dataset with drop_remainder", ValueError,
     r"batch_size=8 is larger than the dataset \(5 examples\) and drop_remainder=True",
     lambda tmp: data.ArrayDataset(x=np.ones((5, 4))).batches(8, drop_remainder=True)),
    ("an optimizer state from another optimizer", ValueError,
     r"chain: expected a state tuple of 2 entries .*another optimizer's init_state",
     lambda tmp: step(optim.sgd(0.1, momentum=0.9))(state(optim.sgd(0.1)), GOOD)),
    ("a checkpoint from a different model", ValueError,
     r"key path 'params/dense_0/w': checkpoint has shape \(4, 8\), target expects \(4, 16\)",
     restore_other_model),
    ("train data that yields nothing", ValueError, r"train_data yielded no batches in epoch 0",
     lambda tmp: fit_with([])),
    ("a one-shot iterator for several epochs", TypeError,
     r"train_data is a one-shot iterator, but epochs=2",
     lambda tmp: fit_with(iter([GOOD]), epochs=2)),
    ("a negative learning rate", ValueError, r"adamw: learning_rate must be >= 0.0, got -0.001",
     lambda tmp: optim.adamw(-1e-3)),
    ("an unknown precision policy dtype", ValueError, r"bf17",
     lambda tmp: precision.get_policy("params=float32,compute=bf17")),
    ("a params tree missing a layer", ValueError, r"missing key path 'dense_1'",
     lambda tmp: MODEL.apply({"dense_0": PARAMS["dense_0"]}, GOOD["x"])),
]


def test_the_table_has_at_least_twelve_rows():
    assert len(ROWS) >= 12


@pytest.mark.parametrize("case,exc,message,call", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(case, exc, message, call, tmp_path):
    with pytest.raises(exc, match=message):
        call(tmp_path)
