"""Callbacks and metric loggers for ``fit``.

A callback is any object with some of these methods (all optional):

- ``on_step(step, metrics)``: for every step, called in batches at ``fit``'s logging points
  (so there is no host sync per step); ``metrics`` are floats;
- ``on_eval(epoch, metrics)``: after each evaluation;
- ``on_epoch_end(epoch, state)``;
- ``on_checkpoint(step, path)``: after a checkpoint is safely on disk;
- ``close()``: at the end of ``fit``, also on error.

A callback stops training by setting ``stop_training = True`` (``EarlyStopping`` does).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them readable
    return value


class JsonlLogger:
    """One JSON object per line: ``{"step": 12, "loss": ...}``, ``{"epoch": 0, "eval": {...}}``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, **metrics})

    def on_eval(self, epoch: int, metrics: dict[str, float]) -> None:
        self._write({"epoch": epoch, "eval": {k: _jsonable(v) for k, v in metrics.items()}})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvLogger:
    """Per-step metrics as CSV rows; the columns are those of the first step (plus ``step``).

    Evaluations go to a sibling file ``<name>_eval.csv``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._files: dict[Path, Any] = {}
        self._writers: dict[Path, csv.DictWriter] = {}

    def _row(self, path: Path, row: dict[str, Any]) -> None:
        if path not in self._writers:
            f = path.open("w", newline="", encoding="utf-8")
            self._files[path] = f
            self._writers[path] = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore",
                                                 restval="")
            self._writers[path].writeheader()
        self._writers[path].writerow(row)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._row(self.path, {"step": step, **metrics})

    def on_eval(self, epoch: int, metrics: dict[str, float]) -> None:
        self._row(self.path.with_name(self.path.stem + "_eval.csv"), {"epoch": epoch, **metrics})

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class TensorBoardLogger:
    """Scalars for TensorBoard, through ``tensorboardX`` (or ``torch.utils.tensorboard``)."""

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
        self.writer = SummaryWriter(str(logdir))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def on_eval(self, epoch: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"eval/{k}", v, epoch)

    def close(self) -> None:
        self.writer.close()


class EarlyStopping:
    """Stop ``fit`` when an evaluation metric stops improving.

    Args:
      monitor: an eval metric name (e.g. ``"loss"``, ``"accuracy"``).
      mode: ``"min"`` or ``"max"``.
      patience: evaluations without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.
    """

    def __init__(self, monitor: str = "loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping: patience must be an int >= 1, got {patience!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0
        self.stop_training = False

    def on_eval(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(f"EarlyStopping: monitored metric {self.monitor!r} is not among "
                             f"the eval metrics {sorted(metrics)}")
        value = metrics[self.monitor]
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.mode == "min"
                   else value > self.best + self.min_delta))
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            self.stop_training = self.bad_evals >= self.patience
