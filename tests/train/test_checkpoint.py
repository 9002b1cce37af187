"""Checkpoints: bitwise round trips, keep_last, corruption errors, and kill-safety."""

import enum
import hashlib
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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funtrain import optim, precision
from funtrain.train import TrainState, checkpoint
from funtrain.train.checkpoint import CheckpointError, CheckpointManager

ROOT = Path(__file__).resolve().parents[2]


def _params(dtype=jnp.float32, hidden=128, seed=0):
    # built in numpy and put on the device: eager jax ops compile per shape and dtype
    rng = np.random.default_rng(seed)
    return jax.tree.map(jnp.asarray, {
        "dense_0": {"w": rng.standard_normal((64, hidden)).astype(dtype),
                    "b": np.zeros((hidden,), dtype)},
        "dense_1": {"w": rng.standard_normal((hidden, 10)).astype(np.float32),
                    "b": np.arange(10, dtype=np.float32)},
    })


def _state(dtype=jnp.float32, hidden=128, seed=0):
    return TrainState.create(_params(dtype, hidden, seed), optim.adamw(), jax.random.key(seed),
                             loss_scale=precision.DynamicLossScale())


def _rewrite_manifest(folder, manifest):
    """Write an edited manifest with a valid checksum of its own (as a careful editor
    would), so only the other checks can catch the edit."""
    manifest["manifest_sha256"] = checkpoint._manifest_sha256(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if not hasattr(x, "dtype"):  # a Python scalar
            assert type(x) is type(y) and x == y
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_state_round_trip_is_bitwise(tmp_path, dtype):
    state = _state(dtype)
    # a non-trivial state: some steps taken, a scale that moved
    state = state._replace(step=jnp.asarray(7, jnp.int32),
                           loss_scale=state.loss_scale.adjust(jnp.asarray(False)),
                           rng=jax.random.fold_in(state.rng, 3))
    final = checkpoint.save(tmp_path, state, state.step, metadata={"epoch": 2})
    assert final == tmp_path / "step_00000007"
    assert sorted(p.name for p in final.iterdir()) == ["arrays.npz", "manifest.json"]
    restored = checkpoint.restore(tmp_path, target=_state(dtype, seed=1))
    assert isinstance(restored, TrainState)
    assert isinstance(restored.loss_scale, precision.DynamicLossScale)
    assert restored.params["dense_0"]["w"].dtype == dtype
    _assert_bitwise_equal(state, restored)
    assert float(restored.loss_scale.loss_scale) == 2.0 ** 14


def test_manifest_contents(tmp_path):
    state = _state(jnp.bfloat16)
    checkpoint.save(tmp_path, state, 3, metadata={"lr": 0.1, "note": "x"})
    m = checkpoint.read_manifest(tmp_path)
    assert m["step"] == 3 and m["metadata"] == {"lr": 0.1, "note": "x"}
    assert set(m) == {"format", "step", "metadata", "arrays_sha256", "arrays_bytes", "leaves",
                      "manifest_sha256"}
    assert m["format"] == checkpoint.FORMAT_VERSION == 2
    assert len(m["arrays_sha256"]) == 64
    # the documented rule: SHA-256 of the canonical JSON (sorted keys, no spaces) without it
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert m["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    by_path = {leaf["path"]: leaf for leaf in m["leaves"]}
    assert by_path["params/dense_0/w"]["dtype"] == "bfloat16"
    assert by_path["params/dense_0/w"]["stored_dtype"] == "uint16"
    assert by_path["params/dense_0/w"]["shape"] == [64, 128]
    assert by_path["rng"]["kind"] == "key" and by_path["rng"]["impl"] == "threefry2x32"
    assert "loss_scale/min_scale" in by_path
    assert all(len(leaf["sha256"]) == 64 for leaf in m["leaves"])
    assert [leaf["name"] for leaf in m["leaves"]] == [str(i) for i in range(len(m["leaves"]))]


def test_an_unknown_format_is_a_clear_error(tmp_path):
    """A later version's manifest (its checksum matches) names the version; a format field
    damaged in place (its checksum does not match) is damage, with the step to fall back to."""
    checkpoint.save(tmp_path, {"w": jnp.ones(2)}, 0)
    checkpoint.save(tmp_path, {"w": jnp.ones(2)}, 1)
    path = checkpoint.step_dir(tmp_path, 1) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    manifest["manifest_sha256"] = checkpoint._manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"has format 99; this funtrain reads "
                                                         r"formats 1, 2, 3\. It was written by "
                                                         r"another version of funtrain"):
        checkpoint.restore(tmp_path)
    manifest["format"] = 0  # one flipped bit of 2 (the checksum still says 99)
    path.write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 1 .* is damaged: manifest.json "
                                                         r"has format 0 and does not match its "
                                                         r"own checksum.*step=0"):
        checkpoint.restore(tmp_path)


