"""The demo command, run as a user would: in a subprocess."""

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


def test_demo_rejects_bad_flags():
    proc = run_cli("demo", "--batch-size", "0")
    assert proc.returncode == 2
    assert "expected a positive integer, got 0" in proc.stderr
    proc = run_cli("demo", "--optimizer", "adamm")
    assert proc.returncode == 2 and "invalid choice: 'adamm'" in proc.stderr
