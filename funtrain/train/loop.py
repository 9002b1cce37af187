"""``fit``: epochs × batches with evaluation, a progress bar and a history."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from funtrain._typing import Batch, Params
from funtrain.data.checks import check_batch
from funtrain.train.state import TrainState
from funtrain.train.step import Metrics, StepFn, scan_steps

Data = Any  # a Loader (has .epoch(e)), a callable epoch -> iterable, or a re-iterable


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
      train: per-step metrics, ``train["loss"][i]`` is the loss of step ``i`` (also
        ``train["step"]``).
      eval: one dict per evaluation (each epoch), with ``epoch`` and ``step``.
      seconds: wall-clock time of the whole ``fit`` call, evaluation included.
    """

    train: dict[str, list[float]] = field(default_factory=dict)
    eval: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def _add_train(self, first_step: int, metrics: list[dict[str, Any]]) -> None:
        for i, m in enumerate(metrics):
            self.train.setdefault("step", []).append(first_step + i)
            for k, v in m.items():
                self.train.setdefault(k, []).append(float(v))


def _epoch_batches(data: Data, epoch: int, where: str) -> Iterator[Batch]:
    if hasattr(data, "epoch"):
        return iter(data.epoch(epoch))
    if callable(data):
        return iter(data(epoch))
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"{where}: expected a Loader, a callable epoch -> batches, or an "
                    f"iterable of batches, got {type(data).__name__}")