def test_restore_without_target_gives_nested_dicts(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, state, 0)
    out = checkpoint.restore(tmp_path)
    assert set(out) == {"step", "params", "opt_state", "rng", "loss_scale", "skipped_steps"}
    np.testing.assert_array_equal(out["params"]["dense_0"]["w"], state.params["dense_0"]["w"])
    np.testing.assert_array_equal(out["opt_state"]["0"]["mu"]["dense_1"]["b"],
                                  state.opt_state[0].mu["dense_1"]["b"])
    assert set(out["loss_scale"]) == {"loss_scale", "counter", "period", "factor", "min_scale"}
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]),
                                  jax.random.key_data(state.rng))


def test_a_restored_state_runs_the_compiled_step_again(tmp_path):
    """inject_hyperparams keeps its values weakly typed (a learning rate must not promote
    bf16 updates); restored as strong float32 they made a jitted step compile again."""
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3)
    state = TrainState.create(_params(hidden=4), opt, jax.random.key(0))
    assert state.opt_state.hyperparams["learning_rate"].weak_type
    checkpoint.save(tmp_path, state, 0)
    restored = checkpoint.restore(tmp_path, state)
    weak = lambda tree: [jax.typeof(a).weak_type for a in jax.tree.leaves(tree)]  # noqa: E731
    assert weak(restored) == weak(state)
    step = jax.jit(lambda s: s._replace(step=s.step + 1))
    step(state)
    step(restored)
    assert step._cache_size() == 1


def test_exotic_leaves_round_trip(tmp_path):
    tree = {
        "f8": jnp.asarray([0.5, -2.0, 448.0], jnp.float8_e4m3fn),
        "i4": jnp.asarray([-8, 0, 7], jnp.int4),
        "np": np.arange(6, dtype=np.float64).reshape(2, 3),
        "bool": jnp.asarray([True, False]),
        "py": {"i": 3, "f": 0.25, "b": True},
        "none": None,
        "empty": jnp.zeros((0, 4)),
        "keys": jax.random.split(jax.random.key(1, impl="rbg"), 3),
        "raw_key": jax.random.PRNGKey(2),
        "list": [jnp.ones(2, jnp.float16), ()],
        # 0-d leaves of dtypes numpy stores as bytes (a bf16 temperature or scale)
        "scalars": [jnp.asarray(2.0, jnp.bfloat16), jnp.asarray(0.5, jnp.float8_e4m3fn),
                    jnp.asarray(-3, jnp.int4), np.asarray(1.5, jnp.bfloat16)],
    }
    checkpoint.save(tmp_path, tree, 1)
    restored = checkpoint.restore(tmp_path, target=tree)
    _assert_bitwise_equal(tree, restored)
    assert restored["py"] == {"i": 3, "f": 0.25, "b": True}
    assert type(restored["py"]["b"]) is bool
    assert isinstance(restored["np"], np.ndarray)
    assert restored["none"] is None
    assert [x.shape for x in restored["scalars"]] == [()] * 4
    assert checkpoint.restore(tmp_path)["scalars"]["0"].shape == ()  # no target either
    # shapes/dtypes from jax.eval_shape work as a target too
    abstract = jax.eval_shape(lambda: _state(jnp.bfloat16))
    checkpoint.save(tmp_path, _state(jnp.bfloat16), 2)
    _assert_bitwise_equal(checkpoint.restore(tmp_path, target=abstract, step=2),
                          _state(jnp.bfloat16))


