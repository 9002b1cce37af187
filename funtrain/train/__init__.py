"""Training: ``TrainState``, pure train/eval steps, and the ``fit`` loop."""

from funtrain.train import callbacks, checkpoint
from funtrain.train.callbacks import CsvLogger, EarlyStopping, JsonlLogger, TensorBoardLogger
from funtrain.train.checkpoint import CheckpointError, CheckpointManager
from funtrain.train.loop import History, evaluate, fit
from funtrain.train.state import TrainState
from funtrain.train.step import (
    Metrics,
    classifier_eval,
    classifier_loss,
    make_eval_step,
    make_train_step,
    scan_steps,
)

__all__ = ["callbacks", "CsvLogger", "EarlyStopping", "JsonlLogger", "TensorBoardLogger",
           "checkpoint", "CheckpointManager", "CheckpointError", "TrainState",
           "make_train_step", "make_eval_step", "scan_steps", "fit", "evaluate", "History",
           "Metrics", "classifier_loss", "classifier_eval"]
