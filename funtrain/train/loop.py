"""``fit``: the training loop, read top to bottom; its small collaborators follow it.

- ``train.feed``: the chunk plan, and the feeds that run it (device-resident epochs for a
  ``Loader``, background prefetch for any other data);
- ``_Pending``: metrics still on the device, brought to the host at logging points;
- ``_Guard``: the non-finite guard's host side (stop mode, and the limit on skipped steps);
- ``checkpoint.RunCheckpoints``: the state plus what an exact resume needs;
- ``callbacks``: loggers, ``EarlyStopping``, and the ``ProgressBar``;
- ``_Interrupts``: Ctrl-C asks the loop to stop at the next chunk boundary.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from funtrain._checks import check_int
from funtrain._tree import keystr
from funtrain._typing import Batch, Params
from funtrain.data.dataset import Loader
from funtrain.optim.fused import unfuse
from funtrain.parallel import _check_process_split, shard_batch
from funtrain.precision import all_finite
from funtrain.train.callbacks import EarlyStopping, ProgressBar
from funtrain.train.checkpoint import RunCheckpoints
from funtrain.train.feed import (
    DeviceFeed,
    HostFeed,
    auto_steps_per_call,
    convolves_on_cpu,
    epoch_batches,
    fits_on_device,
    full_batches,
)
from funtrain.train.state import TrainState
from funtrain.train.step import Metrics, StepFn, _is_deleted, donated_state_error

Data = Any  # a Loader (has .epoch(e)), a callable epoch -> iterable, or a re-iterable


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
      train: this call's per-step metrics: ``train["loss"][i]`` is the loss of the update
        that took the state to step ``train["step"][i]`` (global steps, counted after the
        update, as ``state.step``).
      eval: one dict per evaluation of the run, with ``epoch`` and ``step`` (the global
        step evaluated, as for ``train``). A resumed run's list starts with the
        evaluations restored from its checkpoint.
      seconds: wall-clock time of the ``fit`` call, evaluation included.
      interrupted: the call was stopped by Ctrl-C (``KeyboardInterrupt``).
      stop_reason: why the run stopped before its last step (a callback's
        ``stop_reason``, or the interruption), else ``None``.
      resumed_from: the checkpoint step a resumed call started from, else ``None``.
    """

    train: dict[str, list[float]] = field(default_factory=lambda: {"step": []})
    eval: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    stop_reason: str | None = None
    resumed_from: int | None = None


def _batch_size(batch: Batch) -> int:
    # 0-d leaves (a loss weight, a temperature) are per batch, as check_leading_dims allows
    sized = [x for x in jax.tree.leaves(batch) if np.ndim(x) > 0]
    if not sized:
        raise ValueError("evaluate: a batch needs at least one array with a leading "
                         "example axis")
    return int(np.shape(sized[0])[0])


def evaluate(eval_step: Callable[..., Metrics], params: Params, data: Data,
             model_state: Any = None) -> dict[str, float]:
    """Mean of ``eval_step``'s metrics over ``data``, weighted by batch size (exact means).

    ``model_state`` (a stateful model's, e.g. ``state.model_state``) is passed to
    ``eval_step`` as its third argument. The sums stay on the device: one host transfer.
    With params placed across several processes, each process passes the whole eval data,
    or a ``Loader`` with ``process_index``/``process_count`` that reads its own rows of
    each batch (as for ``fit``'s training data); either way every process gets the means
    over the global batches.
    """
    if _is_deleted((params, model_state)):
        raise ValueError("evaluate: the params passed in were donated to a train step or fit "
                         "call, so their buffers are deleted; evaluate the params of the state "
                         "that call returned")
    totals: dict[str, Any] = {}
    count = 0
    extra = () if model_state is None else (model_state,)
    mesh = None  # a Loader reading this process's rows: into the global batch, as fit's
    if getattr(data, "process_count", 1) > 1:  # feed does
        mesh = _processes_mesh(params)
        _check_process_split(mesh, data, "evaluate")
    for batch in epoch_batches(data, 0, "evaluate"):
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        n = _batch_size(batch)
        for k, v in eval_step(params, batch, *extra).items():
            v = jnp.asarray(v)  # summed in float32 at least: float16 sums overflow
            if v.ndim:  # a hand-written eval_step's (make_eval_step refuses it)
                raise ValueError(f"evaluate: eval_step's metric {k!r} must be a scalar (a "
                                 f"mean over the batch), got shape {tuple(v.shape)}")
            v = v.astype(jnp.promote_types(v.dtype, jnp.float32))
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    if count == 0:
        raise ValueError("evaluate: eval data yielded no batches")
    return {k: float(v) / count for k, v in jax.device_get(totals).items()}


