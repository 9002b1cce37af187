"""The demo command. One test runs it as a user does, ``python -m funtrain demo`` in a
subprocess, which covers the entry point and the exit code. The others call ``cli.main``
with the same arguments in this process: the same parsing and training, without paying
again for a fresh interpreter, jax's import and the data load (~2.5 s of CPU each)."""

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


def demo(capsys, *args):
    """(exit code, stdout) of ``funtrain demo *args --no-progress``, run in this process."""
    from funtrain import cli

    code = cli.main(["demo", *args, "--no-progress"])
    return code, capsys.readouterr().out


def test_demo_flags(capsys):
    code, out = demo(capsys, "--epochs", "1", "--optimizer", "nesterov", "--lr", "0.02",
                     "--batch-size", "64", "--seed", "3", "--steps-per-call", "4")
    assert code == 0, out
    assert "nesterov lr=0.02" in out and "batch 64" in out


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
    # values only the optimizer or the data can check: usage errors too, not tracebacks
    code, err = cli_error(capsys, "demo", "--momentum", "-1")
    assert code == 2 and "momentum must be >= 0.0, got -1" in err
    code, err = cli_error(capsys, "demo", "--lr", "inf")
    assert code == 2 and "expected a positive finite number, got inf" in err
    code, err = cli_error(capsys, "demo", "--seed", str(2 ** 64))  # was an OverflowError
    assert code == 2 and f"expected an integer in [-2**63, 2**63), got {2 ** 64}" in err
    code, err = cli_error(capsys, "demo", "--epochs", "abc")
    assert code == 2 and "expected a positive integer, got abc" in err
    code, err = cli_error(capsys, "demo", "--batch-size", "5000", "--no-progress")
    assert code == 2 and "batch_size" in err and "5000" in err
    assert err.startswith("usage: funtrain demo [-h]")  # the demo's usage, as argparse's own


def test_ctrl_c_before_the_first_evaluation_says_how_to_resume(tmp_path, capsys,
                                                                  monkeypatch):
    """One Ctrl-C in the first epoch: the demo saves, says so and exits 130 (it once indexed
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
    assert cli.main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 130  # as Ctrl-C
    out = capsys.readouterr().out
    assert re.search(r"interrupted at step \d+; continue with --resume", out), out
    assert "test accuracy" not in out
    # the same folder without --resume: fit's error, and the demo's flags for it
    assert cli.main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 1
    assert "the demo has --resume to continue the run" in capsys.readouterr().err
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
def test_demo_precision_meets_the_accuracy_bar(prec, capsys):
    code, out = demo(capsys, "--precision", prec)
    assert code == 0, out
    acc = float(re.search(r"test accuracy: (\d\.\d+)", out).group(1))
    assert acc >= 0.95, out
    if prec == "fp16":
        assert "loss scale" in out and "skipped steps" in out


@pytest.mark.slow  # over 10 s on 2 cores
def test_demo_checkpoints_and_resumes(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    from funtrain.train import checkpoint

    code, out = demo(capsys, "--epochs", "1", "--checkpoint-dir", ckpt)
    assert code == 0, out
    per_epoch = 1438 // 32  # digits train split, batch 32, drop_remainder
    assert checkpoint.latest_step(ckpt) == per_epoch
    code, out = demo(capsys, "--epochs", "2", "--checkpoint-dir", ckpt, "--resume")
    assert code == 0, out
    assert "test accuracy" in out
    assert checkpoint.latest_step(ckpt) == 2 * per_epoch
    # the same command again: the finished run is reported, not trained or crashed
    code, out = demo(capsys, "--epochs", "2", "--checkpoint-dir", ckpt, "--resume")
    assert code == 0, out
    assert "had finished at step 88" in out and "test accuracy" in out


@pytest.mark.slow
def test_demo_cnn_meets_the_accuracy_bar(capsys):
    """The first CNN trains: pooling is differentiable under jit (issue 9's first bug)."""
    code, out = demo(capsys, "--model", "cnn")
    assert code == 0, out
    acc = float(re.search(r"test accuracy: (\d\.\d+)", out).group(1))
    assert acc >= 0.95, out


@pytest.mark.slow  # over 10 s on 2 cores
def test_demo_resnet_trains_batch_norm_and_checkpoints_its_state(tmp_path, capsys):
    """A ResNet with BatchNorm from the command line: its model state is checkpointed."""
    from funtrain.train import checkpoint

    ckpt = str(tmp_path / "ckpt")
    code, out = demo(capsys, "--model", "resnet", "--epochs", "1", "--checkpoint-dir", ckpt)
    assert code == 0, out
    assert "resnet (176,258 params)" in out
    acc = float(re.search(r"test accuracy: (\d\.\d+)", out).group(1))
    assert acc >= 0.5, out
    paths = [leaf["path"] for leaf in checkpoint.read_manifest(ckpt)["leaves"]]
    assert any("model_state" in p and p.endswith("bn1/count") for p in paths), paths[:20]