def test_single_leaf_and_step_arguments(tmp_path):
    checkpoint.save(tmp_path, jnp.arange(3), np.int64(5))
    np.testing.assert_array_equal(checkpoint.restore(tmp_path), jnp.arange(3))
    with pytest.raises(TypeError, match="step must be a non-negative integer"):
        checkpoint.save(tmp_path, jnp.arange(3), -1)
    with pytest.raises(TypeError, match="step must be a non-negative integer"):
        checkpoint.save(tmp_path, jnp.arange(3), 1.5)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        checkpoint.save(tmp_path, jnp.arange(3), 5)
    checkpoint.save(tmp_path, jnp.arange(4), 5, overwrite=True)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path), jnp.arange(4))
    with pytest.raises(TypeError, match="metadata must be JSON-serializable"):
        checkpoint.save(tmp_path, jnp.arange(3), 6, metadata={"x": object()})
    with pytest.raises(TypeError, match="key path 'a': not an array"):
        checkpoint.save(tmp_path, {"a": "text"}, 7)
    # saved, these could never be restored (restore blamed the manifest)
    with pytest.raises(TypeError, match=r"key path 'a': a numpy array of dtype <U2 \(strings"):
        checkpoint.save(tmp_path, {"a": np.array(["ab"])}, 7)
    with pytest.raises(TypeError, match="key path 'a': a Python int outside the 64-bit range"):
        checkpoint.save(tmp_path, {"a": 2 ** 64}, 7)
    assert checkpoint.all_steps(tmp_path) == [5]  # failed saves left nothing behind
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    mode = enum.IntEnum("Mode", "TRAIN EVAL")  # a scalar subclass restores as its base type
    checkpoint.save(tmp_path / "enum", {"a": mode.EVAL}, 0)
    assert checkpoint.restore(tmp_path / "enum") == {"a": 2}


# ----------------------------------------------------------------------------- listing


def test_latest_step_ignores_temp_and_malformed(tmp_path):
    assert checkpoint.latest_step(tmp_path / "missing") is None
    assert checkpoint.latest_step(tmp_path) is None
    checkpoint.save(tmp_path, {"w": jnp.ones(2)}, 4)
    (tmp_path / ".tmp_step_00000009_123_abcd").mkdir()  # a save killed mid-way
    (tmp_path / ".tmp_step_00000009_123_abcd" / "manifest.json").write_text("{}")
    (tmp_path / ".old_step_00000010_host_1_0123abcd").mkdir()  # an overwrite's old copy
    (tmp_path / "step_12").mkdir()  # malformed name
    (tmp_path / "step_000000010").mkdir()  # not the name of step 10 (restore would not open it)
    (tmp_path / "step_00000012").write_text("a file, not a folder")
    (tmp_path / "notes.txt").write_text("hello")
    assert checkpoint.latest_step(tmp_path) == 4
    assert checkpoint.all_steps(tmp_path) == [4]
    np.testing.assert_array_equal(checkpoint.restore(tmp_path)["w"], jnp.ones(2))
    # a final folder is only made by renaming a complete one: without a manifest it is
    # damage, listed and an error, never skipped in favour of an older step
    (tmp_path / "step_00000008").mkdir()
    assert checkpoint.all_steps(tmp_path) == [4, 8]
    with pytest.raises(CheckpointError, match=r"checkpoint of step 8 in .* is damaged: "
                                              r"manifest.json is missing; restore another "
                                              r"step with step=4 or delete the folder"):
        checkpoint.restore(tmp_path)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=4)["w"], jnp.ones(2))
    with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
        checkpoint.restore(tmp_path, step=3)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.restore(tmp_path / "empty")


