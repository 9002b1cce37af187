"""Interrupts and resumes: Ctrl-C returns a live state, any error carries it, and a run
killed anywhere, then resumed, equals an uninterrupted one bit for bit, logs included."""

import functools
import json
import os
import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import data, nn, optim, train


class Killed(BaseException):
    """Stands for the process dying: fit saves nothing on it."""


class At:
    """Calls ``action`` once, when the step ``step`` reaches the callbacks."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step(self, step, metrics):
        if step == self.step:
            self.action()


def raise_(error):
    def action():
        raise error
    return action


@functools.cache  # one step per learning rate: fit's programs compile once, not per run
def steps(lr):
    model = nn.serial(nn.dense(16), nn.relu(), nn.dropout(0.2), nn.dense(3))
    opt = optim.adamw(lr)
    return (model, opt, train.make_train_step(train.classifier_loss(model), opt),
            train.make_eval_step(train.classifier_eval(model)))


def setup(lr=1e-2):
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(x=rng.standard_normal((96, 8)).astype(np.float32),
                           y=rng.integers(0, 3, 96).astype(np.int32))
    model, opt, step, ev = steps(lr)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    state = train.TrainState.create(params, opt, jax.random.key(1))
    loader = ds.batches(16, key=jax.random.key(2), drop_remainder=True)  # 6 steps an epoch
    return state, step, loader, dict(eval_step=ev, eval_data=ds.batches(32))


def fit(tmp_path=None, *, epochs=3, extra=(), logs=None, stopper=None, lr=1e-2, **kw):
    """One fit call of the reference run, with fresh loggers on ``logs`` (a folder)."""
    state, step, loader, ev = setup(lr)
    callbacks = list(extra)
    if logs is not None:
        callbacks += [train.JsonlLogger(logs / "log.jsonl"), train.CsvLogger(logs / "log.csv")]
    if stopper is not None:
        callbacks.append(stopper())
    if tmp_path is not None:
        kw.setdefault("checkpoint_dir", tmp_path / "ck")
    return train.fit(state, step, loader, epochs=epochs, progress=False, log_every=1,
                     callbacks=callbacks, **ev, **kw)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_tree(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 a, b)


def test_resume_after_a_kill_is_bitwise(tmp_path):
    full_state, full = fit(epochs=3)
    stop_at = random.Random(7).randrange(3, 17)
    with pytest.raises(Killed) as err:
        fit(tmp_path, extra=[At(stop_at, raise_(Killed))], checkpoint_every=2)
    assert int(err.value.state.step) >= stop_at  # the last state rides on the exception
    saved = train.checkpoint.latest_step(tmp_path / "ck")
    assert saved is not None and saved <= stop_at
    state, resumed = fit(tmp_path, checkpoint_every=2, resume=True)
    assert resumed.resumed_from == saved and resumed.train["step"][0] == saved + 1
    assert resumed.train["loss"] == full.train["loss"][saved:]
    assert resumed.eval == full.eval  # restored evaluations, then the new ones
    assert int(state.step) == 18 and train.checkpoint.latest_step(tmp_path / "ck") == 18
    same_tree(state.params, full_state.params)


@pytest.mark.slow
def test_killed_at_random_points_then_resumed_equals_uninterrupted(tmp_path):
    """Several kills in one run, each resumed: params, losses (from the JSONL log), eval
    records, both loggers' files and EarlyStopping's decision equal an uninterrupted run's."""
    stopper = lambda: train.EarlyStopping("loss", patience=1, min_delta=0.04)  # noqa: E731
    (tmp_path / "a").mkdir()
    full_state, full = fit(epochs=6, logs=tmp_path / "a", stopper=stopper, lr=3e-2)
    (tmp_path / "b").mkdir()
    kills = sorted(random.Random(1).sample(range(2, full.train["step"][-1]), 3))
    for kill in kills:
        with pytest.raises(Killed):
            fit(tmp_path, epochs=6, logs=tmp_path / "b", stopper=stopper, lr=3e-2,
                extra=[At(kill, raise_(Killed))], checkpoint_every=4, resume=True)
    state, last = fit(tmp_path, epochs=6, logs=tmp_path / "b", stopper=stopper, lr=3e-2,
                      checkpoint_every=4, resume=True)
    assert int(state.step) == int(full_state.step)
    same_tree(state.params, full_state.params)
    same_tree(state.opt_state, full_state.opt_state)
    assert last.eval == full.eval
    assert last.stop_reason == full.stop_reason
    assert files(tmp_path / "b") == files(tmp_path / "a")
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().split("\n")
              if line and "eval" not in line]
    assert [r["loss"] for r in logged] == full.train["loss"]
    # it did stop early, and a resume of the stopped run trains no more
    assert full.stop_reason.startswith("EarlyStopping: eval loss did not improve")
    assert int(full_state.step) < 36
    again_state, again = fit(tmp_path, epochs=6, stopper=stopper, lr=3e-2,
                             checkpoint_every=4, resume=True)
    assert again.train["step"] == [] and again.stop_reason == full.stop_reason
    assert int(again_state.step) == int(full_state.step)


