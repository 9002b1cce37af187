"""Loggers write parseable files; hooks fire; early stopping stops; lr is reported."""

import csv
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, precision, train


@functools.cache  # the default step and the eval step compile once for the module
def default_parts():
    model = nn.mlp([8, 2])
    opt = optim.inject_hyperparams(optim.adam)(learning_rate=1e-2)
    return (model, opt, train.make_train_step(train.classifier_loss(model), opt),
            train.make_eval_step(train.classifier_eval(model)))


def setup(opt=None, **step_kw):
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((64, 4)).astype(np.float32),
                           y=rng.integers(0, 2, 64).astype(np.int32))
    model, default_opt, step, ev = default_parts()
    state = train.TrainState.create(model.init(jax.random.key(0), jnp.zeros((1, 4))),
                                    opt or default_opt, jax.random.key(1),
                                    loss_scale=step_kw.pop("loss_scale", None))
    if opt is not None or step_kw:
        step = train.make_train_step(train.classifier_loss(model), opt or default_opt,
                                     **step_kw)
    return state, step, ds.batches(16, drop_remainder=True), ev, ds.batches(64)


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("on_") or name == "close":
            return lambda *a: self.calls.append((name, a[0] if a else None))
        raise AttributeError(name)


def test_loggers_write_parseable_files(tmp_path):
    state, step, loader, ev, test = setup(
        loss_scale=precision.DynamicLossScale())
    jl, cl = train.JsonlLogger(tmp_path / "log.jsonl"), train.CsvLogger(tmp_path / "log.csv")
    train.fit(state, step, loader, epochs=2, eval_step=ev, eval_data=test, progress=False,
              log_every=3, callbacks=[jl, cl])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("loss", "grad_norm", "learning_rate", "loss_scale", "skipped_steps"):
        assert key in steps[-1], key
    assert "nonfinite" not in steps[-1]
    assert steps[0]["learning_rate"] == pytest.approx(1e-2)
    # evaluations sit at the global step of the train metrics they follow
    assert [r["step"] for r in records if "eval" in r] == [4, 8]
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert len(rows) == 8 and float(rows[3]["loss"]) == pytest.approx(steps[3]["loss"])
    evals = list(csv.DictReader((tmp_path / "log_eval.csv").open()))
    assert [int(r["step"]) for r in evals] == [4, 8] and "accuracy" in evals[0]
    # from a hand-written loop, jax scalars (the CSV and TensorBoard loggers took them)
    by_hand = train.JsonlLogger(tmp_path / "hand.jsonl")
    by_hand.on_step(jnp.int32(3), {"loss": jnp.float32(0.5), "per_class": jnp.ones(2)})
    by_hand.close()
    assert json.loads((tmp_path / "hand.jsonl").read_text()) == {
        "step": 3, "loss": 0.5, "per_class": [1.0, 1.0]}


def test_loggers_start_afresh_or_append(tmp_path):
    state, step, loader, ev, test = setup()
    (tmp_path / "log.jsonl").write_text('{"old": 1}\n')
    state, _ = train.fit(state, step, loader, progress=False,
                         callbacks=[train.JsonlLogger(tmp_path / "log.jsonl")])
    assert "old" not in (tmp_path / "log.jsonl").read_text()  # a new run: a new file
    logger = train.JsonlLogger(tmp_path / "log.jsonl", append=True)
    state, _ = train.fit(state, step, loader, progress=False, callbacks=[logger])
    state, _ = train.fit(state, step, loader, progress=False, callbacks=[logger])  # again
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()]
    assert steps == list(range(1, 13))


def test_hooks_fire_in_order(tmp_path):
    state, step, loader, ev, test = setup()
    rec = Recorder()
    train.fit(state, step, loader, epochs=1, eval_step=ev, eval_data=test, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=2, callbacks=[rec])
    names = [n for n, _ in rec.calls]
    assert names.count("on_step") == 4 and names.count("on_checkpoint") == 2
    # the epoch-end checkpoint comes after that epoch's evaluation
    assert names[-4:] == ["on_eval", "on_epoch_end", "on_checkpoint", "close"]


def test_an_epoch_ends_after_its_steps_are_logged():
    """With log_every longer than an epoch, on_epoch_end still follows the epoch's on_step
    calls (a callback averaging the epoch's loss there sees all of it)."""
    state, step, loader, ev, test = setup()
    rec = Recorder()
    train.fit(state, step, loader, epochs=2, progress=False, log_every=50, callbacks=[rec])
    names = [n for n, _ in rec.calls if n in ("on_step", "on_epoch_end")]
    assert names == ["on_step"] * 4 + ["on_epoch_end"] + ["on_step"] * 4 + ["on_epoch_end"]