def test_manager_keep_last(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    for s in range(0, 60, 10):
        m.save({"w": jnp.full(3, s)}, s, metadata={"s": s})
        assert m.latest_step() == s
    assert m.all_steps() == [30, 40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000030", "step_00000040", "step_00000050"]
    np.testing.assert_array_equal(m.restore(step=40)["w"], jnp.full(3, 40))
    np.testing.assert_array_equal(m.restore()["w"], jnp.full(3, 50))
    assert m.read_manifest(30)["metadata"] == {"s": 30}
    # saving an older step (a resumed run) never deletes the one just written
    m.save({"w": jnp.zeros(3)}, 5)
    assert 5 in m.all_steps()
    # leftovers of a killed process are cleaned up by a new manager
    leftover = tmp_path / f".tmp_step_00000099_{checkpoint._HOST}_{_dead_pid()}_0123abcd"
    leftover.mkdir()
    CheckpointManager(tmp_path)
    assert not leftover.exists()
    with pytest.raises(ValueError, match="keep_last must be a positive int"):
        CheckpointManager(tmp_path, keep_last=0)


# ----------------------------------------------------------------------------- corruption


@pytest.fixture
def saved(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, state, 1)
    return tmp_path, tmp_path / "step_00000001"


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_a_checksum_error_naming_the_key_path(saved):
    d, folder = saved
    w = np.asarray(_state().params["dense_0"]["w"]).tobytes()
    offset = (folder / "arrays.npz").read_bytes().find(w)
    assert offset > 0
    _flip(folder / "arrays.npz", offset + len(w) // 2)
    with pytest.raises(CheckpointError, match=re.escape(
            "arrays.npz is corrupted (checksum mismatch): the arrays of key paths "
            "'params/dense_0/w' are damaged")):
        checkpoint.restore(d, target=_state())
    with pytest.raises(CheckpointError, match=r"checksum mismatch.*'params/dense_0/w'"):
        checkpoint.restore(d)


def test_flipped_byte_in_the_zip_structure_blames_the_file(saved):
    d, folder = saved
    data = (folder / "arrays.npz").read_bytes()
    _flip(folder / "arrays.npz", data.rfind(b"PK\x05\x06") + 20)  # the end record's comment size
    with pytest.raises(CheckpointError, match=r"arrays.npz is corrupted: its SHA-256 does not "
                                              r"match the manifest's \(checksum mismatch\), "
                                              r"and no single array can be blamed"):
        checkpoint.restore(d)


def test_flipped_byte_with_rewritten_file_checksum_names_key_path(saved):
    # someone "fixed" the file checksum: the per-array checksum still catches it
    d, folder = saved
    m = json.loads((folder / "manifest.json").read_text())
    leaf = next(x for x in m["leaves"] if x["path"] == "params/dense_0/w")
    state = _state()
    arr = np.array(state.params["dense_0"]["w"])
    arr[0, 0] += 1
    arrays = dict(np.load(folder / "arrays.npz"))
    arrays[leaf["name"]] = arr
    np.savez(folder / "arrays.npz", **arrays)
    m["arrays_sha256"] = checkpoint._sha256_file(folder / "arrays.npz")
    m["arrays_bytes"] = (folder / "arrays.npz").stat().st_size
    _rewrite_manifest(folder, m)
    with pytest.raises(CheckpointError,
                       match=r"key path 'params/dense_0/w': array is corrupted"):
        checkpoint.restore(d, target=state)


def test_truncated_arrays_file(saved):
    d, folder = saved
    data = (folder / "arrays.npz").read_bytes()
    (folder / "arrays.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"arrays.npz is truncated or corrupted: it has "
                                              r"\d+ bytes, the manifest expects \d+"):
        checkpoint.restore(d, target=_state())


def test_unreadable_npz_with_matching_checksum(saved):
    d, folder = saved
    (folder / "arrays.npz").write_bytes(b"not a zip file at all")
    m = json.loads((folder / "manifest.json").read_text())
    m["arrays_sha256"] = checkpoint._sha256_file(folder / "arrays.npz")
    m["arrays_bytes"] = (folder / "arrays.npz").stat().st_size
    _rewrite_manifest(folder, m)
    with pytest.raises(CheckpointError, match="arrays.npz is truncated or unreadable"):
        checkpoint.restore(d)


def test_missing_array(saved):
    d, folder = saved
    m = json.loads((folder / "manifest.json").read_text())
    arrays = dict(np.load(folder / "arrays.npz"))
    del arrays["2"]
    np.savez(folder / "arrays.npz", **arrays)
    m["arrays_sha256"] = checkpoint._sha256_file(folder / "arrays.npz")
    m["arrays_bytes"] = (folder / "arrays.npz").stat().st_size
    _rewrite_manifest(folder, m)
    with pytest.raises(CheckpointError, match=r"arrays.npz does not match its manifest: key "
                                              r"path 'params/dense_0/w': array '2' is missing"):
        checkpoint.restore(d)


def test_missing_and_malformed_manifest(saved):
    d, folder = saved
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint of step 1 in .* is damaged: "
                                              r"manifest.json is unreadable or malformed "
                                              r"\(JSONDecodeError: .*\); delete the folder"):
        checkpoint.restore(d, step=1)
    (folder / "manifest.json").unlink()
    assert checkpoint.latest_step(d) == 1  # listed: damage is an error, not a skipped step
    with pytest.raises(CheckpointError, match="step 1 .* is damaged: manifest.json is missing"):
        checkpoint.restore(d, step=1)
    with pytest.raises(CheckpointError, match="step 1 .* is damaged: manifest.json is missing"):
        checkpoint.restore(d)


def test_a_deleted_newest_manifest_is_an_error_not_a_fall_back(tmp_path):
    for s in (1, 2):
        checkpoint.save(tmp_path, {"w": jnp.full(2, s)}, s)
    (checkpoint.step_dir(tmp_path, 2) / "manifest.json").unlink()
    assert checkpoint.latest_step(tmp_path) == 2
    damaged = (r"checkpoint of step 2 in .* is damaged: manifest.json is missing; restore "
               r"another step with step=1 or delete the folder .*step_00000002")
    with pytest.raises(CheckpointError, match=damaged):
        checkpoint.restore(tmp_path)
    with pytest.raises(CheckpointError, match=damaged):
        checkpoint.read_manifest(tmp_path)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=1)["w"], jnp.full(2, 1))
    # fit's resume says so too, rather than resuming from step 1
    runs = checkpoint.RunCheckpoints(tmp_path, None, {"steps_per_epoch": 1})
    with pytest.raises(CheckpointError, match=r"fit: cannot resume from .*: " + damaged):
        runs.begin(_state(), resume=True, overwrite=False)