KILLED_RUN = """
import pathlib, sys, time
from tests.train.test_resume import fit

class Slow:  # long enough a run to be killed inside it
    def on_step(self, step, metrics):
        time.sleep(0.02)

fit(pathlib.Path(sys.argv[1]), epochs=6, logs=pathlib.Path(sys.argv[2]), lr=3e-2,
    extra=[Slow()], checkpoint_every=4, resume=True)
"""


def test_a_process_killed_by_sigkill_resumes_bitwise(tmp_path):
    """A real kill (SIGKILL, nothing flushed or closed) at a random moment after the first
    checkpoint; the resumed run's params and log files equal an uninterrupted run's."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "a").mkdir()
    full_state, full = fit(epochs=6, logs=tmp_path / "a", lr=3e-2)
    (tmp_path / "b").mkdir()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path), str(tmp_path / "b")],
                            cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 120
        while train.checkpoint.latest_step(tmp_path / "ck") is None:
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.Random(3).uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = train.checkpoint.latest_step(tmp_path / "ck")
    assert killed_at < 36, "killed after the run finished: nothing was tested"
    state, _ = fit(tmp_path, epochs=6, logs=tmp_path / "b", lr=3e-2, checkpoint_every=4,
                   resume=True)
    same_tree(state.params, full_state.params)
    assert files(tmp_path / "b") == files(tmp_path / "a")


def test_ctrl_c_stops_at_a_step_boundary_saves_and_returns(tmp_path):
    # A shell that starts pytest in the background sets SIGINT to SIG_IGN, not Python's
    # default handler: fit must put back whichever it found (taken before any fit runs).
    before = signal.getsignal(signal.SIGINT)
    full_state, full = fit(epochs=3)
    assert signal.getsignal(signal.SIGINT) is before
    sigint = lambda: os.kill(os.getpid(), signal.SIGINT)
    state, history = fit(tmp_path, epochs=3, extra=[At(5, sigint)])
    assert history.interrupted and history.stop_reason == "interrupted (Ctrl-C)"
    stopped = int(state.step)
    assert 5 <= stopped < 18 and history.train["step"][-1] == stopped
    assert train.checkpoint.latest_step(tmp_path / "ck") == stopped  # saved first
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    state, rest = fit(tmp_path, epochs=3, resume=True)
    assert history.train["loss"] + rest.train["loss"] == full.train["loss"]
    same_tree(state.params, full_state.params)


def test_ctrl_c_in_the_last_step_still_evaluates_the_end(tmp_path):
    """Every step ran: the run is finished (a resume trains nothing), so its final
    evaluation (eval_every does not divide the 12 steps) must happen in this call, and be
    in the checkpoint's history, interrupted or not."""
    sigint = lambda: os.kill(os.getpid(), signal.SIGINT)
    _, full = fit(tmp_path / "full", epochs=2, eval_every=5)
    assert [e["step"] for e in full.eval] == [5, 10, 12]
    _, again = fit(tmp_path / "full", epochs=2, eval_every=5, resume=True)
    assert again.train["step"] == [] and again.eval == full.eval
    class LastEpoch:  # Ctrl-C while the last chunk is handled, before the loop's stop check
        def on_epoch_end(self, epoch, state):
            if epoch == 1:
                sigint()

    state, history = fit(tmp_path, epochs=2, eval_every=5, extra=[LastEpoch()])
    assert history.interrupted and int(state.step) == 12
    assert history.eval == full.eval
    _, again = fit(tmp_path, epochs=2, eval_every=5, resume=True)
    assert again.train["step"] == [] and again.eval == full.eval