def _batch_size(batch: Batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise ValueError("evaluate: a batch needs at least one array with a leading "
                         "example axis")
    return int(np.shape(leaves[0])[0])


def evaluate(eval_step: Callable[..., Metrics], params: Params, data: Data,
             model_state: Any = None) -> dict[str, float]:
    """Mean of ``eval_step``'s metrics over ``data``, weighted by batch size (exact means).

    ``model_state`` (a stateful model's, e.g. ``state.model_state``) is passed to
    ``eval_step`` as its third argument.
    """
    totals: dict[str, Any] = {}
    count = 0
    extra = () if model_state is None else (model_state,)
    for batch in _epoch_batches(data, 0, "evaluate"):
        n = _batch_size(batch)
        for k, v in eval_step(params, batch, *extra).items():
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    if count == 0:
        raise ValueError("evaluate: eval data yielded no batches")
    return {k: float(v) / count for k, v in jax.device_get(totals).items()}


def _stack(batches: list[Batch]) -> Batch:
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _same_shapes(batches: list[Batch]) -> bool:
    shapes = [jax.tree.map(np.shape, b) for b in batches]
    return all(s == shapes[0] for s in shapes[1:])


def fit(state: TrainState, train_step: StepFn, train_data: Data, *, epochs: int = 1,
        eval_step: Callable[[Params, Batch], Metrics] | None = None, eval_data: Data = None,
        steps_per_call: int = 1, log_every: int = 50,
        log_fn: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True, desc: str = "train", checkpoint_dir: Any = None,
        checkpoint_every: int | None = None, keep_last: int | None = 3,
        resume: bool = False, callbacks: Sequence[Any] = (), check_data: bool = False,
        num_classes: int | None = None) -> tuple[TrainState, History]:
    """Train for ``epochs`` over ``train_data``, evaluating after each epoch.

    Metrics stay on the device between logging points: the host syncs only every
    ``log_every`` steps (and at epoch ends), never once per step.

    Args:
      state: the initial ``TrainState`` (donated to the step: use the returned one).
      train_step: from ``make_train_step``.
      train_data: a ``Loader`` (``.epoch(e)`` yields batches), a callable
        ``epoch -> batches``, or a re-iterable such as a list.
      epochs: passes over ``train_data``.
      eval_step, eval_data: from ``make_eval_step``, and the data it runs on after
        every epoch (``evaluate``).
      steps_per_call: run this many steps per device call with ``lax.scan``
        (``scan_steps``); the result is the same as one step per call.
      log_every: steps between host syncs for the progress bar and ``log_fn``.
      log_fn: called as ``log_fn(step, metrics)`` at each logging point, with the index
        of the last finished step (as in ``History.train["step"]``) and its metrics.
      progress: show a ``tqdm.auto`` bar (a widget in notebooks).
      desc: the bar's label.
      checkpoint_dir: save the whole ``TrainState`` there (``train.checkpoint``, atomic)
        every ``checkpoint_every`` steps and at the end, keeping the ``keep_last`` newest.
      callbacks: objects with any of ``on_step``, ``on_eval``, ``on_epoch_end``,
        ``on_checkpoint``, ``close`` (see ``train.callbacks``: JSONL/CSV/TensorBoard
        loggers, ``EarlyStopping``). Step metrics include ``steps_per_second``.
      check_data: the checked mode: every batch is checked on the host before it is sent
        (``data.check_batch``: shared leading dimension, no NaN/inf, and with
        ``num_classes`` integer labels ``batch["y"]`` in range). Costs a scan per batch.
      resume: continue from the latest checkpoint in ``checkpoint_dir`` (``state`` is then
        only the template it is restored into). The data position is derived from the
        step: epoch ``step // len(train_data)``, skipping the batches already seen, so with a
        ``Loader`` the resumed run's losses are bitwise those of an uninterrupted run.

    Returns:
      ``(state, history)``.
    """
    where = "fit"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{where}: epochs must be an int >= 1, got {epochs!r}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) \
            or steps_per_call < 1:
        raise ValueError(f"{where}: steps_per_call must be an int >= 1, got {steps_per_call!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"{where}: log_every must be an int >= 1, got {log_every!r}")
    if (eval_step is None) != (eval_data is None):
        raise ValueError(f"{where}: pass eval_step and eval_data together (got only "
                         f"{'eval_step' if eval_data is None else 'eval_data'})")
    if epochs > 1 and isinstance(train_data, Iterator):
        raise TypeError(f"{where}: train_data is a one-shot iterator, but epochs={epochs} "
                        f"needs a new pass each epoch; pass a Loader, a list, or a callable "
                        f"epoch -> batches")
    multi = scan_steps(train_step) if steps_per_call > 1 else None
    try:
        steps_per_epoch: int | None = len(train_data)
    except TypeError:
        steps_per_epoch = None
    total = epochs * steps_per_epoch if steps_per_epoch is not None else None

    manager = None
    if checkpoint_dir is not None:
        from funtrain.train.checkpoint import CheckpointManager

        manager = CheckpointManager(checkpoint_dir, keep_last=keep_last)
    elif resume or checkpoint_every:
        raise ValueError(f"{where}: resume and checkpoint_every need checkpoint_dir")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                         not isinstance(checkpoint_every, int) or
                                         checkpoint_every < 1):
        raise ValueError(f"{where}: checkpoint_every must be an int >= 1, got "
                         f"{checkpoint_every!r}")
    if resume and manager is not None and manager.latest_step() is not None:
        state = manager.restore(target=state)
    first_step = int(state.step)
    start_epoch, skip = 0, 0
    if first_step:
        if steps_per_epoch is None:
            raise ValueError(f"{where}: resuming at step {first_step} needs train_data with a "
                             f"len() (a Loader) to find the data position")
        start_epoch, skip = divmod(first_step, steps_per_epoch)
    last_saved = first_step
    bar = tqdm(total=total, initial=min(first_step, total or first_step), desc=desc,
               disable=not progress, unit="step", dynamic_ncols=True)
    history = History()
    # Metrics still on the device: (None, one step's dict) or (k, dict stacked over k steps).
    pending: list[tuple[int | None, Metrics]] = []
    first_pending = int(state.step)
    last_logged = first_pending
    postfix: dict[str, str] = {}
    start = time.perf_counter()

    def flush() -> None:
        nonlocal pending, first_pending
        if not pending:
            return
        # One transfer for everything pending; stacked (scanned) metrics are split on the host.
        host: list[dict[str, Any]] = []
        for count, metrics in jax.device_get(pending):
            if count is None:
                host.append(metrics)
            else:
                host.extend({k: v[i] for k, v in metrics.items()} for i in range(count))
        check_finite(first_pending, host)
        now = time.perf_counter()
        host[-1] = {**host[-1], "steps_per_second": len(host) / max(now - last_flush[0], 1e-9)}
        last_flush[0] = now
        history._add_train(first_pending, host)
        for i, m in enumerate(host):
            hook("on_step", first_pending + i, {k: float(v) for k, v in m.items()})
        first_pending += len(host)
        pending = []
        last = {k: float(v) for k, v in host[-1].items()}
        postfix.update({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "accuracy")})
        bar.set_postfix(postfix, refresh=False)
        if log_fn is not None:
            log_fn(first_pending - 1, last)  # the index of the step these metrics belong to

    last_flush = [time.perf_counter()]

    def hook(name: str, *args: Any) -> None:
        for cb in callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(*args)

    def check_finite(first: int, host: list[dict[str, Any]]) -> None:
        """The guard's stop mode: fail at the first non-finite step that was not skipped."""
        for i, m in enumerate(host):
            if int(m.get("skipped", 0)):
                continue
            bad = [k for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]
            if bad:
                where_ckpt = (f"; the last checkpoint (step {last_saved}) is intact"
                              if manager is not None and last_saved else "")
                raise FloatingPointError(
                    f"fit: step {first + i}: {bad[0]} is {float(m[bad[0]])} (not finite)"
                    f"{where_ckpt}. Pass skip_nonfinite=True to make_train_step to skip such "
                    f"steps instead")

    def pending_steps() -> int:
        return sum(1 if c is None else c for c, _ in pending)

    def run(group: list[Batch]) -> None:
        nonlocal state, last_logged
        # Only full groups go through the scan: a short remainder would compile it again.
        if multi is not None and len(group) == steps_per_call and _same_shapes(group):
            state, stacked = multi(state, _stack(group))
            pending.append((len(group), stacked))
        else:
            for batch in group:
                state, metrics = train_step(state, batch)
                pending.append((None, metrics))
        bar.update(len(group))
        done = first_pending + pending_steps()
        if done - last_logged >= log_every:
            last_logged = done
            flush()
        save_if_due()

    def save_if_due(final: bool = False) -> None:
        nonlocal last_saved
        if manager is None:
            return
        done = first_pending + pending_steps()
        due = checkpoint_every and done // checkpoint_every > last_saved // checkpoint_every
        if (due or final) and done != last_saved:
            flush()  # checks the pending steps: never checkpoint a non-finite state
            path = manager.save(state, done)
            hook("on_checkpoint", done, path)
            last_saved = done

    try:
        for epoch in range(start_epoch, epochs):
            bar.set_description(f"{desc} {epoch + 1}/{epochs}")
            group: list[Batch] = []
            seen = 0
            for i, batch in enumerate(_epoch_batches(train_data, epoch, where)):
                seen += 1
                if epoch == start_epoch and i < skip:
                    continue  # seen before the checkpoint we resumed from
                if check_data:
                    check_batch(batch, num_classes=num_classes,
                                where=f"fit: epoch {epoch} batch {i}")
                group.append(batch)
                if len(group) == steps_per_call:
                    run(group)
                    group = []
            if group:
                run(group)
            if seen == 0:
                raise ValueError(f"{where}: train_data yielded no batches in epoch {epoch}; "
                                 f"a generator is used up after one pass, so pass a Loader, "
                                 f"a list, or a callable epoch -> batches")
            flush()
            if eval_step is not None:
                result = evaluate(eval_step, state.params, eval_data, state.model_state)
                history.eval.append({"epoch": epoch, "step": int(state.step), **result})
                postfix.update({f"eval_{k}": f"{v:.4g}" for k, v in result.items()})
                bar.set_postfix(postfix, refresh=True)
                hook("on_eval", epoch, result)
            hook("on_epoch_end", epoch, state)
            if any(getattr(cb, "stop_training", False) for cb in callbacks):
                break
        flush()
        save_if_due(final=True)
    finally:
        bar.close()
        for cb in callbacks:
            if hasattr(cb, "close"):
                cb.close()
    history.train.setdefault("step", [])
    history.seconds = time.perf_counter() - start
    return state, history