def _edit(folder, edit, *, format_1=False):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    if format_1:  # an older funtrain's manifest: no checksum of its own
        m["format"] = 1
        del m["manifest_sha256"]
    (folder / "manifest.json").write_text(json.dumps(m))


def _set_dtype(path, dtype):
    def edit(m):
        next(x for x in m["leaves"] if x["path"] == path)["dtype"] = dtype
    return edit


def _drop_leaf(path):
    def edit(m):
        m["leaves"] = [x for x in m["leaves"] if x["path"] != path]
    return edit


def test_an_edited_manifest_fails_its_own_checksum(saved):
    d, folder = saved
    original = (folder / "manifest.json").read_text()
    for edit in (_set_dtype("params/dense_0/w", "int32"), _drop_leaf("params/dense_0/w")):
        (folder / "manifest.json").write_text(original)
        _edit(folder, edit)
        with pytest.raises(CheckpointError, match=r"checkpoint of step 1 in .* is damaged: "
                                                  r"manifest.json does not match its own "
                                                  r"checksum \(manifest_sha256\): it was edited "
                                                  r"or corrupted; delete the folder"):
            checkpoint.restore(d)
    # other whitespace is no edit: the checksum is over the canonical JSON
    m = json.loads(original)
    (folder / "manifest.json").write_text(json.dumps(m, indent=4, sort_keys=True))
    _assert_bitwise_equal(checkpoint.restore(d, target=_state()), _state())