def test_the_bar_counts_the_epochs_of_each_call(monkeypatch):
    """A second fit call shows epochs 1/2 and 2/2 again, for data with or without a len()
    (a callable epoch -> batches has none: its epochs count from 0 in each call)."""
    from funtrain.train.callbacks import ProgressBar

    seen = []
    monkeypatch.setattr(ProgressBar, "set_epoch", lambda self, e, n: seen.append((e, n)))
    state, step, loader, ev, test = setup()
    for data_ in (loader, loader.epoch):
        for _ in range(2):
            state, _ = train.fit(state, step, data_, epochs=2, progress=True)
    assert seen == [(0, 2), (1, 2)] * 4
    # a call that starts mid-epoch spans one data epoch more: still "1/1", never "2/1"
    state, _ = train.fit(state, step, [next(iter(loader.epoch(0)))], progress=False)
    seen.clear()
    train.fit(state, step, loader, epochs=1, progress=True)
    assert seen == [(0, 1), (0, 1)]


def test_early_stopping():
    state, step, loader, ev, test = setup(opt=optim.sgd(0.0))  # lr 0: no improvement
    stopper = train.EarlyStopping(monitor="loss", patience=2)
    state, hist = train.fit(state, step, loader, epochs=10, eval_step=ev, eval_data=test,
                            progress=False, callbacks=[stopper])
    assert len(hist.eval) == 3  # best at epoch 0, then 2 evaluations without improvement
    assert stopper.stop_training
    assert hist.stop_reason == stopper.stop_reason and hist.stop_reason.startswith(
        "EarlyStopping: eval loss did not improve for 2 evaluations (best ")
    assert len(hist.train["step"]) == 12
    # fit again after the stop (say with a lower lr): patience evaluations again, not one
    state, hist = train.fit(state, step, loader, epochs=10, eval_step=ev, eval_data=test,
                            progress=False, callbacks=[stopper])
    assert len(hist.eval) == 2 and stopper.stop_training
    # one fit call per epoch, without a stop between: one count across the calls
    stopper = train.EarlyStopping(monitor="loss", patience=2)
    calls = 0
    while not stopper.stop_training:
        state, _ = train.fit(state, step, loader, epochs=1, eval_step=ev, eval_data=test,
                             progress=False, callbacks=[stopper])
        calls += 1
    assert calls == 3


def test_schedule_learning_rate_is_reported():
    sched = optim.schedules.exponential_decay(0.1, 0.5)
    state, step, loader, ev, test = setup(opt=optim.sgd(sched), learning_rate=sched)
    _, hist = train.fit(state, step, loader, epochs=1, progress=False)
    np.testing.assert_allclose(hist.train["learning_rate"], [0.1, 0.05, 0.025, 0.0125],
                               rtol=1e-6)


def test_tensorboard_logger_message_or_works(tmp_path):
    try:
        logger = train.TensorBoardLogger(tmp_path)
    except ImportError as err:
        assert "pip install tensorboardX" in str(err)
        return
    logger.on_step(0, {"loss": 1.0, "per_class": np.array([0.25, 0.75])})  # a vector metric
    logger.on_eval(0, {"loss": np.float32(2.0)})
    logger.close()  # closes its event file (a notebook making one logger per run leaks none)
    files = set(tmp_path.iterdir())
    assert files
    logger.on_step(1, {"loss": 0.5})  # used again after close (a second fit): a new file
    logger.close()
    assert set(tmp_path.iterdir()) > files
    from tensorboardX.event_file_writer import event_pb2

    tags = set()
    for path in tmp_path.iterdir():
        tags |= _event_tags(path, event_pb2)
    assert {"train/loss", "train/per_class/0", "train/per_class/1", "eval/loss"} <= tags


