"""SPMD on 8 emulated CPU devices, in a fresh process (the device count is fixed when JAX
starts): data parallel and FSDP train like one device, and FSDP splits the memory."""

import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from funtrain import parallel
from funtrain.train import checkpoint

SCRIPT = Path(__file__).with_name("spmd_run.py")
pytestmark = pytest.mark.slow  # one subprocess: 11 short trainings on 8 devices, ~50 s


def _spmd_run():
    """The script's JSON line, or a JSON ``{"failed": stderr}`` (kept, so a worker that
    waited on the lock fails at once instead of running the script again)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "mlp", "gpt", "cnn"], capture_output=True,
                          text=True, timeout=600, cwd=SCRIPT.parents[2])
    if proc.returncode != 0:
        return json.dumps({"failed": proc.stderr[-3000:]})
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, worker_id):
    """The script's results, computed once per session: pytest-xdist workers share them
    through a file under a lock (the recipe in xdist's docs), so the other worker waits
    instead of running the script a second time."""
    if worker_id == "master":  # no xdist
        result = json.loads(_spmd_run())
    else:
        shared = tmp_path_factory.getbasetemp().parent / "spmd_runs.json"
        with open(f"{shared}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not shared.exists():
                shared.write_text(_spmd_run())
            result = json.loads(shared.read_text())
    assert "failed" not in result, result.get("failed")
    return result


@pytest.mark.parametrize("run", ["mlp/dp", "mlp/fsdp", "mlp/fsdp+tp", "gpt/dp", "gpt/fsdp",
                                 "gpt/fsdp+tp", "cnn/dp", "cnn/fsdp"])
def test_sharded_training_equals_one_device(runs, run):
    """20 AdamW steps in float32. Measured: at most 4e-7 relative (reductions split over
    devices, and tensor parallelism's inside the matmuls, change the last bits only). The
    CNN's BatchNorm statistics are over the global batch, as on one device."""
    assert runs["devices"] == 8
    one, many = runs[run.split("/")[0] + "/single"], runs[run]
    tolerance = 1e-4 if "tp" in run else 1e-5
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=tolerance)
    assert many["kept_sharding"]  # the step hands the state back where it was placed
    # ... spelled as it came (P('fsdp', None) returns as P('fsdp')): the step compiled once
    assert one["recompiles"] == many["recompiles"] == 0


@pytest.mark.parametrize("run", ["mlp/fsdp", "mlp/fsdp+tp", "gpt/fsdp", "gpt/fsdp+tp"])
def test_fsdp_holds_an_eighth_of_the_state_per_device(runs, run):
    dp, fsdp = runs[run.split("/")[0] + "/dp"], runs[run]
    assert dp["per_device"] == dp["total"]  # replicated
    # an eighth of the sharded leaves, plus those under fsdp_min_size (biases, norms) that
    # stay replicated. Measured: MLP 308,092 B of 2,442,364 (FSDP), GPT 92,932 of 662,788
    sharded = fsdp["total"] - fsdp["replicated"]
    assert 0 < fsdp["replicated"] < fsdp["total"] / 8
    if run.endswith("/fsdp"):  # every split leaf over all 8 devices
        assert fsdp["per_device"] <= sharded / 8 + fsdp["replicated"]
    else:  # fsdp 4 x tensor 2: a leaf with no tensor rule is split 4 ways only
        assert fsdp["per_device"] <= sharded / 4 + fsdp["replicated"]
    assert any("fsdp" in spec for spec in fsdp["specs"])
    if "tp" in run:
        assert any("tensor" in spec for spec in fsdp["specs"])


def test_a_checkpoint_saved_under_fsdp_restores_onto_other_meshes(runs):
    """Saved on 8 devices with FSDP (one process: the arrays are gathered to the host);
    restored onto the same mesh, 4 devices data parallel, 1 device, and device 5 alone
    (it came back on device 0), each placed like its target, and each takes the same next
    step."""
    restored = runs["checkpoint"]
    assert {k: (v["spec"], v["devices"]) for k, v in restored.items()} == {
        "8 devices, FSDP": ("P('fsdp',)", 8), "4 devices, DP": ("P()", 4), "1 device": ("", 1),
        "device 5": ("", 1)}
    assert restored["1 device"]["on"] == [0] and restored["device 5"]["on"] == [5]
    losses = [v["loss"] for v in restored.values()]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


def test_bad_input_is_named(runs):
    bad = runs["bad_input"]
    assert "batch array 'x' of shape (12, 784) must have a first axis divisible by " \
           "data * fsdp = 8" in bad["batch not divisible"]
    assert "rule(s) ['conv'] match no param key path" in bad["rule matches nothing"]
    assert "splits 'dense_1/w' of shape (256, 10) over ('fsdp',) (8 devices), which does " \
           "not divide 10" in bad["spec does not divide"]
    assert "names mesh axis 'model', which the mesh lacks" in bad["unknown mesh axis"]
    assert "rule 'dense_0/w' gives P('fsdp', 'fsdp') for 'dense_0/w': a mesh axis can split " \
           "one dimension only" in bad["axis used twice"]
    assert "rule '(' is not a valid regex" in bad["bad regex"]
    assert "a rule must be a pair (key-path regex, PartitionSpec), got ('w', ('fsdp', None)); " \
           "write PartitionSpec(*('fsdp', None))" in bad["tuple spec"]
    assert "8 devices do not divide into 3" in bad["mesh size"] or \
        "data * fsdp * tensor" in bad["mesh size"]
    assert "fit: batch size 12 must be divisible by data * fsdp = 8 of the state's mesh" \
        in bad["fit batch not divisible"]


def test_restoring_a_different_tree_is_named(runs):
    ck = runs["restore_errors"]
    assert "key path 'params/dense_0/w': checkpoint has shape (784, 256), target expects " \
           "(784, 128)" in ck["other shapes"]
    assert "does not match the structure of target. Extra key paths in the checkpoint: " \
           "opt_state/0/count" in ck["other tree"]


def test_one_array_params_and_a_mesh_without_fsdp_are_placed(runs):
    """Params that are one array were left replicated (their key path is empty), and a
    Mesh without an fsdp axis raised KeyError: 'fsdp'."""
    placed = runs["placed"]
    assert placed["one_array"] == ["P('fsdp', None)"] * 2, placed
    assert placed["own_mesh"] == ["P()", "P('data',)"], placed
    # shard_state copies: a donated step on the sharded state deleted the caller's
    # replicated leaves (all 16 of a data-parallel AdamW state)
    # and the donated state passed again is named, not a crash (exit 139) on a mesh
    assert placed["deleted"] == [0, "step", 0, "step"], placed
    spec, diff, padding = placed["fused"]
    assert spec == "P('fsdp',)" and diff < 1e-6 and padding == 0.0, placed


def test_step_report_gives_per_device_bytes_under_a_mesh(runs):
    """Measured on the MLP: 102,696 of 814,120 B of params and 205,396 of 1,628,244 B of
    AdamW state per device, and XLA's per-device arguments 320,668 B against 2,542,860 B."""
    single, fsdp = runs["reports"]["single"], runs["reports"]["fsdp"]
    assert single["devices"] is None and fsdp["devices"] == 8
    for part in ("params", "opt_state"):
        assert fsdp[f"{part}_bytes"] == single[f"{part}_bytes"]
        assert fsdp[f"{part}_bytes_per_device"] <= fsdp[f"{part}_bytes"] / 8 + 4096
    assert fsdp["argument_bytes"] < single["argument_bytes"] / 6
    assert fsdp["flops"] < single["flops"] / 6  # one device's share of the step
    # the same state given as ShapeDtypeStructs with shardings: the same per-device bytes
    abstract = runs["reports"]["fsdp_abstract"]
    for key in ("devices", "params_bytes_per_device", "opt_state_bytes_per_device"):
        assert abstract[key] == fsdp[key], key


def test_fit_serves_each_device_its_rows_of_every_batch(runs):
    """fit's device-resident path on a sharded state: the same losses as one device, the
    state stays where shard_state put it, and one device runs its share of each batch.
    Measured FLOPs per device and chunk: one device 29.7M, data parallel 6.9M (29.7M when
    the batch is not split: every device ran the whole batch), FSDP 3.9M."""
    fits = runs["fit"]
    for name in ("dp", "fsdp"):
        np.testing.assert_allclose(fits[name]["losses"], fits["single"]["losses"], rtol=1e-5)
        assert fits[name]["step"] == fits["single"]["step"] == 16
    for name in ("single", "dp", "fsdp"):  # shard_state's P('fsdp', None) is jit's P('fsdp')
        assert fits[name]["compiles_again"] == 0 and fits[name]["step_again"] == 24, name
    assert (fits["dp"]["spec"], fits["fsdp"]["spec"]) == ("P()", "P('fsdp',)")
    # the host feed too (device_data=False): the step sees each batch split over the mesh
    # (it got every batch whole on each device)
    np.testing.assert_allclose(fits["dp_host"]["losses"], fits["single"]["losses"], rtol=1e-5)
    assert len(fits["dp_host"]["batch_sharding"]) == 1
    assert "spec=P('data',)" in fits["dp_host"]["batch_sharding"][0]
    assert fits["dp"]["flops"] < fits["single"]["flops"] / 3
    assert fits["fsdp"]["flops"] < fits["single"]["flops"] / 6


def test_mesh_on_this_process_devices():
    m = parallel.mesh()
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert m.shape["data"] == len(jax.devices())
    with pytest.raises(ValueError, match=r"parallel.mesh: data \* fsdp \* tensor = "):
        parallel.mesh(data=len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.mesh(data=-1, fsdp=-1)
    # data takes the rest by default, unless another axis does (the module's example)
    assert dict(parallel.mesh(fsdp=-1).shape) == {"data": 1, "fsdp": len(jax.devices()),
                                                   "tensor": 1}


def test_a_rule_prepended_to_override_the_defaults_is_no_unused_rule():
    """The docs' "prepend your own rules to override": a rule for every bias before
    tensor_rules() shadows the default bias rule, which is then matched but never chosen,
    not a rule that matches nothing."""
    from jax.sharding import PartitionSpec as P

    from funtrain import nn
    params = jax.eval_shape(lambda: nn.gpt(16, 8, 1, 2, 8).init(
        jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32)))
    m = parallel.mesh(data=1, fsdp=1, tensor=-1)
    specs = parallel.param_specs(params, m, [(r"/b$", P())] + parallel.tensor_rules())
    flat = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}
    assert [v for k, v in flat.items() if k.endswith("['b']")] and \
        all(v == P() for k, v in flat.items() if k.endswith("['b']"))
    with pytest.raises(ValueError, match=r"rule\(s\) \['conv'\] match no param key path"):
        parallel.param_specs(params, m, [("conv", P())] + parallel.tensor_rules())
    # a compiled regex is a pattern too, and a rule may be a list
    compiled = parallel.param_specs(params, m, [[re.compile(r"/b$"), P()]]
                                    + parallel.tensor_rules())
    assert jax.tree.leaves(compiled, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


MULTI = Path(__file__).with_name("multiprocess_run.py")


def _last_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_processes_on_localhost_train_like_one():
    """``python -m funtrain launch --nproc 2``: jax.distributed with gloo on this CPU, each
    process reading half of every global batch (Loader's process_index/process_count)."""
    root = SCRIPT.parents[2]
    one = _last_json(subprocess.run([sys.executable, str(MULTI)], capture_output=True,
                                    text=True, timeout=300, cwd=root))
    two = _last_json(subprocess.run(
        [sys.executable, "-m", "funtrain", "launch", "--nproc", "2", str(MULTI)],
        capture_output=True, text=True, timeout=300, cwd=root))
    assert (one["processes"], two["processes"], two["devices"]) == (1, 2, 2)
    assert (one["local_batch"], two["local_batch"]) == (32, 16)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    # fit on the host feed splits every batch over the processes too (it once trained
    # each process on its half as if it were the whole batch: the processes drifted apart)
    for run in (one, two):
        np.testing.assert_allclose(run["fit_losses"], one["losses"], rtol=1e-5)
    # a process-split eval Loader: every process gets the global means, those of one process
    np.testing.assert_allclose(two["evals"], [one["evals"][0]] * 2, rtol=1e-5)
    np.testing.assert_allclose(two["whole_eval"], one["evals"][0], rtol=1e-5)
    # the training Loader split over processes on a mesh where each holds all rows: refused
    assert one["refused"] is None
    assert two["refused"].startswith("fit: the Loader reads this process's 1/2 of each "
                                     "batch (process_count=2), but on this mesh"), two


def test_launch_returns_the_first_failure(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\n"
                      "sys.exit(3 if os.environ['FUNTRAIN_PROCESS_ID'] == '1' else 0)\n")
    assert parallel.launch(2, [sys.executable, str(script)], timeout=60) == 3


def test_initialize_in_one_process_starts_nothing(monkeypatch):
    for name in (*parallel.ENV, "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize() is False


def test_initialize_passes_each_explicit_argument(monkeypatch):
    """Each explicit argument wins over the launcher's variable, and under SLURM is passed
    on beside JAX's detection (they were overwritten, or dropped)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keeps this process's CPU
    for name in (*parallel.ENV, "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in zip(parallel.ENV, ("localhost:1234", "4", "3"), strict=True):
        monkeypatch.setenv(name, value)
    assert parallel.initialize(num_processes=2, process_id=1)
    assert calls[-1] == {"coordinator_address": "localhost:1234", "num_processes": 2,
                         "process_id": 1}
    for name in parallel.ENV:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.initialize(process_id=1) and calls[-1] == {"process_id": 1}


def test_launch_stops_its_processes_on_sigterm_and_reports_signals(tmp_path):
    """A scheduler's SIGTERM to the launcher stops its processes (they were orphaned); a
    process killed by signal k makes the launcher exit 128 + k, as a shell reports it."""
    import os
    import signal

    script = tmp_path / "sleep.py"
    script.write_text("import os, pathlib, sys, time\n"
                      "pathlib.Path(sys.argv[1], os.environ['FUNTRAIN_PROCESS_ID'] + '.pid')"
                      ".write_text(str(os.getpid()))\n"
                      "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "funtrain", "launch", "--nproc", "2",
                             str(script), str(tmp_path)], cwd=SCRIPT.parents[2])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in pids:  # gone, and reaped by the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    killed = tmp_path / "killed.py"
    killed.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert parallel.main_launch(["--nproc", "1", str(killed)]) == 128 + signal.SIGKILL
    with pytest.raises(SystemExit):
        parallel.main_launch(["--nproc", "0", str(killed)])


def test_loader_gives_each_process_its_part_of_every_global_batch():
    from funtrain import data

    ds = data.ArrayDataset(x=np.arange(12))
    whole = [b["x"].tolist() for b in ds.batches(4, key=jax.random.key(0),
                                                  drop_remainder=True).epoch(1)]
    parts = [[b["x"].tolist() for b in data.Loader(ds, 4, key=jax.random.key(0),
                                                   drop_remainder=True, process_index=i,
                                                   process_count=2).epoch(1)]
             for i in range(2)]
    assert [p0 + p1 for p0, p1 in zip(*parts, strict=True)] == whole
    with pytest.raises(ValueError, match="with process_count=2, batch_size .* must divide"):
        data.Loader(ds, 3, drop_remainder=True, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"process_index must be an int in \[0, 1\], got 2"):
        data.Loader(ds, 4, drop_remainder=True, process_index=2, process_count=2)


def test_a_loader_split_over_more_processes_than_the_run_has_is_refused():
    # it trained (and evaluated) on half of each batch as if it were all of it
    from funtrain import data, nn, optim, train

    ds = data.ArrayDataset(x=np.ones((8, 3), np.float32), y=np.zeros(8, np.int32))
    half = data.Loader(ds, 4, drop_remainder=True, process_index=0, process_count=2)
    model = nn.dense(2)
    state = train.TrainState.create(model.init(jax.random.key(0), np.ones((1, 3))),
                                    optim.sgd(0.1), jax.random.key(1))
    msg = (r"the Loader reads this process's 1/2 of each batch \(process_count=2\), but this "
           r"run has 1 process\(es\): pass process_count=jax.process_count\(\)")
    with pytest.raises(ValueError, match="^fit: " + msg):
        train.fit(state, train.make_train_step(train.classifier_loss(model), optim.sgd(0.1)),
                  half, progress=False)
    with pytest.raises(ValueError, match="^evaluate: " + msg):
        train.evaluate(train.make_eval_step(train.classifier_eval(model)), state.params, half)


CKPT = Path(__file__).with_name("checkpoint_run.py")


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _restore_in_one_process(directory):
    proc = subprocess.run([sys.executable, str(CKPT), str(directory), "--restore"],
                          capture_output=True, text=True, timeout=300, cwd=CKPT.parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _json_lines(proc.stdout)[-1]


def test_two_process_checkpoint_is_written_in_parts_and_restores_in_one_process(tmp_path):
    """FSDP over two processes: each writes the shards it holds (no gather to one host),
    process 0 commits; one process restores the state bitwise."""
    proc = subprocess.run([sys.executable, "-m", "funtrain", "launch", "--nproc", "2",
                           str(CKPT), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=CKPT.parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _json_lines(proc.stdout)
    at_20 = next(x for x in lines if x.get("step") == 20)["digests"]
    assert [x["saved"] for x in lines if "saved" in x] == [10, 20]

    folder = checkpoint.step_dir(tmp_path, 20)
    manifest = checkpoint.read_manifest(tmp_path)
    assert manifest["format"] == 3 and manifest["processes"] == 2
    sizes = [(folder / part["file"]).stat().st_size for part in manifest["parts"]]
    assert min(sizes) > 0.4 * sum(sizes), sizes  # the FSDP shards split about evenly
    w = next(leaf for leaf in manifest["leaves"] if leaf["path"] == "params/dense_0/w")
    assert sorted(p["part"] for p in w["pieces"]) == [0, 1]

    restored = _restore_in_one_process(tmp_path)
    assert restored["step"] == 20
    assert restored["digests"] == at_20


def test_killing_one_process_of_a_two_process_save_keeps_the_previous_step(tmp_path):
    """Process 1 writes a torn part of step 20 and exits; the launcher stops process 0.
    Step 20 never becomes final, step 10 restores bitwise, and the temporary folder is
    deleted (by process 0, or as a dead writer's leftover by the next manager)."""
    proc = subprocess.run([sys.executable, "-m", "funtrain", "launch", "--nproc", "2",
                           str(CKPT), str(tmp_path), "--die-at", "20"],
                          capture_output=True, text=True, timeout=300, cwd=CKPT.parents[2])
    assert proc.returncode == 17, proc.stderr[-3000:]
    at_10 = next(x for x in _json_lines(proc.stdout) if x.get("step") == 10)["digests"]
    assert checkpoint.all_steps(tmp_path) == [10]
    restored = _restore_in_one_process(tmp_path)
    assert restored["step"] == 10
    assert restored["digests"] == at_10
    assert restored["left"] == ["step_00000010"]