def test_a_format_1_manifest_restores_and_is_checked_against_the_data(saved):
    d, folder = saved
    original = (folder / "manifest.json").read_text()
    _edit(folder, lambda m: None, format_1=True)
    _assert_bitwise_equal(checkpoint.restore(d, target=_state()), _state())
    assert checkpoint.restore(d)["params"]["dense_0"]["w"].dtype == jnp.float32
    # without a checksum of its own, an edited dtype is caught against the stored array
    (folder / "manifest.json").write_text(original)
    _edit(folder, _set_dtype("params/dense_0/w", "int32"), format_1=True)
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/w': the manifest says dtype int32, but the array is "
            "stored as float32; the manifest was edited or damaged")):
        checkpoint.restore(d)
    (folder / "manifest.json").write_text(original)
    _edit(folder, _set_dtype("params/dense_0/b", "bfloat16"), format_1=True)
    with pytest.raises(CheckpointError, match="'params/dense_0/b': the manifest says dtype "
                                              "bfloat16, but the array is stored as float32"):
        checkpoint.restore(d)
    # and a dropped leaf entry against the arrays the file holds
    (folder / "manifest.json").write_text(original)
    _edit(folder, _drop_leaf("params/dense_0/w"), format_1=True)
    with pytest.raises(CheckpointError, match=r"arrays.npz does not match its manifest: arrays "
                                              r"'2' are not in the manifest \(it lists \d+ "
                                              r"leaves, the file holds \d+ arrays"):
        checkpoint.restore(d)


def test_shape_mismatch_names_key_path(saved):
    d, _ = saved
    other = TrainState.create(_params(hidden=256), optim.adamw(), jax.random.key(0),
                              loss_scale=precision.DynamicLossScale())
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/w': checkpoint has shape (64, 128), "
            "target expects (64, 256)")):
        checkpoint.restore(d, target=other)


def test_dtype_mismatch_names_key_path(saved):
    d, _ = saved
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/b': checkpoint has dtype float32, "
            "target expects bfloat16")):
        checkpoint.restore(d, target=_state(jnp.bfloat16))
    raw = _state()._replace(rng=jax.random.PRNGKey(0))
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'rng': checkpoint has shape (), target expects (2,)")):
        checkpoint.restore(d, target=raw)


def test_structure_mismatch_lists_key_paths(saved):
    d, _ = saved
    params = _params()
    params["dense_2"] = {"w": jnp.zeros((10, 10))}
    del params["dense_1"]["b"]
    other = TrainState.create(params, optim.adamw(), jax.random.key(0),
                              loss_scale=precision.DynamicLossScale())
    with pytest.raises(CheckpointError) as err:
        checkpoint.restore(d, target=other)
    msg = str(err.value)
    assert "does not match the structure of target" in msg
    assert "Missing key paths in the checkpoint: opt_state/0/mu/dense_2/w" in msg
    assert "params/dense_2/w" in msg
    assert "Extra key paths in the checkpoint: opt_state/0/mu/dense_1/b" in msg
    assert "params/dense_1/b" in msg
    # no loss scale in the target: the loss_scale leaves are extra
    plain = TrainState.create(_params(), optim.adamw(), jax.random.key(0))
    with pytest.raises(CheckpointError, match="Extra key paths in the checkpoint: "
                                              "loss_scale/counter"):
        checkpoint.restore(d, target=plain)


# ----------------------------------------------------------------------------- kill safety

# One child imports funtrain once and forks a writer per trial (a fresh interpreter per
# trial cost a jax import each). The writers touch numpy only: no jax op runs after a fork.
_FORKING_WRITER = textwrap.dedent("""
    import os, sys
    import ml_dtypes, numpy as np
    from funtrain.train.checkpoint import CheckpointManager

    def state(step):
        return {"w": np.full((512, 1024), step, np.float32),
                "h": np.full((256, 1024), step, ml_dtypes.bfloat16),
                "key": np.full(2, step, np.uint32), "step": step}

    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("reap"):
            os.waitpid(pid, 0)
            print("reaped", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            manager = CheckpointManager(line.strip(), keep_last=2)
            step = 0
            while True:
                manager.save(state(step), step)
                if step == 0:
                    print("saving", os.getpid(), flush=True)
                step += 1
""")


