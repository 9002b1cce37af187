"""Bad input, table-driven: each row raises its exception type with words that say what/where.

Every row fails before any compilation of a training step (at construction, while
tracing, or in the checked mode on the host).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, precision, train
from funtrain import losses as train_losses

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


def state_with_foreign_opt_state():
    momentum = optim.sgd(0.1, momentum=0.9)
    wider = nn.mlp([16, 3]).init(jax.random.key(0), jnp.zeros((1, 4)))
    return train.TrainState.create(PARAMS, momentum, jax.random.key(1))._replace(
        opt_state=momentum.init_state(wider))


def call_twice(step_fn, s):
    step_fn(s, GOOD)
    step_fn(s, GOOD)  # s was donated by the first call


def fit_twice():
    s, run_step = state(), step()
    train.fit(s, run_step, [GOOD], progress=False)
    train.fit(s, run_step, [GOOD], progress=False)


def evaluate_donated():
    s, run_step = state(), step()
    run_step(s, GOOD)  # donates s
    eval_step = train.make_eval_step(lambda p, b: {"loss": jnp.sum(p["dense_0"]["w"])})
    train.evaluate(eval_step, s.params, [GOOD])


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
    ("nan in float8 input data", ValueError, r"'x' has 1 non-finite value",  # not a numpy
     lambda tmp: data.check_batch({**GOOD, "x": np.where(  # float: it was missed
         np.arange(24).reshape(6, 4) == 9, np.nan, GOOD["x"]).astype(jnp.float8_e4m3fn)})),
    ("inf in the imaginary part", ValueError, r"'x' has 1 non-finite value",
     lambda tmp: data.check_batch({**GOOD, "x": GOOD["x"] + np.where(
         np.arange(24).reshape(6, 4) == 9, 1j * np.inf, 0)})),
    ("an empty dataset", ValueError, r"Loader: the dataset is empty \(0 examples\)",
     lambda tmp: data.ArrayDataset(x=np.ones((0, 4))).batches(2)),
    ("batch size <= 0", ValueError, r"Loader: batch_size must be a positive int, got 0",
     lambda tmp: data.ArrayDataset(x=np.ones((5, 4))).batches(0)),
    ("batch size larger than the dataset with drop_remainder", ValueError,
     r"batch_size=8 is larger than the dataset \(5 examples\) and drop_remainder=True",
     lambda tmp: data.ArrayDataset(x=np.ones((5, 4))).batches(8, drop_remainder=True)),
    ("an optimizer state from another optimizer", ValueError,
     r"make_train_step: state.opt_state was not made by this optimizer's init_state \(the "
     r"optimizer's state has '0/trace/dense_0/b'.*TrainState.create\(params, optimizer, key\)",
     lambda tmp: step(optim.sgd(0.1, momentum=0.9))(state(optim.sgd(0.1)), GOOD)),
    ("Adam's state given to SGD with momentum", ValueError,
     r"state.opt_state was not made by this optimizer's init_state \(the optimizer's state "
     r"has '0/trace/dense_0/b'.*; the given state has '0/mu/dense_0/b'",
     lambda tmp: step(optim.sgd(0.1, momentum=0.9))(state(optim.adam(0.1)), GOOD)),
    ("an optimizer state built for other params", ValueError,
     r"state.opt_state at '0/trace/dense_0/b' has shape \(16,\) and dtype float32, but for "
     r"these params the optimizer keeps \(8,\) and float32: the state was built for other "
     r"params",
     lambda tmp: step(optim.sgd(0.1, momentum=0.9))(state_with_foreign_opt_state(), GOOD)),
    ("negative labels (wrapped to the last class before)", ValueError,
     r"fit: step 1: 2 integer label\(s\) of the batch lie outside \[0, classes\).*their "
     r"cross-entropy is NaN",
     lambda tmp: fit_with([{**GOOD, "y": GOOD["y"] - 1}])),
    ("labels >= the class count, checked mode without num_classes", ValueError,
     r"fit: step 1: 2 integer label\(s\) of the batch lie outside \[0, classes\)",
     lambda tmp: fit_with([{**GOOD, "y": GOOD["y"] + 1}], check_data=True)),
    ("one-hot labels that are not distributions (checked mode)", ValueError,
     r"batch: labels 'y' at example \(0,\) sum to 2, expected one-hot or probabilities",
     lambda tmp: data.check_batch({"x": GOOD["x"], "y": np.full((6, 3), 2 / 3, np.float32)},
                                  num_classes=3)),
    ("one-hot labels with a negative entry (checked mode)", ValueError,
     r"labels 'y' have a negative probability -1 at index \(0, 0\)",
     lambda tmp: data.check_batch({"x": GOOD["x"], "y": np.array([[-1, 1, 1]] * 6, np.float32)},
                                  num_classes=3)),
    ("one-hot labels of the wrong width (checked mode)", ValueError,
     r"labels 'y' are not integers, so they must be one-hot or probabilities of shape "
     r"\(\.\.\., 3\), got shape \(6, 4\)",
     lambda tmp: data.check_batch({"x": GOOD["x"], "y": np.eye(6, 4, dtype=np.float32)},
                                  num_classes=3)),
    ("params of a wider model", ValueError,
     r"dense layer 'dense_0': w has shape \(4, 8\), but this layer has 5 output features: "
     r"expected w of shape \(4, 5\); were the params made by another model's init\?",
     lambda tmp: nn.mlp([5, 3]).apply(PARAMS, GOOD["x"])),
    ("conv params of another model", ValueError,
     r"conv layer .*: w has shape \(3, 3, 1, 4\), but this layer expects \(3, 3, 1, 2\)",
     lambda tmp: nn.conv(2, 3, name="conv").apply(
         nn.conv(4, 3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 1))),
         jnp.zeros((1, 5, 5, 1)))),
    ("a schedule returning shape (1,)", ValueError,
     r"sgd: learning_rate is a schedule; it must return a scalar, got shape \(1,\) at count 0",
     lambda tmp: optim.sgd(lambda count: jnp.full((1,), 0.1))),
    ("a schedule returning a negative learning rate", ValueError,
     r"sgd: learning_rate\(0\) must be >= 0.0, got -0.1",
     lambda tmp: optim.sgd(lambda count: -0.1)),
    ("a schedule returning None", TypeError,
     r"adamw: learning_rate is a schedule; it must return a scalar, got NoneType at count 0",
     lambda tmp: optim.adamw(lambda count: None)),
    ("a schedule taking no argument", TypeError,
     r"sgd: learning_rate is a schedule, so it must take the step count, schedule\(count\) "
     r"-> value; calling it with count 0 raised TypeError",
     lambda tmp: optim.sgd(lambda: 0.1)),
    ("an infinite learning rate", ValueError, r"sgd: learning_rate must be finite, got inf",
     lambda tmp: optim.sgd(float("inf"))),
    ("a tuple batch of three", TypeError,
     r"classifier_loss: a batch is a dict \{'x': inputs, 'y': labels\} or a tuple \(inputs, "
     r"labels\), got a tuple of 3",
     lambda tmp: step()(state(), (GOOD["x"], GOOD["y"], GOOD["y"]))),
    ("a batch without the input key", ValueError,
     r"classifier_loss: the batch has no key 'x' \(its keys: 'image', 'y'\); name the keys "
     r"with classifier_loss\(model, x=\.\.\., y=\.\.\.\)",
     lambda tmp: step()(state(), {"image": GOOD["x"], "y": GOOD["y"]})),
    ("a single batch dict as train_data", TypeError,
     r"fit: train_data is a single batch \(dict of arrays\); pass batches: a Loader",
     lambda tmp: fit_with(GOOD)),
    ("an int as the Loader key", TypeError,
     r"Loader: key must be a PRNG key such as jax.random.key\(0\) \(or None for no "
     r"shuffling\), got int 0",
     lambda tmp: data.ArrayDataset(**GOOD).batches(2, key=0)),
    ("a donated state passed to the step again", ValueError,
     r"step: the state passed in was donated to an earlier step or fit call, so its buffers "
     r"are deleted\. Use the state that call returned",
     lambda tmp: call_twice(step(), state())),
    ("a donated state passed to fit again", ValueError,
     r"fit: the state passed in was donated to an earlier step or fit call",
     lambda tmp: fit_twice()),
    ("a donated state passed to scan_steps", ValueError,
     r"scan_steps: the state passed in was donated to an earlier step or fit call",
     lambda tmp: call_twice(lambda s, b: train.scan_steps(step())(s, jax.tree.map(
         lambda a: a[None], b)), state())),
    ("donated params passed to evaluate", ValueError,
     r"evaluate: the params passed in were donated to a train step or fit call",
     lambda tmp: evaluate_donated()),
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
    ("fused given something other than a bool or a grouping function", TypeError,
     r"TrainState.create: fused must be True, False or a function \(key_path, leaf\) -> "
     r"label, got str",
     lambda tmp: train.TrainState.create(PARAMS, optim.sgd(0.1), jax.random.key(1),
                                         fused="yes")),
    ("fused params given to the model", nn.ModuleError,
     r"params must be a dict keyed by child name, got FlatParams \(fused params: pass "
     r"params.unflatten\(\)\)",
     lambda tmp: MODEL.apply(optim.fuse(PARAMS), GOOD["x"])),
]


def test_the_table_has_at_least_thirty_five_rows():
    assert len(ROWS) >= 35


@pytest.mark.parametrize("case,exc,message,call", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(case, exc, message, call, tmp_path):
    with pytest.raises(exc, match=message):
        call(tmp_path)


# ----------------------------------------------------------------------------- choices
# Inputs that are not errors, by a documented choice: each is tested to behave as documented.


def test_tuple_batches_train_and_evaluate_like_dicts():
    batches = [(GOOD["x"], GOOD["y"])] * 3
    s, history = fit_with(batches, epochs=2, eval_step=train.make_eval_step(
        train.classifier_eval(MODEL)), eval_data=batches)
    s_dict, h_dict = fit_with([GOOD] * 3, epochs=2)
    assert history.train["loss"] == h_dict.train["loss"]
    assert np.isfinite(history.eval[-1]["loss"])
    data.check_batch((GOOD["x"], GOOD["y"] + 3), num_classes=6)
    with pytest.raises(ValueError, match=r"labels out of range: '\[1\]' contains 5"):
        data.check_batch((GOOD["x"], GOOD["y"] + 3), num_classes=5)


def test_masked_out_invalid_labels_cost_nothing():
    # Padding labels (e.g. -1) under a mask: finite loss and gradients, as if absent.
    logits = jnp.arange(12.0).reshape(4, 3) / 7
    labels = jnp.array([0, 2, -1, 3])
    mask = jnp.array([True, True, False, False])

    def loss(z, y, m):
        return train_losses.softmax_cross_entropy(z, y, mask=m)

    value, grad = jax.jit(jax.value_and_grad(loss))(logits, labels, mask)
    ref, ref_grad = jax.value_and_grad(loss)(logits[:2], labels[:2], None)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    np.testing.assert_allclose(grad[:2], ref_grad, rtol=1e-5)  # the mean over the 2 kept
    assert not np.any(grad[2:])
    assert np.isnan(loss(logits, labels, None))
    assert int(train_losses.invalid_labels(logits, labels)) == 2


def test_sixteen_bit_params_warn_that_small_updates_round_away():
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    opt = optim.sgd(1e-3)
    s = train.TrainState.create(params16, opt, jax.random.key(1))
    with pytest.warns(UserWarning, match=r"params 'dense_0/b' are bfloat16, so the update is "
                                         r"added in bfloat16.*policy='p=f32,c=bfloat16'"):
        new, _ = step(opt)(s, GOOD)
    # the warning's claim: a small sgd step leaves most bf16 weights unchanged
    same = np.mean(np.asarray(new.params["dense_0"]["w"]) == np.asarray(params16["dense_0"]["w"]))
    assert same > 0.5


def test_integer_params_are_named():
    """The step differentiates every leaf of params: an integer leaf is named by its key
    path (jax.grad's own error names none)."""
    params = {**PARAMS, "vocab": {"ids": jnp.arange(4)}}
    opt = optim.sgd(0.1)
    s = train.TrainState.create(params, opt, jax.random.key(1))
    with pytest.raises(TypeError, match=r"make_train_step: params 'vocab/ids' are int32, but "
                                        r"the step differentiates every leaf of params"):
        train.make_train_step(lambda p, b: jnp.sum(p["dense_0"]["b"]), opt)(s, GOOD)


def test_schedule_checks_inside_a_trace_see_only_the_shape():
    @jax.jit
    def build_and_step(lr):
        opt = optim.sgd(lambda count: lr * jnp.ones(()))  # built while tracing: lr is traced
        params = {"w": jnp.ones(2)}
        updates, _ = opt.update({"w": jnp.ones(2)}, opt.init_state(params), params)
        return updates["w"]

    np.testing.assert_allclose(build_and_step(0.5), [-0.5, -0.5])
