"""Callbacks and metric loggers for ``fit``.

A callback is any object with some of these methods (all optional):

- ``on_step(step, metrics)``: for every step, called in batches at ``fit``'s logging points
  (so there is no host sync per step). ``step`` is the global step *after* the update
  (``state.step``), ``metrics`` are floats;
- ``on_eval(step, metrics)``: after each evaluation, at the same global step as the train
  metrics of the last step before it (so TensorBoard overlays them);
- ``on_epoch_end(epoch, state)``: ``state`` is donated to the next step, so a callback
  that keeps it (best-so-far params) keeps a copy: ``jax.tree.map(jnp.copy, state.params)``
  or ``jax.device_get(state.params)``;
- ``on_checkpoint(step, path)``: after a checkpoint is safely on disk;
- ``close()``: at the end of every ``fit`` call that starts training, also on error (not
  after a refused argument, nor when a resumed run had already finished);
- ``state_dict()`` / ``load_state_dict(d)``: JSON-able state, saved in every checkpoint and
  restored on resume, so a resumed run behaves as an uninterrupted one.

A callback stops training by setting ``stop_training = True``, and says why in
``stop_reason`` (``EarlyStopping`` does); ``fit`` resets ``stop_training`` when it starts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from funtrain._checks import check_int


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__array__") and not isinstance(value, (list, tuple)):
        value = np.asarray(value).tolist()  # numpy, or jax arrays from a hand-written loop
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them readable
    if isinstance(value, (list, tuple)):  # vector metrics
        return [_jsonable(v) for v in value]
    return value


class _AppendFile:
    """A text file written through ``fit`` runs: opened lazily, truncated on first write
    unless appending, and rewound to a checkpoint's size on resume (so every line is
    written exactly once, however often the run was killed and resumed)."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path, self.append = path, append
        self._file: io.TextIOWrapper | None = None

    def write(self, text: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if self.append else "w", encoding="utf-8",
                                        newline="")
            self.append = True  # later reopenings (a second fit call) continue the file
        self._file.write(text)

    def size(self) -> int:
        """Flush to disk (fsync) and return the file's size: the state a checkpoint keeps.
        A file this run has not written yet, and will truncate, counts as empty (an older
        run's lines there are not this run's)."""
        if self._file is None and not self.append:
            return 0
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return self.path.stat().st_size if self.path.exists() else 0

    def rewind(self, size: int, owner: str) -> None:
        """Cut the file back to ``size`` bytes (the lines written after the checkpoint)."""
        self.close()
        have = self.path.stat().st_size if self.path.exists() else 0
        if have < size:
            warnings.warn(f"{owner}: {self.path} has {have} bytes, fewer than the {size} it had "
                          f"at the checkpoint; appending to it as it is", stacklevel=3)
        elif self.path.exists():
            with self.path.open("r+b") as f:
                f.truncate(size)
        self.append = True

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JsonlLogger:
    """One JSON object per line: ``{"step": 12, "loss": ...}`` and
    ``{"step": 60, "eval": {...}}``.

    Args:
      path: the file.
      append: keep what the file holds and append; by default a new run starts it afresh.
        A resumed run always continues it, from its size at the checkpoint.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self._out = _AppendFile(self.path, append)

    def _write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, **metrics})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, "eval": {k: _jsonable(v) for k, v in metrics.items()}})
        self._out.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self._out.size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._out.rewind(int(state["bytes"]), "JsonlLogger")

    def close(self) -> None:
        self._out.close()


class CsvLogger:
    """Per-step metrics as CSV rows, columns ``step`` and the first step's metrics (a
    metric that appears later is not written, with a warning; a vector metric is written
    as its list).

    Evaluations go to a sibling file ``<name>_eval.csv`` (columns ``step`` and the metrics).
    ``append`` as for ``JsonlLogger``.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.eval_path = self.path.with_name(self.path.stem + "_eval.csv")
        self._out = {p: _AppendFile(p, append) for p in (self.path, self.eval_path)}
        self._fields: dict[Path, list[str]] = {}
        self._dropped: set[str] = set()  # keys warned about once

    def _row(self, path: Path, row: dict[str, Any]) -> None:
        if not self._fields:  # the run's first row: start both files (a new run's train
            for out in self._out.values():  # file once sat beside an older run's evals)
                out.write("")
        text = io.StringIO()
        if path not in self._fields:
            self._fields[path] = list(row)
            if not self._out[path].append or self._out[path].size() == 0:
                csv.writer(text).writerow(self._fields[path])
        dropped = set(row) - set(self._fields[path]) - self._dropped
        if dropped:  # e.g. a second fit call whose step adds learning_rate
            self._dropped |= dropped
            warnings.warn(f"CsvLogger: {path.name} has the columns {self._fields[path]} (its "
                          f"first row's); {sorted(dropped)} are not written (JsonlLogger "
                          f"keeps every key)", stacklevel=3)
        csv.DictWriter(text, fieldnames=self._fields[path], extrasaction="ignore",
                       restval="").writerow(row)
        self._out[path].write(text.getvalue())

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._row(self.path, {"step": step, **metrics})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._row(self.eval_path, {"step": step, **metrics})
        self._out[self.eval_path].flush()

    def state_dict(self) -> dict[str, Any]:
        return {p.name: {"bytes": out.size(), "fields": self._fields.get(p)}
                for p, out in self._out.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, out in self._out.items():
            saved = state.get(p.name, {"bytes": 0, "fields": None})
            out.rewind(int(saved["bytes"]), "CsvLogger")
            if saved["fields"] is not None:
                self._fields[p] = list(saved["fields"])
            else:
                self._fields.pop(p, None)

    def close(self) -> None:
        for out in self._out.values():
            out.close()


class TensorBoardLogger:
    """Scalars for TensorBoard, through ``tensorboardX`` (or ``torch.utils.tensorboard``).

    Train and eval metrics use the same global step, so their curves overlay. A vector
    metric (e.g. per class) gets one curve per entry, ``train/{name}/{i}``. Each writer
    opens its own event file (loggers sharing a logdir never overwrite each other's), and
    a resumed run purges the points a crashed run logged after its checkpoint
    (TensorBoard's ``purge_step``), so no step is drawn twice.
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TensorBoardLogger needs tensorboardX (or torch with "
                                  "tensorboard); install it with: pip install tensorboardX"
                                  ) from err
        self._make, self._logdir = SummaryWriter, str(logdir)
        self._writer: Any = None
        self._last: int | None = None  # the last step written
        self._purge: int | None = None  # set by a resume, for the next writer
        # A bad logdir fails here; the event file opens at the first write (after a
        # resume's load_state_dict, so it carries the purge).
        os.makedirs(self._logdir, exist_ok=True)
        if not os.access(self._logdir, os.W_OK):
            raise PermissionError(f"TensorBoardLogger: cannot write to {self._logdir}")

    @property
    def writer(self) -> Any:
        """The open ``SummaryWriter``; after ``close`` a new one opens, into a new file."""
        if self._writer is None:
            # Event file names have whole seconds only, so a writer opened in the same
            # second (a reopen, another logger) would truncate a file; the suffix keeps
            # the creation order, in which TensorBoard reads (and purges) them.
            kw = {} if self._purge is None else {"purge_step": self._purge}
            self._writer = self._make(
                self._logdir, filename_suffix=f".{time.time_ns():020d}.{os.getpid()}", **kw)
            self._purge = None
        return self._writer

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume: TensorBoard drops this run's points after the checkpoint's last step
        (a crashed run logged them; the resumed run logs them again)."""
        if state.get("step") is not None:
            self.close()
            self._purge = int(state["step"]) + 1

    def _add(self, prefix: str, step: int, metrics: dict[str, Any]) -> None:
        self._last = int(step) if self._last is None else max(self._last, int(step))
        for k, v in metrics.items():
            values = np.asarray(v, np.float64)
            if values.ndim == 0:
                self.writer.add_scalar(f"{prefix}/{k}", float(values), step)
            else:  # a vector metric (e.g. per class): one curve per entry
                for i, x in enumerate(values.ravel()):
                    self.writer.add_scalar(f"{prefix}/{k}/{i}", float(x), step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._add("train", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add("eval", step, metrics)

    def close(self) -> None:
        # Closed, not only flushed: a notebook that makes a logger per run keeps no open
        # event files or writer threads.
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class EarlyStopping:
    """Stop ``fit`` when an evaluation metric stops improving.

    Its counters are saved with every checkpoint and restored on resume.

    Args:
      monitor: an eval metric name (e.g. ``"loss"``, ``"accuracy"``).
      mode: ``"min"`` or ``"max"``.
      patience: evaluations without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.

    After it stops, ``stop_reason`` says why (``fit`` copies it to ``History.stop_reason``).
    Calling ``fit`` again then gives it ``patience`` evaluations again, measured against
    the best so far; a ``fit`` call per epoch, with no stop between, keeps one count.
    """

    def __init__(self, monitor: str = "loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        check_int("EarlyStopping", "patience", patience)
        if not min_delta >= 0:  # a negative one would count a worse value as better
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stop_training = False
        self.stop_reason: str | None = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(f"EarlyStopping: monitored metric {self.monitor!r} is not among "
                             f"the eval metrics {sorted(metrics)}")
        value = metrics[self.monitor]
        if self.bad_evals >= self.patience:  # it stopped, and fit was called again
            self.bad_evals = 0
        # A NaN is never better; a NaN best comes only from a checkpoint of an older
        # version, and any number beats it (NaN compares False)
        better = not math.isnan(value) and (
            self.best is None or math.isnan(self.best) or
            (value < self.best - self.min_delta if self.mode == "min"
             else value > self.best + self.min_delta))
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stop_training = True
            best = "no finite value yet" if self.best is None else \
                f"best {self.best:.6g} at step {self.best_step}"
            self.stop_reason = (f"EarlyStopping: eval {self.monitor} did not improve for "
                                f"{self.bad_evals} evaluations ({best}, mode {self.mode!r}, "
                                f"min_delta {self.min_delta:g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals = int(state["bad_evals"])


def _tqdm() -> Any:
    """``tqdm.auto`` (a widget in Jupyter) where ipywidgets is installed; the text bar
    otherwise, so Jupyter without ipywidgets shows a bar instead of tqdm's "IProgress not
    found" warning (install ``funtrain[notebook]`` for the widget)."""
    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
        return tqdm
    from tqdm.auto import tqdm
    return tqdm


class ProgressBar:
    """``fit``'s progress bar (``tqdm.auto``: a widget in notebooks with ipywidgets).

    It shows the running means of ``loss`` and ``accuracy`` since its last refresh (not one
    step's noisy values), the last evaluation, and an ETA that leaves compile time out.
    """

    SHOWN = ("loss", "accuracy")

    def __init__(self, total: int | None, initial: int, desc: str) -> None:
        self.desc = desc
        self.bar = _tqdm()(total=total, initial=initial, desc=desc, unit="step",
                           dynamic_ncols=True)
        self._postfix: dict[str, str] = {}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        # _str: tqdm adds the ": " itself (set_description's own gave "train 1/2: : 5it")
        self.bar.set_description_str(f"{self.desc} {epoch + 1}/{epochs}", refresh=False)

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (a compile) out of the elapsed time the rate and ETA use."""
        if seconds and hasattr(self.bar, "start_t"):  # a disabled bar has no clock
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def advance(self, steps: int, metrics: dict[str, Any]) -> None:
        """Move by ``steps`` and show the means of their ``metrics`` (arrays over them)."""
        self._postfix.update({k: f"{float(np.mean(metrics[k])):.4g}" for k in self.SHOWN
                              if k in metrics})
        self.bar.set_postfix(self._postfix, refresh=False)
        self.bar.update(steps)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._postfix.update({f"eval_{k}": f"{v:.4g}" for k, v in metrics.items()
                              if k in self.SHOWN})
        self.bar.set_postfix(self._postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()