def _processes_mesh(params: Params) -> Any:
    """The mesh of params placed across several processes, else ``None``. A process's rows
    passed as they are would be taken for the global batch, so each process would
    evaluate its own rows as if they were all."""
    if jax.process_count() == 1:
        return None
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not sharding.is_fully_addressable:
            return sharding.mesh
    return None


# ----------------------------------------------------------------------------- fit


def fit(state: TrainState, train_step: StepFn, train_data: Data, *, epochs: int = 1,
        eval_step: Callable[..., Metrics] | None = None, eval_data: Data = None,
        eval_every: int | None = None,
        eval_params: Callable[[TrainState], Params] | None = None,
        callbacks: Sequence[Any] = (), log_every: int = 50, progress: bool = True,
        desc: str = "train", checkpoint_dir: Any = None, checkpoint_every: int | None = None,
        keep_last: int | None = 3, resume: bool | str = False, overwrite: bool = False,
        steps_per_call: int | None = None, device_data: bool | None = None,
        check_data: bool = False, num_classes: int | None = None,
        max_consecutive_skips: int = 100) -> tuple[TrainState, History]:
    """Train for ``epochs`` passes over ``train_data``, evaluating as it goes.

    Steps run ``steps_per_call`` at a time in one device call (``lax.scan``), metrics reach
    the host only at logging points, and a ``Loader``'s in-memory dataset is served from
    the device, so ``fit`` outpaces a hand-written per-batch loop (``bench/fit.py``).

    Args:
      state: the ``TrainState`` to train (donated: use the returned one).
      train_step: from ``make_train_step``. Its compiled chunks are cached, so another
        ``fit`` call with the same step and shapes compiles nothing.
      train_data: a ``Loader`` (``.epoch(e)`` yields batches), a callable
        ``epoch -> batches``, or a re-iterable such as a list.
      epochs: passes of *this call*: calling ``fit`` again continues the training, at the
        data position of ``state.step`` when the data has a ``len()``. Without one, each
        call numbers its epochs from 0 again (a callable gets ``0, 1, ...`` again, so its
        shuffles repeat unless it keeps its own count).
      eval_step, eval_data: from ``make_eval_step``, and the data ``evaluate`` runs it on,
        after every epoch and at the end of the call (also where it ends mid-epoch, or a
        callback stops it).
      eval_every: evaluate every this many steps (and at the end of the call) instead of
        after every epoch.
      eval_params: the params to evaluate, from the state, instead of ``state.params``:
        ``optim.ema_params`` for an ``optim.ema`` optimizer, or
        ``optim.schedule_free_eval_params`` for ``schedule_free_adamw``.
      callbacks: objects with any of ``on_step``, ``on_eval``, ``on_epoch_end``,
        ``on_checkpoint``, ``close``, ``state_dict``/``load_state_dict`` (see
        ``train.callbacks``: JSONL/CSV/TensorBoard loggers, ``EarlyStopping``).
      log_every: steps between host syncs for metrics, callbacks and the progress bar.
        Metrics already computed are taken without waiting; callbacks, the non-finite
        guard and a stop a callback asks for follow the dispatched steps by at most
        ``log_every`` steps plus one device call (``steps_per_call`` steps).
      progress: show a ``tqdm.auto`` bar (a widget in notebooks).
      desc: the bar's label.
      checkpoint_dir: save the whole ``TrainState`` there (``train.checkpoint``, atomic)
        after every epoch's evaluation (or every ``checkpoint_every`` steps), at the end,
        and on Ctrl-C, keeping the ``keep_last`` newest. A checkpoint holds the run's
        evaluations and callback states too, so a resume is exact.
      resume: continue the run saved in ``checkpoint_dir`` (``state`` is then only the
        template it is restored into; an empty folder starts afresh). ``epochs`` count from
        the step where the saved call started, so rerunning a script with ``resume=True``
        finishes it, and a finished run returns its history without training. With
        ``"rederive"``, data of another length is accepted and the position re-derived as
        ``divmod(step, steps_per_epoch)``.
      overwrite: delete the checkpoints of another run found in ``checkpoint_dir``
        (without it, they are an error).
      steps_per_call: steps per device call. By default, with device-resident data, a whole
        epoch (at most 2048 steps, cut at ``checkpoint_every``/``eval_every``), so one
        function compiles and Python dispatches once per epoch; for other data one step a
        call, each batch prefetched (stacking batches costs host memory). On CPU a step
        that convolves also runs one per call, with no loop around it: XLA:CPU runs
        convolutions inside a loop up to 15x slower. Results do not depend on it beyond float
        reassociation; a resume should keep it.
      device_data: serve a ``Loader``'s dataset from the device (default: when it takes at
        most a quarter of the device memory twice, 4 GiB twice on CPU).
      check_data: the checked mode: batches (a device-resident dataset: all of it, once)
        are checked on the host before use (``data.check_batch``: shared leading dimension,
        no NaN/inf, and with ``num_classes`` integer labels ``batch["y"]`` in range).
      max_consecutive_skips: with ``make_train_step(skip_nonfinite=True)`` (or a loss
        scale), this many skipped steps in a row stop the run with an error that names
        the cause.

    Returns:
      ``(state, history)``. On Ctrl-C the loop stops at the next chunk boundary, saves a
      checkpoint (with ``checkpoint_dir``) and returns, with ``history.interrupted``; a
      second Ctrl-C stops at once, and saves unless it came while callbacks were receiving
      results (the checkpoint would not match their logs). On
      any other exception, the last state is on the exception as ``err.state`` (and the
      history as ``err.history``).

    Raises:
      FloatingPointError: a step's loss, gradients or updated params are not finite (the
        guard's stop mode; nothing non-finite is ever checkpointed), or too many steps in a
        row were skipped.
      ValueError: a batch held integer labels outside ``[0, classes)`` (reported by
        ``classifier_loss`` as ``invalid_labels``), named with its step.
    """
    steps_per_epoch = _check_arguments(locals())
    cuts = tuple(c for c in (checkpoint_every, eval_every) if c)
    on_device = device_data if device_data is not None else fits_on_device(train_data)
    # A smaller last batch runs on its own: scans cover the full batches
    scanned = full_batches(train_data) or steps_per_epoch
    k = steps_per_call or (auto_steps_per_call(scanned, cuts) if on_device
                           and not convolves_on_cpu(train_step, state, train_data) else 1)
    feed = (DeviceFeed(train_data, train_step, k, cuts) if on_device else
            HostFeed(train_data, train_step, k, cuts, steps_per_epoch, state))
    if check_data:
        feed.check(num_classes)
    history = History()
    checkpoints = (RunCheckpoints(checkpoint_dir, keep_last,
                                  _data_basis(train_data, steps_per_epoch))
                   if checkpoint_dir is not None else None)

    # Where this call starts and ends: a resume continues the saved call's plan.
    run_start, saved = int(state.step), None
    if checkpoints is not None:
        state, saved = checkpoints.begin(state, resume=resume, overwrite=overwrite)
        if saved is not None:
            run_start = saved["run_start"]
            history.resumed_from = int(state.step)
            history.eval = list(saved["eval"])
            _load_callback_states(callbacks, saved["callbacks"])
    first = int(state.step)
    if first and steps_per_epoch is None and saved is not None:
        raise ValueError(f"fit: resuming at step {first} needs train_data with a len() (a "
                         f"Loader) to find the data position")
    end = None if steps_per_epoch is None else run_start + epochs * steps_per_epoch
    if saved is not None and (saved["stopped"] or end is not None and first >= end):
        history.stop_reason = saved["stopped"]  # a finished run: nothing left to train
        return state, history

    for cb in callbacks:
        if hasattr(cb, "stop_training"):
            cb.stop_training = False
    bar = (ProgressBar(None if end is None else end - run_start, first - run_start, desc)
           if progress else None)
    hooks = [*callbacks, *([bar] if bar else [])]
    pending, guard = _Pending(), _Guard(max_consecutive_skips,
                                        saved["skip_streak"] if saved else 0)
    started = time.perf_counter()
    step, last_eval, last = first, None, None  # last: the last chunk run
    delivering: list[bool] = []  # non-empty while callbacks receive results

    def run_info(stopped: str | None = None) -> dict[str, Any]:
        return {"run_start": run_start, "eval": history.eval, "stopped": stopped,
                "callbacks": _callback_states(callbacks), "skip_streak": guard.streak}

    def record(ready_only: bool = False) -> None:
        """Bring pending metrics to the host, check and log them; with ``ready_only`` those
        computed already, and older ones only past ``log_every`` steps of lag."""
        taken = pending.take(pending.ready(log_every) if ready_only else None)
        if taken is not None:
            delivering.append(True)  # a hard interrupt in here: the logs miss these rows
            _record(history, *taken, guard, hooks, bar, checkpoints)
            delivering.pop()

    def run_eval(epoch: int) -> None:
        record()
        params = state.params if eval_params is None else eval_params(state)
        assert eval_step is not None  # run_eval is called only with one
        delivering.append(True)
        result = evaluate(eval_step, params, eval_data, state.model_state)
        if {"epoch", "step"} & set(result):  # a hand-written eval_step's
            raise ValueError(f"fit: eval_step returned metrics named "
                             f"{sorted({'epoch', 'step'} & set(result))}, the names History "
                             f"gives the epoch and step; rename them")
        history.eval.append({"epoch": epoch, "step": step, **result})
        _call(hooks, "on_eval", step, result)
        delivering.pop()

    def save(stopped: str | None = None) -> None:
        record()  # the guard checks every pending step first: nothing non-finite is saved
        if checkpoints is not None and checkpoints.last_saved != step:
            _check_finite_params(state, step, checkpoints.last_saved)
            path = checkpoints.save(state, step, run_info(stopped))
            _call(hooks, "on_checkpoint", step, path)

    try:
        with _Interrupts() as interrupts:
            for chunk, batches in feed.chunks(first, end, epochs):
                if bar is not None and (last is None or chunk.epoch != last.epoch):
                    # this call's epochs, counted from its first step (a call that starts
                    # mid-epoch spans one data epoch more); without a len(), each call
                    # numbers its epochs from 0
                    bar.set_epoch((chunk.first - run_start) // steps_per_epoch
                                  if steps_per_epoch else chunk.epoch, epochs)
                compiling = _compile_seconds()
                state, metrics, stacked = feed.run(state, chunk, batches)
                if bar is not None:
                    bar.exclude_time(_compile_seconds() - compiling)
                step, last = chunk.first + chunk.size, chunk
                pending.add(chunk.first, chunk.size, metrics, stacked)
                if pending.count >= log_every:
                    record(ready_only=True)
                if eval_step is not None and (eval_every is None and chunk.epoch_end or
                                              eval_every and step % eval_every == 0):
                    run_eval(chunk.epoch)
                    last_eval = step
                if chunk.epoch_end and any(hasattr(h, "on_epoch_end") for h in hooks):
                    # the epoch's on_step calls first (a host sync, so only for a listener)
                    record()
                    delivering.append(True)
                    _call(hooks, "on_epoch_end", chunk.epoch, state)
                    delivering.pop()
                stop = _stop_reason(callbacks) or interrupts.reason
                # The last step's checkpoint, and a stopped run's, is saved after the loop,
                # with the final evaluation
                if checkpoints is not None and step != end and not stop and (
                        step % checkpoint_every == 0 if checkpoint_every else chunk.epoch_end):
                    save()
                if stop:
                    history.stop_reason = stop
                    history.interrupted = interrupts.reason is not None
                    break
            record()
            if history.stop_reason is None and _stop_reason(callbacks):  # asked at the end
                history.stop_reason = _stop_reason(callbacks)
            # The final state is evaluated, also where a call (or a callback's stop) ends
            # mid-epoch. Interrupted after its last step, the run is finished: a resume
            # trains nothing more, so the final evaluation is now or never.
            if (eval_step is not None and last is not None
                    and last_eval != step and (not history.interrupted or step == end)):
                run_eval(last.epoch)
                if history.stop_reason is None:  # EarlyStopping, on this last evaluation
                    history.stop_reason = _stop_reason(callbacks)
            save(None if history.interrupted else history.stop_reason)
    except KeyboardInterrupt:  # a second Ctrl-C, or one raised by a callback
        if not _alive(state):
            raise
        history.interrupted = True
        history.stop_reason = f"interrupted (KeyboardInterrupt) at step {step}"
        try:
            if delivering:  # callbacks got part of it: the last checkpoint matches the logs
                if checkpoints is not None:
                    at = checkpoints.last_saved
                    where = f"the last checkpoint (step {at})" if at else "scratch"
                    print(f"fit: interrupted while handing results to the callbacks: not "
                          f"saved, so a resume starts from {where}, as the logs do",
                          file=sys.stderr)
            else:
                save()
        except Exception as err:  # noqa: BLE001 - report, but still hand back the state
            print(f"fit: could not save the interrupted run: {err}", file=sys.stderr)
    except BaseException as err:
        _attach(err, state, history)
        raise
    finally:
        for hook in hooks:
            if hasattr(hook, "close"):
                hook.close()
        history.seconds = time.perf_counter() - started
    return state, history