def test_keyboard_interrupt_from_a_callback_returns_a_live_state(tmp_path, capsys):
    """A KeyboardInterrupt raised while callbacks receive results (on_step, step 4) returns
    a live state. It is not saved: the loggers stopped mid-delivery, so the checkpoint
    that matches them (none yet, in the first epoch) stays the resume point, and the
    resumed run's logs equal an uninterrupted run's."""
    state, history = fit(tmp_path, epochs=2, extra=[At(4, raise_(KeyboardInterrupt))],
                         logs=tmp_path)
    assert history.interrupted and "KeyboardInterrupt" in history.stop_reason
    assert int(state.step) >= 4 and np.isfinite(np.asarray(state.params["dense_0"]["w"])).all()
    assert train.checkpoint.latest_step(tmp_path / "ck") is None
    assert "not saved, so a resume starts from scratch" in capsys.readouterr().err
    _, resumed = fit(tmp_path, epochs=2, resume=True, logs=tmp_path)
    (tmp_path / "plain").mkdir()
    _, plain = fit(tmp_path / "plain", epochs=2, logs=tmp_path / "plain")
    assert resumed.eval == plain.eval
    assert (tmp_path / "log.jsonl").read_text() == (tmp_path / "plain" / "log.jsonl").read_text()
    state, history = fit(epochs=1, extra=[At(3, raise_(KeyboardInterrupt))])  # no checkpoints
    assert history.interrupted and int(state.step) >= 3


class StopAt:
    """Asks fit to stop when step ``step`` reaches ``on_step`` (or, with ``epoch_end``, at
    the end of the epoch that holds it)."""

    def __init__(self, step, epoch_end=False):
        self.step, self.epoch_end = step, epoch_end
        self.stop_training, self.stop_reason, self.seen = False, None, 0

    def on_step(self, step, metrics):
        self.seen = step
        if step == self.step and not self.epoch_end:
            self.stop_training, self.stop_reason = True, f"asked at {step}"

    def on_epoch_end(self, epoch, state):
        if self.epoch_end and self.seen >= self.step:
            self.stop_training, self.stop_reason = True, f"asked at {self.seen}"


@pytest.mark.parametrize("steps_per_call", [1, None])
def test_a_stop_asked_in_on_step_comes_within_log_every_and_one_call(steps_per_call):
    """Callbacks (and so a stop) follow the dispatched steps by at most log_every steps and
    one device call; a stop asked at the last step is reported too."""
    state, history = fit(epochs=20, extra=[StopAt(5)], steps_per_call=steps_per_call)
    assert history.stop_reason == "asked at 5"
    assert 5 <= int(state.step) <= 5 + 1 + (steps_per_call or 6)  # log_every=1, 6 a call
    _, history = fit(epochs=1, extra=[StopAt(6)], steps_per_call=steps_per_call)
    assert history.stop_reason == "asked at 6"


def test_pending_metrics_lag_by_at_most_log_every_steps_and_one_call():
    """The rule behind the bound, with a device that never finishes on its own: the
    metrics not yet computed are still taken (waited for) once more than ``lag`` steps
    wait behind the newest call. Taking only computed ones let callbacks lag unboundedly."""
    from funtrain.train.loop import _Pending

    class Busy:  # a device array whose value is not computed yet
        def is_ready(self):
            return False

    pending = _Pending()
    for first in range(0, 12, 3):  # four calls of three steps
        pending.add(first, 3, [{"loss": Busy()}], True)
    assert pending.ready(lag=4) == 2  # 9 steps wait behind the newest: two calls leave 3
    assert pending.ready(lag=100) == 0  # within the lag: nothing is waited for
    assert pending.ready(lag=1) == 3  # never the newest call itself


def test_a_stopped_run_keeps_its_final_evaluation_on_resume(tmp_path):
    """Stopped at step 6 (not an evaluation step of eval_every=4), the run evaluates once
    more and its checkpoint holds that evaluation: rerun with resume=True, it returns the
    same evaluations and leaves the log as it was."""
    _, first = fit(tmp_path, epochs=3, eval_every=4, logs=tmp_path,
                   extra=[StopAt(6, epoch_end=True)])
    assert first.stop_reason == "asked at 6" and [e["step"] for e in first.eval] == [4, 6]
    log = (tmp_path / "log.jsonl").read_text()
    state, again = fit(tmp_path, epochs=3, eval_every=4, logs=tmp_path, resume=True,
                       extra=[StopAt(6, epoch_end=True)])
    assert int(state.step) == 6 and again.eval == first.eval and again.train["step"] == []
    assert (tmp_path / "log.jsonl").read_text() == log


