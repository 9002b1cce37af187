"""The demo command, run as a user would: in a subprocess. Bad flags, which the parser
rejects before anything runs, are checked in-process through ``cli.main``."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "funtrain", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_and_prints_accuracy():
    proc = run_cli("demo", "--epochs", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"test accuracy: (\d\.\d+)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) >= 0.9


def test_demo_flags():
    proc = run_cli("demo", "--epochs", "1", "--optimizer", "nesterov", "--lr", "0.02",
                   "--batch-size", "64", "--seed", "3", "--steps-per-call", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "nesterov lr=0.02" in proc.stdout and "batch 64" in proc.stdout


def cli_error(capsys, *args):
    """(exit code, stderr) of ``funtrain *args`` for arguments the parser rejects."""
    from funtrain import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    return exit_.value.code, capsys.readouterr().err


def test_demo_rejects_bad_flags(capsys):
    code, err = cli_error(capsys, "demo", "--batch-size", "0")
    assert code == 2
    assert "expected a positive integer, got 0" in err
    code, err = cli_error(capsys, "demo", "--optimizer", "adamm")
    assert code == 2 and "invalid choice: 'adamm'" in err
    code, err = cli_error(capsys, "demo", "--resume")
    assert code == 2 and "--resume needs --checkpoint-dir" in err


def test_ctrl_c_before_the_first_evaluation_says_how_to_resume(tmp_path, capsys,
                                                                  monkeypatch):
    """One Ctrl-C in the first epoch: the demo saves, says so and returns (it once indexed
    the empty list of evaluations). A --checkpoint-dir that is a file is an error before
    any training."""
    import os
    import signal

    from funtrain import cli, train

    class CtrlC:
        def on_step(self, step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: fit(*a, **{**k, "callbacks": [CtrlC()]}))
    args = ["demo", "--steps-per-call", "1", "--no-progress"]  # 44 steps an epoch
    assert cli.main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"interrupted at step \d+; continue with --resume", out), out
    assert "test accuracy" not in out
    (tmp_path / "file").write_text("")
    assert cli.main([*args, "--checkpoint-dir", str(tmp_path / "file")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(__import__("funtrain.cli").cli.DEMO_LR))
def test_every_optimizer_name_is_accepted_and_trains(name):
    """--optimizer takes every name; one step of the demo's model lowers the loss."""
    import jax
    import jax.numpy as jnp

    from funtrain import cli, nn, train

    args = cli.build_parser().parse_args(["demo", "--optimizer", name])
    opt = cli.make_optimizer(args)
    model = nn.mlp([32, 10])
    x = jax.random.normal(jax.random.key(0), (64, 16))
    y = jnp.arange(64) % 10
    state = train.TrainState.create(model.init(jax.random.key(1), x), opt, jax.random.key(2))
    step = train.make_train_step(train.classifier_loss(model), opt)
    losses = []
    for _ in range(5):
        state, m = step(state, {"x": x, "y": y})
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_demo_precision_meets_the_accuracy_bar(prec):
    proc = run_cli("demo", "--precision", prec, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    acc = float(re.search(r"test accuracy: (\d\.\d+)", proc.stdout).group(1))
    assert acc >= 0.95, proc.stdout
    if prec == "fp16":
        assert "loss scale" in proc.stdout and "skipped steps" in proc.stdout


@pytest.mark.slow  # over 10 s on 2 cores
def test_demo_checkpoints_and_resumes(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    from funtrain.train import checkpoint

    first = run_cli("demo", "--epochs", "1", "--checkpoint-dir", ckpt, "--no-progress")
    assert first.returncode == 0, first.stderr
    per_epoch = 1438 // 32  # digits train split, batch 32, drop_remainder
    assert checkpoint.latest_step(ckpt) == per_epoch
    second = run_cli("demo", "--epochs", "2", "--checkpoint-dir", ckpt, "--resume",
                     "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "test accuracy" in second.stdout
    assert checkpoint.latest_step(ckpt) == 2 * per_epoch
    # the same command again: the finished run is reported, not trained or crashed
    third = run_cli("demo", "--epochs", "2", "--checkpoint-dir", ckpt, "--resume",
                    "--no-progress")
    assert third.returncode == 0, third.stderr
    assert "had finished at step 88" in third.stdout and "test accuracy" in third.stdout


@pytest.mark.slow
def test_demo_cnn_meets_the_accuracy_bar():
    """The first CNN trains: pooling is differentiable under jit (issue 9's first bug)."""
    proc = run_cli("demo", "--model", "cnn", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    acc = float(re.search(r"test accuracy: (\d\.\d+)", proc.stdout).group(1))
    assert acc >= 0.95, proc.stdout


@pytest.mark.slow  # over 10 s on 2 cores
def test_demo_resnet_trains_batch_norm_and_checkpoints_its_state(tmp_path):
    """A ResNet with BatchNorm from the command line: its model state is checkpointed."""
    from funtrain.train import checkpoint

    ckpt = str(tmp_path / "ckpt")
    proc = run_cli("demo", "--model", "resnet", "--epochs", "1", "--checkpoint-dir", ckpt,
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "resnet (176,258 params)" in proc.stdout
    acc = float(re.search(r"test accuracy: (\d\.\d+)", proc.stdout).group(1))
    assert acc >= 0.5, proc.stdout
    paths = [leaf["path"] for leaf in checkpoint.read_manifest(ckpt)["leaves"]]
    assert any("model_state" in p and p.endswith("bn1/count") for p in paths), paths[:20]