# ----------------------------------------------------------------------------- arguments


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    check_int("fit", name, value, optional=optional)


def _check_arguments(args: dict[str, Any]) -> int | None:
    """Validate ``fit``'s arguments once; returns the batches per epoch (``None`` if the
    data has no ``len()``)."""
    _positive_int("epochs", args["epochs"])
    _positive_int("log_every", args["log_every"])
    _positive_int("max_consecutive_skips", args["max_consecutive_skips"])
    for name in ("steps_per_call", "checkpoint_every", "eval_every"):
        _positive_int(name, args[name], optional=True)
    if not isinstance(args["state"], TrainState):
        raise TypeError(f"fit: state must be a TrainState (TrainState.create(params, "
                        f"optimizer, key)), got {type(args['state']).__name__}")
    if (args["eval_step"] is None) != (args["eval_data"] is None):
        raise ValueError(f"fit: pass eval_step and eval_data together (got only "
                         f"{'eval_step' if args['eval_data'] is None else 'eval_data'})")
    if args["eval_step"] is None and any(isinstance(cb, EarlyStopping)
                                         for cb in args["callbacks"]):
        raise ValueError("fit: EarlyStopping acts on evaluations, but fit has no eval_step "
                         "and eval_data, so it would never stop the run; pass both")
    if args["checkpoint_dir"] is None and (args["resume"] or args["checkpoint_every"]
                                           or args["overwrite"]):
        raise ValueError("fit: resume, overwrite and checkpoint_every need checkpoint_dir")
    if args["resume"] not in (True, False, "rederive"):
        raise ValueError(f"fit: resume must be True, False or 'rederive', got "
                         f"{args['resume']!r}")
    if args["device_data"] and not isinstance(args["train_data"], Loader):
        raise TypeError("fit: device_data=True needs train_data to be a Loader over an "
                        "in-memory ArrayDataset")
    data = args["train_data"]
    if isinstance(data, Mapping) or isinstance(data, tuple) and data and \
            all(hasattr(a, "shape") for a in data):
        raise TypeError(f"fit: train_data is a single batch ({type(data).__name__} of "
                        f"arrays); pass batches: a Loader (data.ArrayDataset(**arrays)"
                        f".batches(32, key=...)), a list of batches ([batch]), or a callable "
                        f"epoch -> batches")
    if _is_deleted(args["state"]):
        raise donated_state_error("fit")
    if args["epochs"] > 1 and isinstance(data, Iterator):
        raise TypeError(f"fit: train_data is a one-shot iterator, but epochs="
                        f"{args['epochs']} needs a new pass each epoch; pass a Loader, a "
                        f"list, or a callable epoch -> batches")
    if isinstance(args["eval_data"], Iterator) and args["eval_step"] is not None and (
            args["epochs"] > 1 or args["eval_every"]):
        raise TypeError("fit: eval_data is a one-shot iterator, but it is evaluated more than "
                        "once (after each epoch, or every eval_every steps); pass a Loader, a "
                        "list, or a callable epoch -> batches")
    try:
        steps = len(data)
    except TypeError:
        return None
    if steps == 0:
        raise ValueError("fit: train_data yielded no batches in epoch 0 (its len() is 0)")
    return steps


