"""Scale-out on JAX's own SPMD: a ``Mesh``, sharding rules by key path, sharded states.

funtrain adds no engine of its own. A state placed with ``shard_state`` (``NamedSharding``s
on a ``Mesh``) and batches placed with ``shard_batch`` go through the same jitted step as on
one device: GSPMD partitions the computation and inserts the collectives.

- Data parallel (``mesh(data=-1)``): params and optimizer state replicated, each batch
  split along its first axis.
- FSDP / ZeRO-3 (``mesh(data=1, fsdp=-1)``): each param, and its optimizer state, split
  along its largest axis that the ``fsdp`` axis divides; leaves under ``fsdp_min_size``
  elements stay replicated. The batch is split over ``data`` and ``fsdp`` together.
- Tensor parallel (``mesh(fsdp=4, tensor=2)`` with ``rules=tensor_rules()``): Megatron's
  column/row split of each MLP and attention pair, FSDP on the other axis.
- Your rules first: ``rules=[(regex, PartitionSpec), ...]`` matched against each param's key
  path (``"dense_0/w"``); the first match wins over the defaults.

BatchNorm needs nothing: under GSPMD a batch statistic is a mean over the whole global
batch, so data-parallel BatchNorm is synchronized BatchNorm.

Example (8 emulated CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    mesh = parallel.mesh(fsdp=-1)
    state = parallel.shard_state(train.TrainState.create(params, opt, key), mesh)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funtrain._checks import check_int
from funtrain._tree import keystr

__all__ = ["mesh", "fsdp_spec", "tensor_rules", "param_specs", "shard_state", "shard_batch",
           "batch_axes", "device_bytes", "initialize", "launch", "AXES", "BATCH"]

AXES = ("data", "fsdp", "tensor")
BATCH = PartitionSpec(("data", "fsdp"))  # a batch's first axis, over every data-like axis
Rules = Sequence[tuple["str | re.Pattern[str]", PartitionSpec]]


def mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, *, devices: Any = None
         ) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all of
    ``jax.devices()``). One size may be ``-1``: the devices the others leave. ``data``
    defaults to ``-1``, or to 1 when another axis is ``-1`` (``mesh(fsdp=-1)``)."""
    if data is None:
        data = 1 if -1 in (fsdp, tensor) else -1
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size != -1:
            check_int("parallel.mesh", name, size)
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"parallel.mesh: at most one axis may be -1, got {', '.join(free)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if devices.size % known:
            raise ValueError(f"parallel.mesh: {devices.size} devices do not divide into "
                             f"{known} for the other axes")
        sizes[free[0]] = devices.size // known
    if math.prod(sizes.values()) != devices.size:
        raise ValueError(f"parallel.mesh: data * fsdp * tensor = "
                         f"{math.prod(sizes.values())} ({sizes}), but there are "
                         f"{devices.size} devices")
    return Mesh(devices.reshape(tuple(sizes.values())), AXES)


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = 1 << 14) -> PartitionSpec:
    """Split ``shape`` over the ``fsdp`` axis along its largest divisible axis (replicated
    when the leaf is smaller than ``min_size`` elements, or nothing divides)."""
    n = mesh.shape.get("fsdp", 1)  # a Mesh of the user's own may have no fsdp axis
    if n == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return PartitionSpec(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return PartitionSpec()


def tensor_rules(fsdp: bool = True) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style tensor parallelism for ``transformer_block``/``gpt`` params: the MLP's
    first ``dense`` and the attention's query/key/value split by columns over ``tensor`` (so
    whole heads land on a device when ``n_head`` divides), the MLP's second ``dense`` and
    the attention's ``out`` by rows; one all-reduce per pair. With ``fsdp`` the other axis of
    each weight is split over ``fsdp`` too. Prepend your own rules to override."""
    f = "fsdp" if fsdp else None
    return [(r"(mlp/dense_0|/query|/key|/value)/w$", PartitionSpec(f, "tensor")),
            (r"(mlp/dense_0|/query|/key|/value)/b$", PartitionSpec("tensor")),
            (r"(mlp/dense_1|/out)/w$", PartitionSpec("tensor", f))]


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh,
                rule: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"parallel: rule {rule!r} gives {spec} for {path!r} of shape {shape}: "
                         f"more axes than the param has")
    every = [a for axes in spec if axes is not None
             for a in (axes if isinstance(axes, tuple) else (axes,))]
    if len(every) != len(set(every)):
        raise ValueError(f"parallel: rule {rule!r} gives {spec} for {path!r}: a mesh axis "
                         f"can split one dimension only")
    for dim, axes in zip(shape, spec, strict=False):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        for name in names:
            if name not in mesh.shape:
                raise ValueError(f"parallel: rule {rule!r} names mesh axis {name!r}, which "
                                 f"the mesh lacks (axes {tuple(mesh.shape)})")
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(f"parallel: rule {rule!r} splits {path!r} of shape {shape} "
                             f"over {names} ({size} devices), which does not divide {dim}")


def param_specs(params: Any, mesh: Mesh, rules: Rules = (), *,
                fsdp_min_size: int = 1 << 14) -> Any:
    """A ``PartitionSpec`` per param: the first of ``rules`` whose regex matches the key
    path (``re.search``), else ``fsdp_spec``. A rule that matches no param is an error (one
    that an earlier rule overrides for every param it matches is not: that is how a rule is
    overridden)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2
                and isinstance(rule[0], (str, re.Pattern)) and isinstance(rule[1], PartitionSpec)):
            hint = (f"; write PartitionSpec(*{rule[1]!r})" if isinstance(rule, (tuple, list))
                    and len(rule) == 2 and isinstance(rule[1], (tuple, list)) else "")
            raise TypeError(f"parallel: a rule must be a pair (key-path regex, PartitionSpec), "
                            f"got {rule!r}{hint}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"parallel: rule {rule[0]!r} is not a valid regex: {e}") from None
    used = [False] * len(rules)
    specs = []
    for path, leaf in flat:
        name, shape = keystr(path), tuple(np.shape(leaf))
        hits = [i for i, (pattern, _) in enumerate(rules) if re.search(pattern, name)]
        for i in hits:
            used[i] = True
        if hits:
            pattern, spec = rules[hits[0]]
            _check_spec(name, shape, spec, mesh, re.compile(pattern).pattern)
        else:
            spec = fsdp_spec(shape, mesh, fsdp_min_size)
        specs.append(spec)
    unused = [p for (p, _), u in zip(rules, used, strict=True) if not u]
    if unused:
        raise ValueError(f"parallel: rule(s) {unused} match no param key path (the paths look "
                         f"like {keystr(flat[0][0]) if flat else '<none>'!r})")
    return treedef.unflatten(specs)


def _spec_by_path(params: Any, specs: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    # params that are one array: its key path is empty (keystr names it "<root>")
    return {keystr(path) if path else "": (tuple(np.shape(leaf)), spec)
            for (path, leaf), spec in zip(flat, jax.tree.leaves(
                specs, is_leaf=lambda x: isinstance(x, PartitionSpec)), strict=True)}


def shard_state(state: Any, mesh: Mesh, rules: Rules = (), *,
                fsdp_min_size: int = 1 << 14) -> Any:
    """``state`` (a ``TrainState``) placed on ``mesh``: params by ``param_specs``, each
    optimizer-state leaf like the param whose key path ends its own (``0/mu/dense_0/w``
    follows ``dense_0/w``) when the shapes agree, everything else replicated. The result
    is a copy: donating it to a step leaves ``state`` usable."""
    params = state.params
    by_path = _spec_by_path(params, param_specs(params, mesh, rules,
                                                fsdp_min_size=fsdp_min_size))

    def place(path: tuple[Any, ...], leaf: Any) -> Any:
        parts, spec = keystr(path).split("/"), PartitionSpec()
        spec_: Any = spec
        for k in range(len(parts) + 1):  # the longest key-path suffix that names a param
            shape, param_spec = by_path.get("/".join(parts[k:]), (None, None))
            if shape is not None:
                spec_ = param_spec if np.shape(leaf) == shape else spec
                break
        # a copy: an aliased buffer would be deleted by the first donated step, and with
        # it the caller's state (TrainState.create's promise)
        return _put(leaf, NamedSharding(mesh, spec_), copy=True)

    return jax.tree_util.tree_map_with_path(place, state)


def _put(x: Any, sharding: NamedSharding, *, copy: bool = False) -> Any:
    """``x`` (the same value in every process) placed with ``sharding``: ``device_put`` in
    one process (never sharing ``x``'s buffers if ``copy``); across processes each builds
    its own shards from its copy."""
    if jax.process_count() == 1:
        if copy and isinstance(x, jax.Array):  # device_put(may_alias=False) still aliases
            x = x.copy()
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_axes(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    """The mesh axes a batch's rows split over (``data`` and ``fsdp``, those ``mesh``
    has: a Mesh of one's own may lack one) and how many devices they make."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return axes, math.prod(mesh.shape[a] for a in axes)


def shard_batch(batch: Any, mesh: Mesh, *, axis: int = 0) -> Any:
    """``batch`` split along its first axis over the ``data`` and ``fsdp`` axes.

    In one process ``batch`` is the global batch; its size must be a multiple of ``data *
    fsdp``. With several processes (``initialize``) each passes its own part, the rows its
    devices hold (``Loader(..., process_index=jax.process_index(),
    process_count=jax.process_count())`` reads just those), and the global batch is
    assembled with ``jax.make_array_from_process_local_data``. On a mesh whose ``data``
    and ``fsdp`` axes do not span the processes, every process's devices hold all rows, and
    each passes the whole batch; other layouts are refused. ``axis``: the rows' axis,
    1 for a stack of batches (``fit``'s scanned chunks).
    """
    axes, n = batch_axes(mesh)
    processes = jax.process_count()
    parts = _row_parts(mesh)  # 1 when every process passes the whole batch
    sharding = NamedSharding(mesh, PartitionSpec(*(None,) * axis, axes))
    which = "a first axis" if axis == 0 else f"an axis {axis}"

    def place(path: tuple[Any, ...], x: Any) -> Any:
        if np.ndim(x) <= axis or (np.shape(x)[axis] * parts) % n:
            raise ValueError(f"parallel.shard_batch: batch array {keystr(path)!r} of shape "
                             f"{np.shape(x)} must have {which} divisible by data * fsdp "
                             f"= {n}" + (f" (with {processes} processes, {processes} times "
                                         f"the local part)" if parts > 1 else ""))
        if processes > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(place, batch)


@functools.lru_cache(maxsize=8)  # once per mesh, not per batch
def _row_parts(mesh: Mesh) -> int:
    """How many parts a batch's rows come in, one per process: ``jax.process_count()``
    when each process's devices hold their own ``1/P`` of the rows along ``data * fsdp``
    (each process passes its part: ``Loader(process_index=, process_count=)``), ``1`` when
    every process's devices hold all rows (each passes the whole batch; e.g. a mesh with
    ``data = fsdp = 1`` across processes). Any other layout is refused: processes sharing
    some rows would each pass other data for them, silently."""
    processes = jax.process_count()
    if processes == 1:
        return 1
    axes, n = batch_axes(mesh)
    held: dict[int, set[int]] = {}  # process -> the row blocks its devices hold
    blocks = NamedSharding(mesh, PartitionSpec(axes)).devices_indices_map((n,))
    for device, (rows,) in blocks.items():
        process = device.process_index  # type: ignore[attr-defined]  # jax.Device has it
        held.setdefault(process, set()).add(rows.start or 0)
    if all(len(h) == n for h in held.values()):
        return 1
    disjoint = len(set().union(*held.values())) == n
    if disjoint and all(len(h) * processes == n for h in held.values()):
        return processes
    raise ValueError(f"parallel: with {processes} processes the batch rows must split over "
                     f"them, each process's devices holding their own 1/{processes} of the "
                     f"data * fsdp = {n} row blocks, or all of them; on this mesh "
                     f"({dict(mesh.shape)}) they hold " + ", ".join(
                         f"process {p}: {sorted(h)}" for p, h in sorted(held.items()))
                     + ". Lay the data and fsdp axes across the processes (parallel.mesh "
                     "does, data first)")


def _check_process_split(mesh: Mesh | None, data: Any, where: str) -> None:
    """Refuse a ``Loader`` that reads one process's part of each batch unless the run has
    that many processes and ``mesh`` (the state's) splits the batch rows over them: else
    each process would train on its part as if it were the whole batch."""
    split, processes = getattr(data, "process_count", 1), jax.process_count()
    if split == 1:
        return
    what = f"{where}: the Loader reads this process's 1/{split} of each batch " \
           f"(process_count={split})"
    if split != processes:
        raise ValueError(f"{what}, but this run has {processes} process(es): pass "
                         f"process_count=jax.process_count()")
    if mesh is None:
        raise ValueError(f"{what}, but the state is not on a mesh across the processes, so "
                         f"no global batch is assembled: place it with parallel.shard_state")
    if _row_parts(mesh) == 1:
        raise ValueError(f"{what}, but on this mesh ({dict(mesh.shape)}) every process holds "
                         f"all rows of the batch (data * fsdp does not span the processes), "
                         f"so each must pass the whole batch: drop process_index/"
                         f"process_count, or lay data or fsdp across the processes")


# ----------------------------------------------------------------------------- processes

ENV = ("FUNTRAIN_COORDINATOR", "FUNTRAIN_NUM_PROCESSES", "FUNTRAIN_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` for a multi-process run; ``True`` if it did.

    Each explicit argument wins; else the variables that ``python -m funtrain launch`` sets
    (``FUNTRAIN_COORDINATOR``, ``FUNTRAIN_NUM_PROCESSES``, ``FUNTRAIN_PROCESS_ID``); what
    is still missing JAX detects (a SLURM job's nodes and task ids, a TPU pod's). With no
    argument, no such variables and no SLURM job of several tasks (``SLURM_JOB_ID``,
    ``SLURM_NTASKS > 1``), the run has one process and nothing is started. On CPU the
    collectives are gloo's. Call it first, before anything touches a device.
    """
    if all(k in os.environ for k in ENV):  # each explicit argument wins over its variable
        coordinator_address = coordinator_address or os.environ[ENV[0]]
        num_processes = num_processes if num_processes is not None else int(os.environ[ENV[1]])
        process_id = process_id if process_id is not None else int(os.environ[ENV[2]])
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS") or 1) > 1
    given: dict[str, Any] = {"coordinator_address": coordinator_address,
                             "num_processes": num_processes, "process_id": process_id}
    if not slurm and all(v is None for v in given.values()):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # What is not given, JAX detects (the SLURM job's nodes and task ids, a TPU pod's)
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, command: Sequence[str], *, timeout: float | None = None) -> int:
    """Run ``command`` (e.g. ``[sys.executable, "train.py"]``) as ``nproc`` processes of one
    job on this machine, for tests and laptops: each gets the ``FUNTRAIN_*`` variables that
    ``initialize`` reads. Returns the first non-zero exit code (the others are stopped),
    else 0."""
    check_int("parallel.launch", "nproc", nproc)
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(list(command), env={**os.environ, ENV[0]: address,
                                                   ENV[1]: str(nproc), ENV[2]: str(i)})
             for i in range(nproc)]
    deadline = None if timeout is None else time.monotonic() + timeout

    def terminated(signum: int, frame: Any) -> None:  # a scheduler's SIGTERM: clean up
        raise SystemExit(128 + signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, terminated) for sig in (
            getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))}
    try:
        while True:  # poll all: a process that failed must not wait behind a live one
            codes = [proc.poll() for proc in procs]
            failed = next((c for c in codes if c), None)
            if failed is not None:
                for proc in procs:  # the others would wait for it forever
                    proc.kill()
                    proc.wait()
                return failed
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(list(command), timeout or 0.0)
            time.sleep(0.05)
    except BaseException:  # Ctrl-C, SIGTERM, a timeout: no process is left behind
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def main_launch(argv: Sequence[str]) -> int:
    """``python -m funtrain launch --nproc N script.py [args]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="funtrain launch", description=launch.__doc__)
    parser.add_argument("--nproc", type=int, required=True, help="processes to start")
    parser.add_argument("script", help="the Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    code = launch(args.nproc, [sys.executable, args.script, *args.args])
    return 128 - code if code < 0 else code  # killed by signal k: 128 + k, as shells say


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of ``tree``, read from the arrays' addressable shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
