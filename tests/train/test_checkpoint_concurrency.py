"""Checkpoints shared by several processes: readers, two writers, kills during overwrite,
and the start-up recovery of what a killed writer left behind.

Children import funtrain once (about a second each): a child saves many times in a loop,
and the overwrite kills fork their writers from one child that imported it already.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from funtrain.train import checkpoint
from funtrain.train.checkpoint import CheckpointError, CheckpointManager

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs fork, SIGKILL and pids")


def _child(script, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _expect(proc, line):
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        raise AssertionError(f"child said {got!r}, expected {line!r}; stderr:\n"
                             f"{proc.stderr.read()}")


def _dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- readers

_SAVER = """
    import sys
    import numpy as np
    from funtrain.train.checkpoint import CheckpointManager

    manager = CheckpointManager(sys.argv[1])
    print("ready", flush=True)
    for step in range(20):
        try:
            manager.save({"w": np.full((256, 1024), step, np.float32)}, step)
            print("ok", step, flush=True)
        except Exception as e:
            print("failed", step, type(e).__name__, e, flush=True)
"""


def test_a_reader_opening_the_folder_never_breaks_a_writers_saves(tmp_path):
    d = tmp_path / "ck"
    writer = _child(_SAVER, d)
    _expect(writer, "ready")
    opened = 0
    while writer.poll() is None:  # open the folder as often as we can while it saves
        CheckpointManager(d).latest_step()
        opened += 1
    results = writer.stdout.read().splitlines()
    assert writer.returncode == 0, writer.stderr.read()
    ok = sum(line.startswith("ok") for line in results)
    print(f"reader opened the folder {opened} times; writer saves completed: {ok}/20")
    assert results == [f"ok {s}" for s in range(20)]
    assert checkpoint.all_steps(d) == list(range(20))
    for s in range(20):
        assert (checkpoint.restore(d, step=s)["w"] == s).all()
    assert _leftovers(d) == []


# ----------------------------------------------------------------------------- two writers

_PRUNER = """
    import json, sys
    import numpy as np
    from funtrain.train.checkpoint import CheckpointError, CheckpointManager

    manager = CheckpointManager(sys.argv[1], keep_last=2)
    first = int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()  # both start together
    out = []
    for step in [*range(first, 40, 2), *range(100, 130)]:  # disjoint steps, then the same
        try:
            manager.save({"w": np.full(4096, step, np.int32)}, step, metadata={"by": first})
            out.append(["ok", step, ""])
        except CheckpointError as e:
            out.append(["CheckpointError", step, str(e)])
        except Exception as e:
            out.append([type(e).__name__, step, str(e)])
    print(json.dumps(out), flush=True)
"""


def test_two_writers_with_keep_last_raise_no_raw_errors(tmp_path):
    d = tmp_path / "ck"
    writers = [_child(_PRUNER, d, first) for first in (0, 1)]
    for w in writers:
        _expect(w, "ready")
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    results = []
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0, err
        results += json.loads(out)
    raw = [r for r in results if r[0] not in ("ok", "CheckpointError")]
    assert raw == []
    refused = [r for r in results if r[0] == "CheckpointError"]
    lost_race = sum("another writer" in r[2] for r in refused)
    print(f"saves: {len(results)}, refused: {len(refused)} ({lost_race} lost the rename race)")
    for _, step, message in refused:
        assert step >= 100  # only the shared steps collide
        assert re.search(rf"step_{step:08d} already exists|another writer saved step {step} "
                         rf"in .* first", message), message
    steps = checkpoint.all_steps(d)
    assert steps and steps[-1] == 129
    for s in steps:
        assert (checkpoint.restore(d, step=s)["w"] == s).all()
    assert _leftovers(d) == []


# ----------------------------------------------------------------------------- overwrite kills

# One child imports funtrain once and forks a writer per kill; the test kills the writer,
# the child reaps it (so its pid is dead, not a zombie) and says so. The writer sleeps a
# little between its two renames, so that some kills land there.
_FORKER = """
    import os, sys, time
    import numpy as np
    from funtrain.train import checkpoint
    from funtrain.train.checkpoint import save

    move_aside = checkpoint._move_aside

    def slow_move_aside(*args):
        aside = move_aside(*args)
        time.sleep(0.003)
        return aside

    checkpoint._move_aside = slow_move_aside
    if sys.argv[2] == "renames":  # the two-rename path of systems without an atomic exchange
        checkpoint._RENAMEAT2 = None

    def state(i):
        return {"a": np.full(2000, i, np.int64), "b": {"c": np.full((3, 7), i, np.float32)}}

    print("ready", flush=True)
    for line in sys.stdin:
        base = int(line)
        pid = os.fork()
        if pid == 0:
            i = base
            while True:
                save(sys.argv[1], state(i), 5, metadata={"i": i}, overwrite=True)
                if i == base:
                    print("writing", os.getpid(), flush=True)
                i += 1
        sys.stdin.readline()
        os.waitpid(pid, 0)
        print("reaped", flush=True)