def test_tensorboard_loggers_sharing_a_logdir_and_a_resume(tmp_path):
    """Two loggers opened in one second wrote one file name: the second erased the first.
    A resume purges the points logged after the checkpoint (they are logged again)."""
    pytest.importorskip("tensorboardX")
    from tensorboardX.event_file_writer import event_pb2

    first = train.TensorBoardLogger(tmp_path)
    first.on_step(1, {"loss": 1.0})
    first.on_step(2, {"loss": 0.9})
    saved = first.state_dict()  # a checkpoint at step 2; the run goes on, then crashes
    first.on_step(3, {"loss": 0.8})
    first.close()
    second = train.TensorBoardLogger(tmp_path)  # the resumed run, in the same second
    second.load_state_dict(saved)
    second.on_step(3, {"loss": 0.7})
    second.close()
    files = sorted(tmp_path.iterdir())  # TensorBoard reads them in name order
    assert len(files) == 2  # one each, and no empty one opened before the resume
    events = [e for path in files for e in _events(path, event_pb2)]
    points = sorted((e.step, round(v.simple_value, 6)) for e in events for v in e.summary.value)
    assert points == [(1, 1.0), (2, 0.9), (3, 0.7), (3, 0.8)]
    purges = [e.step for e in _events(files[-1], event_pb2) if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [3]  # read last, it hides the crashed run's points from step 3 on


def _events(path, event_pb2):
    """The events of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    out, raw = [], path.read_bytes()
    while raw:
        (n,) = struct.unpack("<Q", raw[:8])
        out.append(event_pb2.Event.FromString(raw[12:12 + n]))
        raw = raw[12 + n + 4:]
    return out


def _event_tags(path, event_pb2):
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, crc, data,
    crc)."""
    import struct

    tags, raw = set(), path.read_bytes()
    while raw:
        (n,) = struct.unpack("<Q", raw[:8])
        event = event_pb2.Event.FromString(raw[12:12 + n])
        tags |= {v.tag for v in event.summary.value}
        raw = raw[12 + n + 4:]
    return tags


def test_early_stopping_skips_nan_and_refuses_a_negative_min_delta():
    stopper = train.EarlyStopping(monitor="loss", patience=2)
    for step, value in [(1, float("nan")), (2, 1.0), (3, 0.5)]:  # a NaN first evaluation
        stopper.on_eval(step, {"loss": value})
    assert stopper.best == 0.5 and stopper.best_step == 3 and not stopper.stop_training
    never = train.EarlyStopping(monitor="loss", patience=2)  # no finite evaluation at all
    for step in (1, 2):
        never.on_eval(step, {"loss": float("nan")})
    assert never.stop_training and "(no finite value yet, mode 'min'" in never.stop_reason
    with pytest.raises(ValueError, match="EarlyStopping: min_delta must be >= 0, got -0.1"):
        train.EarlyStopping(min_delta=-0.1)


def test_a_fresh_run_resumed_before_its_first_eval_drops_an_older_runs_rows(tmp_path):
    """The checkpoint came before this run wrote its eval file: an older run's file there
    is not this run's, so the resume must not keep its rows."""
    (tmp_path / "log_eval.csv").write_text("step,loss\n1,9.0\n")  # the older run's
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    for make, name, written in ((train.CsvLogger, "log.csv", "log_eval.csv"),
                                (train.JsonlLogger, "log.jsonl", "log.jsonl")):
        first = make(tmp_path / name)
        if make is train.CsvLogger:
            first.on_step(1, {"loss": 1.0})  # the train file is this run's; not the eval one
        saved = first.state_dict()  # the checkpoint; then the run is killed
        first.close()
        resumed = make(tmp_path / name)
        resumed.load_state_dict(saved)
        resumed.on_eval(3, {"loss": 0.45})
        resumed.close()
        text = (tmp_path / written).read_text()
        assert "9.0" not in text and "0.45" in text, text


def test_jsonl_vector_metrics_are_strict_json(tmp_path):
    logger = train.JsonlLogger(tmp_path / "log.jsonl")
    logger.on_step(1, {"loss": np.float32(0.5), "per_class": [1.0, float("nan")],
                       "hist": np.array([1.0, np.inf])})
    logger.close()
    line = (tmp_path / "log.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c} in {line}"))
    assert record["per_class"] == [1.0, "nan"] and record["hist"] == [1.0, "inf"]


def test_early_stopping_arguments():
    with pytest.raises(ValueError, match="EarlyStopping: mode must be 'min' or 'max'"):
        train.EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="monitored metric 'acc' is not among"):
        train.EarlyStopping(monitor="acc").on_eval(0, {"loss": 1.0})


def test_eval_every_and_eval_params_from_an_ema():
    """Evaluation every N steps (and at the end) on the EMA of the params."""
    state, step, loader, ev, test = setup(opt=optim.ema(optim.adam(1e-2), decay=0.9))
    seen = []
    probe = lambda s: seen.append(int(s.step)) or optim.ema_params(s)
    state, hist = train.fit(state, step, loader, epochs=3, eval_step=ev, eval_data=test,
                            eval_every=5, eval_params=probe, progress=False)
    assert [e["step"] for e in hist.eval] == [5, 10, 12] and seen == [5, 10, 12]
    ema = optim.ema_params(state)
    direct = train.evaluate(ev, ema, test)
    assert hist.eval[-1]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert train.evaluate(ev, state.params, test)["loss"] != pytest.approx(direct["loss"])