def _data_basis(data: Data, steps_per_epoch: int | None) -> dict[str, Any]:
    """What the data position depends on, kept in checkpoints to check a resume against."""
    dataset = getattr(data, "dataset", None)
    key = data.key if isinstance(data, Loader) else None  # it decides each epoch's order
    if key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {"steps_per_epoch": steps_per_epoch,
            "batch_size": getattr(data, "batch_size", None),
            "examples": len(dataset) if dataset is not None else None,
            "shuffle": None if key is None else np.asarray(key).ravel().tolist()}


# ----------------------------------------------------------------------------- metrics


class _Pending:
    """Step metrics still on the device; their host copies start as soon as they exist.

    A chunk's metrics come as a list of dicts, either stacked over its steps (scanned
    calls) or one dict per step."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, list[Metrics], bool]] = []
        self.count = 0

    def add(self, first: int, size: int, metrics: list[Metrics], stacked: bool) -> None:
        for m in metrics:
            for v in m.values():
                if hasattr(v, "copy_to_host_async"):
                    v.copy_to_host_async()
        self.items.append((first, size, metrics, stacked))
        self.count += size

    def ready(self, lag: int) -> int:
        """How many of the oldest chunks to take now: those with all their metrics computed
        (no waiting), and then older chunks until fewer than ``lag`` steps stay pending
        behind the newest chunk (waiting for them), so callbacks, the guard and a stop
        follow the dispatched steps by at most ``lag`` steps plus one device call."""
        done = 0
        for _, _, metrics, _ in self.items:
            if not all(getattr(v, "is_ready", lambda: True)() for m in metrics
                       for v in m.values()):
                break
            done += 1
        behind, forced = self.count - (self.items[-1][1] if self.items else 0), 0
        while forced < len(self.items) - 1 and behind >= lag:
            behind -= self.items[forced][1]
            forced += 1
        return max(done, forced)

    def take(self, chunks: int | None = None
             ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """The oldest ``chunks`` (default: all) as (global steps after each update, metrics
        as arrays over those steps), or ``None`` when there is nothing to take."""
        items = self.items if chunks is None else self.items[:chunks]
        if not items:
            return None
        host = jax.device_get([ms for _, _, ms, _ in items])
        steps = np.concatenate([np.arange(first + 1, first + size + 1)
                                for first, size, _, _ in items])
        names = list(host[0][0])
        out = {k: np.concatenate([np.asarray(m[k]) if stacked else np.asarray(m[k])[None]
                                  for (_, _, _, stacked), ms in zip(items, host, strict=True)
                                  for m in ms]) for k in names}
        self.items = self.items[len(items):]
        self.count -= len(steps)
        return steps, out


_NONFINITE_CAUSES = {1: "the loss", 2: "the gradients", 4: "the updated params"}


def _causes(bits: int) -> str:
    return " and ".join(name for bit, name in _NONFINITE_CAUSES.items() if bits & bit)


class _Guard:
    """The non-finite guard on the host: in stop mode any non-finite step is an error; in
    skip mode (the step skipped it on the device) ``limit`` skips in a row are."""

    def __init__(self, limit: int, streak: int = 0) -> None:
        self.limit, self.streak = limit, int(streak)

    def check(self, steps: np.ndarray, metrics: dict[str, np.ndarray], last_saved: Any
              ) -> None:
        nonfinite = metrics.get("nonfinite")
        if nonfinite is None:  # a step not from make_train_step: look at what it reports
            nonfinite = np.zeros(len(steps), np.int32)
            for key, bit in (("loss", 1), ("grad_norm", 2)):
                if key in metrics:
                    nonfinite |= np.where(np.isfinite(metrics[key]), 0, bit).astype(np.int32)
        skipped = metrics.get("skipped", np.zeros(len(steps), np.int32))
        saved = f"; the last checkpoint (step {last_saved}) is intact" if last_saved else ""
        labels = metrics.get("invalid_labels", np.zeros(len(steps), np.int32))
        for i in np.flatnonzero((labels != 0) & (skipped == 0)):
            raise _at(i, ValueError(
                f"fit: step {steps[i]}: {int(labels[i])} integer label(s) of the batch lie "
                f"outside [0, classes), the classes being the logits' last axis; their "
                f"cross-entropy is NaN{saved}. Check the labels: fit(check_data=True, "
                f"num_classes=...) names the batch"))
        for i in np.flatnonzero((nonfinite != 0) & (skipped == 0)):
            values = ", ".join(f"{k} {float(metrics[k][i]):.6g}" for k in ("loss", "grad_norm")
                               if k in metrics)
            raise _at(i, FloatingPointError(
                f"fit: step {steps[i]}: {_causes(int(nonfinite[i]))} "
                f"{'is' if nonfinite[i] == 1 else 'are'} not finite ({values}){saved}. Lower "
                f"the learning rate or check the data, or pass skip_nonfinite=True to "
                f"make_train_step to skip such steps"))
        if not skipped.any():
            self.streak = 0
            return
        for j, s in enumerate(skipped):
            self.streak = self.streak + 1 if s else 0
            if self.streak >= self.limit:
                raise _at(j + 1, FloatingPointError(
                    f"fit: {self.streak} steps in a row were skipped as non-finite (steps "
                    f"{steps[j] - self.streak + 1} to {steps[j]}), the last because "
                    f"{_causes(int(nonfinite[j])) or 'its values'} were not finite: the run "
                    f"is not learning{saved}. Lower the learning rate or check the data "
                    f"(max_consecutive_skips={self.limit})"))


def _at(good: Any, err: Exception) -> Exception:
    """``err``, marked with how many of the checked steps came before the bad one."""
    err.good_steps = int(good)  # type: ignore[attr-defined]
    return err


_all_finite = jax.jit(all_finite)


def _check_finite_params(state: TrainState, step: int, last_saved: int | None) -> None:
    """Before a checkpoint: the params and model state must be finite (in stop mode the
    step tests loss and gradients only; an update can still overflow)."""
    tree = {"params": state.params, "model_state": state.model_state}
    if bool(_all_finite(tree)):
        return
    bad = [keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(unfuse(tree))[0]
           if not bool(all_finite(jax.device_get(leaf)))]  # fused: the leaves, not buffers
    saved = f"; the last checkpoint (step {last_saved}) is intact" if last_saved else ""
    raise FloatingPointError(
        f"fit: step {step}: the updated params are not finite ({', '.join(bad[:4])}), so "
        f"they were not checkpointed{saved}. The update overflowed: lower the learning "
        f"rate, or pass skip_nonfinite=True to make_train_step to skip such steps")


def _record(history: History, steps: np.ndarray, metrics: dict[str, np.ndarray],
            guard: _Guard, hooks: list[Any], bar: ProgressBar | None,
            checkpoints: RunCheckpoints | None) -> None:
    """Check the steps, add them to the history, and hand them to the callbacks (on an
    error, the steps before the bad one: the loss curve that led to it)."""
    try:
        guard.check(steps, metrics, checkpoints.last_saved if checkpoints else None)
    except (ValueError, FloatingPointError) as err:
        good = getattr(err, "good_steps", 0)
        if good:
            _deliver(history, steps[:good], {k: v[:good] for k, v in metrics.items()},
                     hooks, bar)
        raise
    _deliver(history, steps, metrics, hooks, bar)


def _deliver(history: History, steps: np.ndarray, metrics: dict[str, np.ndarray],
             hooks: list[Any], bar: ProgressBar | None) -> None:
    for name in ("nonfinite", "invalid_labels"):  # the guard's input, not training metrics
        metrics.pop(name, None)
    if "step" in metrics:  # a hand-written step's (make_train_step refuses it)
        raise ValueError("fit: the train step returned a metric named 'step', the name "
                         "History and the loggers give the step number; rename it")
    history.train["step"].extend(steps.tolist())
    columns = {k: v.tolist() for k, v in metrics.items()}
    for k, v in columns.items():
        history.train.setdefault(k, []).extend(v)
    if bar is not None:
        bar.advance(len(steps), metrics)
    receivers = [h.on_step for h in hooks if hasattr(h, "on_step")]
    if receivers:
        for i, step in enumerate(steps.tolist()):
            row = {k: v[i] for k, v in columns.items()}
            for on_step in receivers:
                on_step(step, row)


# ----------------------------------------------------------------------------- callbacks


def _call(hooks: list[Any], name: str, *args: Any) -> None:
    for hook in hooks:
        fn = getattr(hook, name, None)
        if fn is not None:
            fn(*args)


def _stop_reason(callbacks: Sequence[Any]) -> str | None:
    for cb in callbacks:
        if getattr(cb, "stop_training", False):
            return getattr(cb, "stop_reason", None) or f"{type(cb).__name__} stopped training"
    return None


def _callback_states(callbacks: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"class": type(cb).__name__, "state": cb.state_dict()}
            for cb in callbacks if hasattr(cb, "state_dict")]


def _load_callback_states(callbacks: Sequence[Any], saved: list[dict[str, Any]]) -> None:
    """Give each callback the state saved for the callback of its class at its position
    among those of that class; callbacks the checkpoint does not know start fresh."""
    by_class: dict[str, list[Any]] = {}
    for entry in saved:
        by_class.setdefault(entry["class"], []).append(entry["state"])
    seen: dict[str, int] = {}
    for cb in callbacks:
        if not hasattr(cb, "load_state_dict"):
            continue
        name = type(cb).__name__
        index = seen[name] = seen.get(name, -1) + 1
        if index < len(by_class.get(name, [])):
            cb.load_state_dict(by_class[name][index])


# ----------------------------------------------------------------------------- interrupts


class _Interrupts:
    """Within ``fit``: the first Ctrl-C asks the loop to stop at the next chunk boundary
    (``reason`` is set); a second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupted (Ctrl-C)"
        print("\nfit: stopping at the next step boundary (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self) -> _Interrupts:
        self._installed = False
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except ValueError:  # signals unavailable here (e.g. some embedded interpreters)
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)


def _alive(state: Any) -> bool:
    """Whether no buffer of ``state`` was donated to a call that did not return."""
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def _attach(err: BaseException, state: Any, history: History) -> None:
    """Put the last good state on an exception leaving ``fit``, so no work is lost."""
    if not _alive(state):
        return
    try:
        err.state, err.history = state, history  # type: ignore[attr-defined]
        err.add_note(f"fit: the state after step {int(state.step)} is err.state (the history "
                     f"so far is err.history)")
    except (AttributeError, TypeError):  # exceptions that take no attributes
        pass


_COMPILE_SECONDS = [0.0]


def _on_jax_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event.startswith("/jax/core/compile/"):
        _COMPILE_SECONDS[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


def _compile_seconds() -> float:
    """Seconds JAX has spent tracing, lowering and compiling in this process."""
    return _COMPILE_SECONDS[0]