"""


@pytest.mark.parametrize("mode", ["exchange", "renames"])
def test_kills_during_overwrite_leave_a_restorable_step(tmp_path, mode):
    if mode == "exchange" and checkpoint._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    d, kills = tmp_path / "ck", 30
    rng = random.Random(5)
    forker = _child(_FORKER, d, mode)
    _expect(forker, "ready")
    in_window = 0
    try:
        for trial in range(kills):
            base = trial * 1_000_000
            forker.stdin.write(f"{base}\n")
            forker.stdin.flush()
            line = forker.stdout.readline().split()
            assert line[0] == "writing", forker.stderr.read()
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(int(line[1]), signal.SIGKILL)
            forker.stdin.write("reap\n")
            forker.stdin.flush()
            _expect(forker, "reaped")
            names = {p.name for p in d.iterdir()}
            in_window += "step_00000005" not in names  # killed between two renames
            CheckpointManager(d)
            restored = checkpoint.restore(d, step=5)
            i = int(restored["a"][0])
            assert base <= i < base + 1_000_000  # this trial's first save, or a later one
            assert (restored["a"] == i).all() and (restored["b"]["c"] == i).all()
            assert checkpoint.read_manifest(d, 5)["metadata"] == {"i": i}
            assert _leftovers(d) == []  # the dead writer's folders are gone
    finally:
        forker.kill()
        forker.wait()
    print(f"{mode}: {kills} kills during overwrite=True, {in_window} with step 5 absent; "
          f"step 5 restored after every one")
    if mode == "exchange":
        assert in_window == 0  # the swap is atomic: the step is never absent



# ----------------------------------------------------------------------------- recovery


def _owned(d, kind, step, pid, rand="0123abcd", host=None):
    host = checkpoint._HOST if host is None else host
    return Path(d) / f".{kind}_step_{step:08d}_{host}_{pid}_{rand}"


def test_the_manager_puts_back_an_interrupted_overwrite(tmp_path):
    d = tmp_path
    checkpoint.save(d, {"w": np.arange(3)}, 5, metadata="old")
    checkpoint.save(d, {"w": np.arange(4)}, 7)
    dead = _dead_pid()
    # a writer killed between its two renames: the old copy aside, no step_00000005, and
    # (killed earlier) a half-written new copy
    os.rename(checkpoint.step_dir(d, 5), _owned(d, "old", 5, dead))
    _owned(d, "tmp", 5, dead, "89abcdef").mkdir()
    (_owned(d, "tmp", 5, dead, "89abcdef") / "arrays.npz").write_bytes(b"PK\x03")
    assert checkpoint.all_steps(d) == [7]
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5: .* its previous copy "
                                              r"is aside .* from an overwrite in progress or "
                                              r"interrupted: .* CheckpointManager"):
        checkpoint.restore(d, step=5)
    CheckpointManager(d)
    assert checkpoint.all_steps(d) == [5, 7]
    np.testing.assert_array_equal(checkpoint.restore(d, step=5)["w"], np.arange(3))
    assert checkpoint.read_manifest(d, 5)["metadata"] == "old"
    assert _leftovers(d) == []


def test_an_old_copy_is_dropped_when_the_new_one_is_in_place(tmp_path):
    d = tmp_path
    checkpoint.save(d, {"w": np.arange(3)}, 5)
    checkpoint.save(d, {"w": np.arange(9)}, 6)
    # killed after the second rename, before deleting the old copy
    os.rename(checkpoint.step_dir(d, 6), _owned(d, "old", 5, _dead_pid()))
    CheckpointManager(d)
    assert checkpoint.all_steps(d) == [5]
    np.testing.assert_array_equal(checkpoint.restore(d, step=5)["w"], np.arange(3))
    assert _leftovers(d) == []


def test_only_stale_leftovers_are_removed(tmp_path):
    d = tmp_path
    checkpoint.save(d, {"w": np.arange(3)}, 1)
    mine = os.getpid()
    day = checkpoint.STALE_AGE_S
    keep = [
        _owned(d, "tmp", 2, mine),  # a live writer's save (this process)
        _owned(d, "old", 9, mine),  # a live writer's overwrite in flight (step 9 absent)
        _owned(d, "tmp", 3, 1, host="other-host"),  # another host's, recent
        d / ".tmp_step_00000004_123_abcd",  # an older funtrain's name, recent
        d / ".other",  # not ours
    ]
    stale = [
        _owned(d, "tmp", 5, _dead_pid()),
        _owned(d, "tmp_delete", 6, _dead_pid()),
        _owned(d, "tmp", 7, 1, host="other-host"),  # older than STALE_AGE_S
        d / ".tmp_step_00000008_123_abcd",
    ]
    for p in keep + stale:
        p.mkdir()
        (p / "arrays.npz").write_bytes(b"x")
    for p in stale[2:]:
        os.utime(p, (time.time() - day - 60,) * 2)
    CheckpointManager(d)
    assert _leftovers(d) == sorted(p.name for p in keep)
    assert checkpoint.all_steps(d) == [1]  # the live writer's old copy of 9 is not put back


def test_temp_names_carry_their_owner(tmp_path):
    name = checkpoint._owned_name(tmp_path, "tmp", 12).name
    m = checkpoint._OWNED_RE.fullmatch(name)
    assert m and m["kind"] == "tmp" and int(m["step"]) == 12
    assert m["host"] == checkpoint._HOST and int(m["pid"]) == os.getpid()
    assert checkpoint._OWNED_RE.fullmatch(
        checkpoint._owned_name(tmp_path, "tmp_delete", 3).name)["kind"] == "tmp_delete"


def test_removing_what_another_process_removed_is_a_no_op(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"w": np.arange(3)}, 1)
    folder = checkpoint.step_dir(tmp_path, 1)
    checkpoint._remove(folder, 1)
    checkpoint._remove(folder, 1)
    assert list(tmp_path.iterdir()) == []
    # the manager's pruning tolerates a step that vanished after it listed them
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save({"w": np.arange(3)}, 2)
    real = checkpoint.all_steps
    monkeypatch.setattr(checkpoint, "all_steps", lambda d: [1, *real(d)])  # 1 is gone
    m.save({"w": np.arange(3)}, 3)
    monkeypatch.undo()
    assert m.all_steps() == [3]


def test_the_same_step_saved_twice_at_once_is_a_clear_error(tmp_path, monkeypatch):
    # the other writer's rename lands between our existence check and our rename
    real_publish = checkpoint._publish

    def other_writer_first(tmp, final, step, overwrite):
        monkeypatch.setattr(checkpoint, "_publish", real_publish)
        checkpoint.save(tmp_path, {"w": np.zeros(2)}, step)
        real_publish(tmp, final, step, overwrite)

    monkeypatch.setattr(checkpoint, "_publish", other_writer_first)
    with pytest.raises(CheckpointError, match=r"another writer saved step 4 in .* first; this "
                                              r"save of it was discarded"):
        checkpoint.save(tmp_path, {"w": np.ones(2)}, 4)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=4)["w"], np.zeros(2))
    assert _leftovers(tmp_path) == []


def test_a_failed_overwrite_puts_the_old_copy_back(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_RENAMEAT2", None)  # the two-rename path
    checkpoint.save(tmp_path, {"w": np.arange(3)}, 5)
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise OSError(5, "Input/output error")  # the disk failed at the final rename
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint.save(tmp_path, {"w": np.arange(9)}, 5, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=5)["w"], np.arange(3))
    assert _leftovers(tmp_path) == []


def test_a_restore_overlapping_an_overwrite_reads_the_new_copy(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"w": np.arange(3)}, 5)
    load, calls = checkpoint._load_arrays, []

    def overwritten_meanwhile(folder, manifest):  # between the manifest and the arrays
        if not calls:
            checkpoint.save(tmp_path, {"w": np.arange(9)}, 5, overwrite=True)
        calls.append(folder)
        return load(folder, manifest)

    monkeypatch.setattr(checkpoint, "_load_arrays", overwritten_meanwhile)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=5)["w"], np.arange(9))
    assert len(calls) == 2  # read again, not reported as corruption


def test_a_restore_overlapping_a_prune_is_a_checkpoint_error(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"w": np.arange(3)}, 5)
    load = checkpoint._load_arrays

    def pruned_meanwhile(folder, manifest):
        checkpoint._remove(folder, 5)
        return load(folder, manifest)

    monkeypatch.setattr(checkpoint, "_load_arrays", pruned_meanwhile)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5"):
        checkpoint.restore(tmp_path, step=5)