def _kill_target(step):
    return {"w": np.full((512, 1024), step, np.float32),
            "h": np.full((256, 1024), step, jnp.bfloat16),
            "key": np.full(2, step, np.uint32), "step": step}


@pytest.mark.skipif(os.name != "posix", reason="needs fork and SIGKILL")
def test_killed_writer_leaves_a_valid_checkpoint(tmp_path):
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    forker = subprocess.Popen([sys.executable, "-c", _FORKING_WRITER], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    max_steps, leftovers = [], []
    try:
        assert forker.stdout.readline().strip() == "ready", forker.stderr.read()
        for trial in range(20):
            d = tmp_path / f"trial_{trial}"
            forker.stdin.write(f"{d}\n")
            forker.stdin.flush()
            line = forker.stdout.readline().split()
            assert line and line[0] == "saving", forker.stderr.read()
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(int(line[1]), signal.SIGKILL)
            forker.stdin.write("reap\n")
            forker.stdin.flush()
            assert forker.stdout.readline().strip() == "reaped", forker.stderr.read()
            step = checkpoint.latest_step(d)
            assert step is not None
            steps = checkpoint.all_steps(d)
            assert 1 <= len(steps) <= 3  # keep_last=2, plus one just saved before deleting
            for s in steps:
                restored = checkpoint.restore(d, target=_kill_target(0), step=s)
                assert restored["step"] == s
                assert (restored["w"] == s).all() and (restored["h"] == s).all()
                np.testing.assert_array_equal(restored["key"], np.full(2, s, np.uint32))
            max_steps.append(step)
            leftovers.append(sum(p.name.startswith(".") for p in d.iterdir()))
    finally:
        forker.kill()
        forker.wait()
    print(f"latest steps {max_steps}; trials killed mid-write or mid-delete: "
          f"{sum(n > 0 for n in leftovers)}")
    assert max(max_steps) > 0  # some kills happened after several saves


# ----------------------------------------------------------------------------- parts (format 3)
# The format that several processes write (tests/parallel runs two processes); written here
# by one process, which stores every leaf in its one part.


@pytest.fixture
def parts(tmp_path):
    state = _state()
    checkpoint._save_parts(tmp_path, state, 1, {"note": "parts"}, False)
    return tmp_path, state


def test_a_parts_checkpoint_restores_bitwise(parts):
    d, state = parts
    manifest = checkpoint.read_manifest(d)
    assert manifest["format"] == 3 and [p["file"] for p in manifest["parts"]] == [
        "part_00000.npz"]
    assert sorted(os.listdir(checkpoint.step_dir(d, 1))) == ["manifest.json", "part_00000.npz"]
    back = checkpoint.restore(d, target=_state())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = state.params["dense_0"]["w"]
    assert checkpoint.restore(d)["params"]["dense_0"]["w"].shape == w.shape


def test_a_damaged_part_names_the_key_path(parts):
    d, state = parts
    path = checkpoint.step_dir(d, 1) / "part_00000.npz"
    w = np.asarray(state.params["dense_0"]["w"]).tobytes()
    _flip(path, path.read_bytes().find(w) + len(w) // 2)
    with pytest.raises(CheckpointError, match=re.escape(
            "part_00000.npz is corrupted (checksum mismatch): the arrays of key paths "
            "'params/dense_0/w' are damaged")):
        checkpoint.restore(d, target=_state())


def test_a_missing_piece_is_an_error_naming_the_key_path(parts):
    d, _ = parts
    path = checkpoint.step_dir(d, 1) / "manifest.json"
    m = json.loads(path.read_text())
    leaf = next(x for x in m["leaves"] if x["path"] == "params/dense_0/w")
    piece = leaf["pieces"][0]
    piece["index"] = [[0, 1], [0, 4]]  # claims one row of three
    m["manifest_sha256"] = checkpoint._manifest_sha256(m)
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/w': a piece in")):
        checkpoint.restore(d)


def _edit_leaf(d, edit):
    path = checkpoint.step_dir(d, 1) / "manifest.json"
    m = json.loads(path.read_text())
    edit(next(x for x in m["leaves"] if x["path"] == "params/dense_0/w"))
    m["manifest_sha256"] = checkpoint._manifest_sha256(m)
    path.write_text(json.dumps(m))


def test_pieces_that_overlap_or_leave_a_gap_are_errors(parts):
    d, _ = parts
    _edit_leaf(d, lambda leaf: leaf["pieces"].append(dict(leaf["pieces"][0])))
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/w': two pieces overlap at [[0, 64], [0, 128]]")):
        checkpoint.restore(d)
    _edit_leaf(d, lambda leaf: (leaf["pieces"].pop(), leaf.update(stored_shape=[65, 128])))
    with pytest.raises(CheckpointError, match=re.escape(
            "key path 'params/dense_0/w': its pieces leave 128 of its 8320 elements "
            "unwritten")):
        checkpoint.restore(d)


def test_parts_refuse_an_existing_step_and_overwrite_it_when_asked(parts):
    d, state = parts
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        checkpoint._save_parts(d, state, 1, None, False)
    other = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         state)
    checkpoint._save_parts(d, other, 1, None, True)
    back = checkpoint.restore(d, target=_state())
    np.testing.assert_array_equal(np.asarray(back.params["dense_0"]["w"]),
                                  np.asarray(other.params["dense_0"]["w"]))
    assert sorted(os.listdir(d)) == ["step_00000001"]  # no temporary or old copy left


def test_a_tree_that_now_flattens_in_another_order_restores_by_key_path(tmp_path):
    """Loss scales flattened in field order up to 0.1.0 and in name order since they became
    chex dataclasses: a checkpoint of the old order restores into the new one."""
    from typing import Any, NamedTuple

    from funtrain.precision import DynamicLossScale

    class OldOrder(NamedTuple):  # 0.1.0's DynamicLossScale leaves, in 0.1.0's order
        loss_scale: Any
        counter: Any
        period: Any
        factor: Any
        min_scale: Any

    old = OldOrder(jnp.float32(256.0), jnp.int32(3), jnp.int32(7), jnp.float32(4.0),
                   jnp.float32(0.5))
    checkpoint.save(tmp_path, {"scale": old, "w": jnp.ones(2)}, 1)
    target = {"scale": DynamicLossScale(), "w": jnp.zeros(2)}
    restored = checkpoint.restore(tmp_path, target=target)
    assert isinstance(restored["scale"], DynamicLossScale)
    for field in OldOrder._fields:
        assert getattr(restored["scale"], field) == getattr(old, field), field
    np.testing.assert_array_equal(restored["w"], np.ones(2))


def test_big_endian_numpy_leaves_round_trip(tmp_path, monkeypatch):
    # ">f4" saved without a word and never restored: "the manifest says dtype float32, but
    # the array is stored as float32; the manifest was edited or damaged"
    tree = {"a": np.arange(3, dtype=">f4"), "b": np.arange(2, dtype=">i8")}
    checkpoint.save(tmp_path, tree, 0)
    for target in (None, {"a": np.zeros(3, ">f4"), "b": np.zeros(2, ">i8")}):
        back = checkpoint.restore(tmp_path, target=target)
        for k in tree:
            np.testing.assert_array_equal(back[k], tree[k])
            assert back[k].dtype == tree[k].dtype.newbyteorder("=")
    # written so by an older funtrain (the bytes as they came): read back, not reinterpreted
    monkeypatch.setattr(checkpoint, "_storable", np.asarray)
    checkpoint.save(tmp_path, tree, 1)
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, step=1)["a"], tree["a"])


def test_save_into_a_file_and_numpy_keep_last(tmp_path):
    # save into a path that is a file raised a bare FileExistsError; CheckpointManager took
    # keep_last=2 but not np.int64(2)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        checkpoint.save(tmp_path / "file", {"a": np.ones(2)}, 0)
    manager = CheckpointManager(tmp_path / "ck", keep_last=np.int64(1))
    for step in range(3):
        manager.save({"a": np.ones(2)}, step)
    assert manager.all_steps() == [2]