def test_any_other_error_carries_the_last_state():
    with pytest.raises(RuntimeError, match="boom") as err:
        fit(epochs=2, extra=[At(7, raise_(RuntimeError("boom")))])
    state = err.value.state
    assert int(state.step) >= 7 and not any(x.is_deleted() for x in jax.tree.leaves(state))
    assert err.value.history.train["step"][:7] == list(range(1, 8))
    assert "err.state" in "".join(err.value.__notes__)


def test_resuming_a_finished_run_returns_its_history(tmp_path):
    _, first = fit(tmp_path, epochs=2)
    state, again = fit(tmp_path, epochs=2, resume=True)
    assert again.train["step"] == [] and again.eval == first.eval and again.eval[-1]
    assert int(state.step) == 12 and again.resumed_from == 12
    state, more = fit(tmp_path, epochs=3, resume=True)  # a longer plan: one more epoch
    assert more.train["step"][0] == 13 and int(state.step) == 18 and len(more.eval) == 3


def test_a_directory_of_another_run_is_an_error(tmp_path):
    fit(tmp_path, epochs=1)
    with pytest.raises(train.CheckpointError, match=r"already holds checkpoints of another "
                                                    r"run \(steps up to 6, beyond this state's "
                                                    r"step 0\)\. Pass resume=True"):
        fit(tmp_path, epochs=1)
    state, history = fit(tmp_path, epochs=1, overwrite=True)
    assert train.checkpoint.all_steps(tmp_path / "ck") == [6]
    # continuing the live state into the same folder is no other run
    _, step, loader, ev = setup()
    state, history = train.fit(state, step, loader, progress=False, checkpoint_dir=tmp_path /
                               "ck", **ev)
    assert train.checkpoint.all_steps(tmp_path / "ck") == [6, 12]


def test_resume_with_other_data_is_an_error_unless_rederived(tmp_path):
    fit(tmp_path, epochs=1, checkpoint_every=4)
    template, step, loader, ev = setup()
    other = loader.dataset.batches(32, key=jax.random.key(2), drop_remainder=True)
    kw = dict(epochs=2, progress=False, checkpoint_dir=tmp_path / "ck", **ev)
    with pytest.raises(train.CheckpointError, match=r"trained on data with \{'steps_per_epoch"
                                                    r"': 6, 'batch_size': 16, 'examples': 96\}"
                                                    r", but train_data now has .*'batch_size': "
                                                    r"32.*resume='rederive'"):
        train.fit(template, step, other, resume=True, **kw)
    state, history = train.fit(template, step, other, resume="rederive", **kw)
    assert history.resumed_from == 6 and int(state.step) == 6  # 0 + 2 epochs of 3 steps


def test_resume_with_another_shuffle_key_is_an_error_unless_rederived(tmp_path):
    """The same batches in another order: the position is found, but not the batches."""
    fit(tmp_path, epochs=1, checkpoint_every=4)
    template, step, loader, ev = setup()
    other = loader.dataset.batches(loader.batch_size, key=jax.random.key(7),
                                   drop_remainder=loader.drop_remainder)
    kw = dict(epochs=2, progress=False, checkpoint_dir=tmp_path / "ck", **ev)
    with pytest.raises(train.CheckpointError, match=r"trained on data shuffled with key data "
                                                    r"\[.*\], but train_data is now shuffled "
                                                    r"with key data \[.*resume='rederive'"):
        train.fit(template, step, other, resume=True, **kw)
    state, history = train.fit(template, step, other, resume="rederive", **kw)
    assert history.resumed_from == 6 and int(state.step) == 12


def test_checkpoint_arguments_are_checked(tmp_path):
    state, step, loader, _ = setup()
    with pytest.raises(ValueError, match="resume, overwrite and checkpoint_every need "
                                         "checkpoint_dir"):
        train.fit(state, step, loader, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be None or a positive int, got 0"):
        train.fit(state, step, loader, checkpoint_dir=tmp_path, checkpoint_every=0,
                  progress=False)
    with pytest.raises(ValueError, match="resume must be True, False or 'rederive'"):
        train.fit(state, step, loader, checkpoint_dir=tmp_path, resume="yes", progress=False)