def test_eval_params_at_schedule_free_evaluation_point():
    opt = optim.schedule_free_adamw(1e-2)
    state, step, loader, ev, test = setup(opt=opt)
    state, hist = train.fit(state, step, loader, epochs=2, eval_step=ev, eval_data=test,
                            eval_params=optim.schedule_free_eval_params, progress=False)
    x = optim.schedule_free_eval_params(state.opt_state, state.params)
    assert hist.eval[-1]["loss"] == pytest.approx(train.evaluate(ev, x, test)["loss"], rel=1e-6)
    assert hist.eval[-1]["loss"] != pytest.approx(
        train.evaluate(ev, state.params, test)["loss"], rel=1e-6)


def test_progress_bar_without_ipywidgets_is_the_text_bar(monkeypatch):
    """Jupyter without ipywidgets: tqdm.auto would warn "IProgress not found"; the bar
    falls back to tqdm's text bar instead (and funtrain's import never touches tqdm.auto)."""
    import importlib.util

    import tqdm.std

    from funtrain.train import callbacks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    bar = callbacks.ProgressBar(3, 0, "t")
    assert type(bar.bar) is tqdm.std.tqdm
    bar.bar.close()


def test_early_stopping_at_the_final_evaluation_of_an_eval_every_call():
    # it fired there, but History.stop_reason stayed None (with per-epoch evaluation it was
    # set): a `if history.stop_reason: break` loop went on
    state, step, loader, ev, test = setup()
    stopper = train.EarlyStopping(monitor="loss", mode="max", patience=1)  # every eval worse
    state, history = train.fit(state, step, loader, epochs=1, eval_step=ev, eval_data=test,
                               eval_every=3, progress=False, callbacks=[stopper])
    assert [e["step"] for e in history.eval] == [3, 4]  # the second is the call's last step
    assert stopper.stop_training and history.stop_reason == stopper.stop_reason


def test_a_guard_error_keeps_the_steps_before_the_bad_one(tmp_path):
    # the finite steps before a NaN step reached neither History nor the loggers: the loss
    # curve that leads to the divergence was lost
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    x[50] = np.nan  # batch 3 of 16 rows: step 4
    ds = data.ArrayDataset(x=x, y=rng.integers(0, 2, 64).astype(np.int32))
    state, step, _, _, _ = setup()
    log = tmp_path / "log.jsonl"
    with pytest.raises(FloatingPointError, match="fit: step 4: the loss") as err:
        train.fit(state, step, ds.batches(16), epochs=1, progress=False,
                  callbacks=[train.JsonlLogger(log)])
    assert err.value.history.train["step"] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_a_new_csv_run_starts_its_eval_file_too(tmp_path):
    # a new run without evaluation left the older run's l_eval.csv beside its new l.csv
    state, step, loader, ev, test = setup()
    train.fit(state, step, loader, epochs=1, eval_step=ev, eval_data=test, progress=False,
              callbacks=[train.CsvLogger(tmp_path / "l.csv")])
    assert (tmp_path / "l_eval.csv").read_text().count("\n") == 2  # header and one row
    state, step, loader, ev, test = setup()
    train.fit(state, step, loader, epochs=1, progress=False,
              callbacks=[train.CsvLogger(tmp_path / "l.csv")])
    assert (tmp_path / "l_eval.csv").read_text() == ""
    assert (tmp_path / "l.csv").read_text().count("\n") == 5


def test_the_bar_of_data_without_a_len_has_one_colon(capsys):
    state, step, loader, ev, test = setup()
    train.fit(state, step, loader.epoch, epochs=1, progress=True)  # a callable: no len()
    err = capsys.readouterr().err
    assert "train 1/1: " in err and ": :" not in err  # tqdm showed "train 1/1: : 4it"


def test_csv_warns_about_columns_it_cannot_add(tmp_path):
    # a second fit call whose step adds learning_rate lost that column without a word
    state, step, loader, ev, test = setup()
    logger = train.CsvLogger(tmp_path / "l.csv")
    state, _ = train.fit(state, step, loader, epochs=1, progress=False, callbacks=[logger])
    model, opt, _, _ = default_parts()
    skipping = train.make_train_step(train.classifier_loss(model), opt, skip_nonfinite=True)
    with pytest.warns(UserWarning, match=r"CsvLogger: l.csv has the columns \['step', .*"
                                         r"\['skipped', 'skipped_steps'\] are not written"):
        train.fit(state, skipping, loader, epochs=1, progress=False, callbacks=[logger])
