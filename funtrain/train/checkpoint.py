"""Atomic, verified checkpoints of any pytree (a ``TrainState`` above all), safe to share
between processes.

A checkpoint of step ``s`` is the folder ``directory/step_{s:08d}/`` holding

* ``arrays.npz``: one uncompressed array per leaf, named by its index in flattening order.
  Dtypes numpy cannot store (bfloat16 and the other ``ml_dtypes``) are stored as unsigned
  integer views of their bytes; typed PRNG keys as their ``key_data``.
* ``manifest.json``: the format version, the step, the user's metadata, the size and
  SHA-256 of ``arrays.npz``, every leaf's key path, dtype, shape and SHA-256, and (format 2)
  the manifest's own SHA-256, ``manifest_sha256``, taken over its canonical JSON (sorted
  keys, no spaces) without that field. Format 1, without it, is still read.

Writing. ``save`` writes both files into a temporary folder, fsyncs them and the folder,
renames it to its final name and fsyncs ``directory``. A final name is only ever created by
renaming a complete folder, so a process killed at any moment leaves every earlier
checkpoint intact, and a ``step_*`` folder that is not complete (its manifest missing or
edited) is damage: reading it is an error naming the step, never a silent fall-back to an
older step. ``overwrite=True`` swaps the new folder and the old one in one atomic exchange
(Linux ``renameat2``), then deletes the old one, so a reader always finds one of the two
complete. Where the exchange is missing it moves the old folder aside (``.old_step_*``),
renames the new one into place, and only then deletes the old one: for that moment the step
is absent, and a process killed between the two renames leaves the old copy aside, which the
next :class:`CheckpointManager` puts back. A reader whose step was overwritten while it read
reads it again.

Sharing a directory. Several processes (and hosts) may read and write one directory. Every
name that is not final carries its owner, ``{host}_{pid}_{8 random hex digits}``:

* ``.tmp_step_{s:08d}_{owner}``: a save being written;
* ``.old_step_{s:08d}_{owner}``: the previous copy during ``overwrite=True``;
* ``.tmp_delete_step_{s:08d}_{owner}``: a folder being deleted.

``host`` is the machine's name, plus its boot id and pid namespace on Linux (machines and
containers may share a name, and pids mean something only inside one namespace). A process
deletes only its own folders, and a :class:`CheckpointManager` on construction deletes
*stale* ones: those of a pid on this host that is no longer alive, and those of any host
(and any ``.tmp*`` name without an owner) not modified for :data:`STALE_AGE_S`. A live
writer's are never touched. Two writers of one step: the first rename wins and the other
gets a :class:`CheckpointError`. Deleting what another process deleted first is a no-op, so
concurrent ``keep_last`` pruning is safe.

Across processes (``parallel.initialize``), every process calls ``save``; each writes the
shards it holds (those with ``replica_id`` 0, so each element once; values that do not span
processes are written by process 0) into its own ``part_{process:05d}.npz``, with no gather
to one host. Only when every part is complete does process 0 write the manifest (format 3:
each leaf's pieces with their bounds and SHA-256, each part file's size and SHA-256) and
rename the folder, so a process killed mid-save leaves the earlier steps intact. Any process
count restores it, onto any mesh: each leaf is assembled from its pieces, then placed like
the target's leaf.

``restore`` checks the checksums and, given a ``target`` tree, its structure, shapes and
dtypes (without one, the manifest's dtypes against the stored arrays): every problem is a
:class:`CheckpointError` that names the key path, never a silently wrong tree.

Examples:
  >>> import jax, jax.numpy as jnp, tempfile
  >>> from funtrain.train import checkpoint
  >>> d = tempfile.mkdtemp()
  >>> _ = checkpoint.save(d, {"w": jnp.ones(3, jnp.bfloat16)}, step=10)
  >>> checkpoint.latest_step(d)
  10
  >>> checkpoint.restore(d, target={"w": jnp.zeros(3, jnp.bfloat16)})["w"].dtype
  dtype(bfloat16)
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from funtrain._tree import keystr
from funtrain.optim.fused import fuse_like, has_fused, unfuse, unfuse_on_host, unfuse_spec

__all__ = ["CheckpointError", "CheckpointManager", "save", "restore", "latest_step",
           "all_steps", "read_manifest", "step_dir"]

PathLike = str | os.PathLike
ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # one process; 2 adds manifest_sha256 to format 1
PARTS_FORMAT = 3  # several processes: a part file per process (see save)
KNOWN_FORMATS = (1, 2, 3)  # manifest formats restore can read
PART = "part_{:05d}"  # part_00000.npz: what process 0 stored
STALE_AGE_S = 24 * 3600  # a leftover whose owner cannot be checked is stale after this
_STEP_RE = re.compile(r"step_(\d{8,})")
_OWNED_RE = re.compile(r"\.(?P<kind>tmp|old|tmp_delete)_step_(?P<step>\d{8,})_"
                       r"(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)_(?P<rand>[0-9a-f]{8})")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match the target tree."""


# ----------------------------------------------------------------------------- helpers


def step_dir(directory: PathLike, step: int) -> Path:
    """The final folder of ``step``: ``directory/step_{step:08d}``."""
    return Path(directory) / f"step_{_checked_step(step):08d}"


def _checked_step(step: Any) -> int:
    dtype = getattr(step, "dtype", None)
    ok = (isinstance(step, (int, np.integer)) and not isinstance(step, bool)) or (
        dtype is not None and np.ndim(step) == 0 and jnp.issubdtype(dtype, jnp.integer))
    if not ok or int(step) < 0:
        raise TypeError(f"checkpoint: step must be a non-negative integer, got {step!r}")
    return int(step)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_array(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
                          ).hexdigest()


def _manifest_sha256(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) without this field,
    so that rewriting the file with other whitespace keeps it valid."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _key_component(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_native(dtype: np.dtype) -> bool:
    """Whether ``np.savez``/``np.load`` store ``dtype`` as is (not an ml_dtypes type)."""
    return dtype.kind in "biufc" and dtype.type.__module__ == "numpy"


def _dtype_from_name(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))


_SCALARS = {"bool": bool, "int": int, "float": float, "complex": complex}


def _describe(leaf: Any) -> tuple[str, str, tuple[int, ...]]:
    """``(kind, dtype name, shape)`` of a leaf, as stored in the manifest."""
    if isinstance(leaf, (bool, int, float, complex)) and not isinstance(leaf, np.generic):
        # a subclass (an IntEnum, say) is stored, and restored, as its base type
        base = next(t for t in (bool, int, float, complex) if isinstance(leaf, t))
        if isinstance(leaf, int) and base is int and not -2 ** 63 <= leaf < 2 ** 64:
            raise TypeError(f"a Python int outside the 64-bit range: {leaf}")
        return "scalar", base.__name__, ()
    if _is_key(leaf):
        return "key", str(leaf.dtype), tuple(leaf.shape)
    if isinstance(leaf, (np.ndarray, np.generic)):
        dtype = np.dtype(leaf.dtype)  # ml_dtypes (bfloat16, int4 ...) are kind V too
        if dtype.kind in "OSU" or dtype.kind == "V" and dtype.type.__module__ == "numpy":
            raise TypeError(f"a numpy array of dtype {leaf.dtype} (strings, objects and "
                            f"records cannot be restored; keep them out of the state)")
        return "numpy", np.dtype(leaf.dtype).name, tuple(leaf.shape)
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # jax.Array, ShapeDtypeStruct
        return "array", np.dtype(leaf.dtype).name, tuple(leaf.shape)
    raise TypeError(f"not an array, PRNG key or Python scalar: {type(leaf).__name__}")


def _flatten(tree: Any) -> tuple[list[dict[str, Any]], list[Any], Any]:
    """Leaves with their key paths (``"a/b"`` and components), and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    entries, seen = [], set()
    for path, _ in flat:
        entry = {"path": keystr(path), "keys": [_key_component(k) for k in path]}
        if entry["path"] in seen:
            raise CheckpointError(f"key path {entry['path']!r} appears twice in the tree "
                                  f"(keys that print the same); rename one of them")
        seen.add(entry["path"])
        entries.append(entry)
    return entries, [leaf for _, leaf in flat], treedef


# ----------------------------------------------------------------------------- owners


def _host_tag() -> str:
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "localhost"
    try:  # pids are comparable only inside one boot and pid namespace; names repeat
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{name}-{boot}-pidns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


_HOST = _host_tag()


def _owned_name(directory: Path, kind: str, step: int) -> Path:
    """A new folder name of ``kind`` (``tmp``, ``old``, ``tmp_delete``) owned by this
    process: ``.{kind}_step_{step:08d}_{host}_{pid}_{random}``."""
    rand = uuid.uuid4().hex[:8]
    return directory / f".{kind}_step_{step:08d}_{_HOST}_{os.getpid()}_{rand}"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix" or not 0 < pid < 2 ** 31:
        return True  # cannot tell: only the age rule applies
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(path: Path, owner: re.Match[str] | None) -> bool:
    """Whether a leftover's writer is gone: a dead pid on this host, or (any host, or no
    owner in the name) not modified for ``STALE_AGE_S``."""
    if owner is not None and owner["host"] == _HOST and not _pid_alive(int(owner["pid"])):
        return True
    return time.time() - _mtime(path) > STALE_AGE_S  # gone (mtime 0): removing is a no-op


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_collision(e: BaseException) -> bool:
    """Whether a rename failed because its destination exists (another writer's)."""
    return isinstance(e, FileExistsError) or (
        isinstance(e, OSError) and e.errno == errno.ENOTEMPTY)


def _remove(path: Path, step: int) -> None:
    """Delete a checkpoint folder (or an old copy): rename it to a ``.tmp_delete`` name
    first, so a process killed mid-delete never leaves a half-deleted folder under a name
    that is read or put back. A folder another process removed first is no concern."""
    trash = _owned_name(path.parent, "tmp_delete", step)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _recover(directory: Path) -> None:
    """Put back the old copies of overwrites killed between their two renames, then delete
    the other stale leftovers. Only stale folders are touched (see the module docstring)."""
    olds: list[tuple[Path, Any]] = []
    others: list[tuple[Path, Any]] = []
    for path in _children(directory):
        owner = _OWNED_RE.fullmatch(path.name)
        if not path.name.startswith(".tmp") and not (owner and owner["kind"] == "old"):
            continue  # not ours
        if path.is_dir() and _is_stale(path, owner):
            (olds if owner and owner["kind"] == "old" else others).append((path, owner))
    for path, owner in sorted(olds, key=lambda po: _mtime(po[0]), reverse=True):
        _put_back(path, int(owner["step"]))  # the newest copy of a step wins
    for path, _ in others:
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _put_back(old: Path, step: int) -> None:
    """Rename a stale old copy back to its final name if that is free, else delete it."""
    final = step_dir(old.parent, step)
    if not final.exists():
        try:
            os.rename(old, final)
            _fsync_dir(old.parent)
            return
        except FileNotFoundError:
            return  # another process put it back or removed it first
        except OSError as e:
            if not _is_collision(e):
                raise
    _remove(old, step)  # a complete final folder is there already


# ----------------------------------------------------------------------------- save


def _info(path: str, leaf: Any) -> tuple[dict[str, Any], Any]:
    """A leaf's manifest entry (kind, dtype, shape, ...) and the value to store: the leaf,
    or a PRNG key's ``key_data``."""
    try:
        kind, dtype, shape = _describe(leaf)
    except TypeError as e:
        raise TypeError(f"checkpoint.save: key path {path!r}: {e}") from None
    info: dict[str, Any] = {"kind": kind, "dtype": dtype, "shape": list(shape)}
    if kind == "key":
        info["impl"] = str(jax.random.key_impl(leaf))
        return info, jax.random.key_data(leaf)
    return info, leaf


def _storable(value: Any) -> np.ndarray:
    """``value`` on the host as numpy can store it: dtypes numpy cannot store (bfloat16,
    float8_*, int4 ...) as an unsigned view of their bytes."""
    stored = np.asarray(value)
    if not stored.dtype.isnative:  # big-endian ">f4": the manifest names "float32"
        stored = stored.astype(stored.dtype.newbyteorder("="))
    if _is_native(stored.dtype):
        return stored
    # ascontiguousarray makes a 0-d array 1-d: reshape it back
    return np.ascontiguousarray(stored).view(f"uint{stored.dtype.itemsize * 8}") \
        .reshape(stored.shape)


def _encode(path: str, leaf: Any) -> tuple[dict[str, Any], np.ndarray]:
    """A leaf's manifest entry and the array stored for it."""
    info, value = _info(path, leaf)
    stored = _storable(value)
    info["stored_dtype"] = stored.dtype.name
    info["sha256"] = _sha256_array(stored)
    return info, stored


def save(directory: PathLike, state: Any, step: Any, metadata: Any = None, *,
         overwrite: bool = False) -> Path:
    """Write ``state`` as the checkpoint of ``step``, atomically.

    Args:
      directory: the checkpoint folder (created if missing).
      state: any pytree of arrays, typed PRNG keys and Python scalars (``None`` is an
        empty subtree), e.g. a ``TrainState``.
      step: a non-negative integer (or 0-d integer array such as ``state.step``).
      metadata: anything JSON-serializable, kept in the manifest (see :func:`read_manifest`).
      overwrite: replace an existing checkpoint of ``step`` instead of raising. Readers see
        the old or the new checkpoint, never neither (see the module docstring).

    Returns:
      the final folder, ``directory/step_{step:08d}``.

    Raises:
      CheckpointError: the step exists (without ``overwrite``), or another process saved
        the same step first (the first rename wins; this save is discarded).

    Examples:
      >>> import jax.numpy as jnp, tempfile
      >>> save(tempfile.mkdtemp(), {"w": jnp.zeros(2)}, 3).name
      'step_00000003'
    """
    step = _checked_step(step)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():  # before anything is written
        raise CheckpointError(f"checkpoint.save: {str(directory)!r} is a file, not a folder; "
                              f"give a folder for the checkpoints")
    final = step_dir(directory, step)
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint.save: metadata must be JSON-serializable: {e}") from None
    if jax.process_count() > 1:
        return _save_parts(directory, state, step, metadata, overwrite)
    if final.exists() and not overwrite:
        raise CheckpointError(f"checkpoint.save: {final} already exists; pass overwrite=True "
                              f"to replace it")

    entries, leaves, _ = _flatten(unfuse_on_host(state))  # fused buffers stored as leaves
    specs = jax.tree.leaves(unfuse_spec(state))  # a fused leaf: a ShapeDtypeStruct
    arrays = {}
    for i, (entry, leaf) in enumerate(zip(entries, leaves, strict=True)):
        info, arrays[str(i)] = _encode(entry["path"], leaf)
        if isinstance(specs[i], jax.ShapeDtypeStruct):  # a view of its buffer here, but
            info["kind"] = "array"  # a jax.Array where it restores unfused
        entry.update(info, name=str(i))

    directory.mkdir(parents=True, exist_ok=True)
    tmp = _owned_name(directory, "tmp", step)
    tmp.mkdir()
    try:
        _write(tmp, arrays, {"format": FORMAT_VERSION, "step": step, "metadata": metadata,
                             "leaves": entries})
        _publish(tmp, final, step, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own; already gone once published
        raise
    return final


def _write(folder: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Write and fsync ``arrays.npz``, then the manifest with the file's checksums and its
    own."""
    with open(folder / ARRAYS, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: a name could be allow_pickle
        f.flush()
        os.fsync(f.fileno())
    manifest = {**manifest, "arrays_sha256": _sha256_file(folder / ARRAYS),
                "arrays_bytes": (folder / ARRAYS).stat().st_size}
    manifest = json.loads(json.dumps(manifest))  # as a reader sees it: string keys, lists
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _publish(tmp: Path, final: Path, step: int, overwrite: bool) -> None:
    """Rename the complete folder ``tmp`` to ``final``. With ``overwrite``, swap it with the
    old final folder atomically where the OS can; else move the old one aside first and
    delete it only once the new one is in place (at every moment the step is complete under
    its final name or, old copy, aside)."""
    if overwrite and _exchange(tmp, final):
        _fsync_dir(final.parent)
        _remove(tmp, step)  # our temporary name now holds the old copy
        return
    aside = _move_aside(final, step) if overwrite else None
    try:
        os.rename(tmp, final)
    except BaseException as e:
        collided = _is_collision(e)
        if aside is not None:  # back in place, or deleted if another writer's copy is there
            _put_back(aside, step)
        if collided:
            raise CheckpointError(
                f"checkpoint.save: another writer saved step {step} in {final.parent} first; "
                f"this save of it was discarded (the first to finish a step wins)") from None
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        _remove(aside, step)


def _move_aside(final: Path, step: int) -> Path | None:
    """Rename an existing final folder to an ``.old_step_*`` name owned by this process."""
    if not final.exists():
        return None
    aside = _owned_name(final.parent, "old", step)
    try:
        os.utime(final)  # its age counts from now, so no one takes it for a stale copy
        os.rename(final, aside)
    except FileNotFoundError:
        return None  # another process removed it meanwhile
    return aside


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one atomic step; ``False`` where the OS, the file system
    or a vanished ``b`` does not allow it (the caller then renames in two steps)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ----------------------------------------------------------------------------- across processes
# With several processes (``parallel.initialize``) every process calls ``save``. Each writes
# the pieces it holds into its own part file; only process 0 writes the manifest and
# renames the folder, after all parts are complete. The phases are kept in step with a
# collective (``process_allgather``), so an error anywhere fails the save everywhere, and a
# process killed mid-save leaves no final folder: the earlier checkpoints stay intact, and
# the temporary folder is deleted as stale by the next ``CheckpointManager``.


def _agree(ok: bool, step: int, what: str) -> None:
    """A barrier that also tells every process whether all of them succeeded."""
    from jax.experimental import multihost_utils

    try:
        oks = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
    except Exception as e:  # gloo/NCCL: a peer died or hung up mid-save
        raise CheckpointError(f"checkpoint.save: step {step}: lost contact with the other "
                              f"processes before all could {what} ({type(e).__name__}: {e}); "
                              f"the step was not saved (earlier steps are intact)") from None
    if not oks.all():
        failed = ", ".join(map(str, np.flatnonzero(oks == 0)))
        raise CheckpointError(f"checkpoint.save: step {step}: process {failed} could not "
                              f"{what}, so the step was not saved (earlier steps are intact)")


def _phase(step: int, what: str, fn: Any) -> Any:
    """``fn()`` in every process, then ``_agree``: a process's own error is raised there,
    the others get a ``CheckpointError`` naming it."""
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, e
    try:
        _agree(error is None, step, what)
    except CheckpointError:
        if error is not None:
            raise error from None
        raise
    return result


def _broadcast_name(name: str) -> str:
    """Process 0's ``name`` in every process."""
    from jax.experimental import multihost_utils

    raw = np.zeros(512, np.uint8)
    raw[:len(name.encode())] = np.frombuffer(name.encode(), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).rstrip(b"\0").decode()


def _pieces(value: Any, me: int) -> list[tuple[list[list[int]], np.ndarray]]:
    """The pieces of one leaf this process stores, as ``(index bounds, array)``: for an
    array over several processes, the shards it holds with ``replica_id`` 0 (so every
    element is stored once); anything else whole, by process 0."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return [([list(s.indices(n)[:2]) for s, n in zip(shard.index, value.shape,
                                                          strict=True)], _storable(shard.data))
                for shard in value.addressable_shards if shard.replica_id == 0]
    return [([[0, n] for n in np.shape(value)], _storable(value))] if me == 0 else []


def _stored_dtype(value: Any) -> str:
    dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
    return dtype.name if _is_native(dtype) else f"uint{dtype.itemsize * 8}"


def _write_part(folder: Path, me: int, entries: list[dict[str, Any]], values: list[Any]
                ) -> None:
    """This process's pieces: ``part_{me}.npz``, then ``part_{me}.json`` listing them with
    their bounds and SHA-256, and the file's size and SHA-256."""
    arrays: dict[str, np.ndarray] = {}
    pieces: dict[str, list[dict[str, Any]]] = {}
    for i, value in enumerate(values):
        for k, (index, array) in enumerate(_pieces(value, me)):
            name = f"{i}.{k}"
            arrays[name] = array
            pieces.setdefault(str(i), []).append(
                {"part": me, "name": name, "index": index, "sha256": _sha256_array(array)})
    npz = folder / f"{PART.format(me)}.npz"
    with open(npz, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # (as in _write)
        f.flush()
        os.fsync(f.fileno())
    listing = {"pieces": pieces, "bytes": npz.stat().st_size, "sha256": _sha256_file(npz)}
    with open(folder / f"{PART.format(me)}.json", "w") as f:
        json.dump(listing, f)
        f.flush()
        os.fsync(f.fileno())


def _merge_parts(folder: Path, processes: int, entries: list[dict[str, Any]], step: int,
                 metadata: Any) -> None:
    """Process 0: the manifest, from every process's listing (then deleted)."""
    parts = []
    for entry in entries:
        entry["pieces"] = []
    for j in range(processes):
        listing_path = folder / f"{PART.format(j)}.json"
        listing = json.loads(listing_path.read_text())
        parts.append({"file": f"{PART.format(j)}.npz", "bytes": listing["bytes"],
                      "sha256": listing["sha256"]})
        for i, pieces in listing["pieces"].items():
            entries[int(i)]["pieces"].extend(pieces)
    manifest = {"format": PARTS_FORMAT, "step": step, "metadata": metadata,
                "processes": processes, "parts": parts, "leaves": entries}
    manifest = json.loads(json.dumps(manifest))
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for j in range(processes):
        (folder / f"{PART.format(j)}.json").unlink()
    _fsync_dir(folder)


def _save_parts(directory: Path, state: Any, step: int, metadata: Any, overwrite: bool
                ) -> Path:
    """``save`` with several processes (format 3): see the comment above."""
    me, processes = jax.process_index(), jax.process_count()
    final = step_dir(directory, step)
    entries, leaves, _ = _flatten(unfuse(state) if has_fused(state) else state)
    values = []
    for i, (entry, leaf) in enumerate(zip(entries, leaves, strict=True)):
        info, value = _info(entry["path"], leaf)
        entry.update(info, name=str(i), stored_dtype=_stored_dtype(value),
                     stored_shape=list(np.shape(value)))
        values.append(value)

    def create() -> str:
        if me != 0:
            return ""
        if final.exists() and not overwrite:
            raise CheckpointError(f"checkpoint.save: {final} already exists; pass "
                                  f"overwrite=True to replace it")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = _owned_name(directory, "tmp", step)
        tmp.mkdir()
        return tmp.name

    tmp = directory / _broadcast_name(_phase(step, "create its temporary folder", create))
    try:
        _phase(step, "write its part", lambda: _write_part(tmp, me, entries, values))
        def publish() -> None:
            if me == 0:
                _merge_parts(tmp, processes, entries, step, metadata)
                _publish(tmp, final, step, overwrite)

        _phase(step, "publish it", publish)
    except BaseException:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # our own; already gone once published
        raise
    return final


# ----------------------------------------------------------------------------- listing


def all_steps(directory: PathLike) -> list[int]:
    """Sorted steps that have a final folder ``step_XXXXXXXX``, as ``step_dir`` names it
    (``.tmp*``, ``.old*`` and other names are ignored); ``[]`` when ``directory`` does not
    exist.

    A final folder is only ever created by renaming a complete one, so every listed step
    is complete unless it was damaged since; reading a damaged one is an error that says
    so (it is listed, so that it is never skipped in silence)."""
    steps = []
    for child in _children(Path(directory)):
        m = _STEP_RE.fullmatch(child.name)
        # the name step_dir gives only (step_000000010 is no folder restore would open)
        if m and child.name == step_dir(directory, int(m.group(1))).name and child.is_dir():
            steps.append(int(m.group(1)))  # (is_dir: False when it vanished meanwhile)
    return sorted(steps)


def latest_step(directory: PathLike) -> int | None:
    """The highest step in ``directory``, or ``None`` when there is none."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _resolve_step(directory: PathLike, step: Any, where: str) -> int:
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(f"{where}: no checkpoint in {directory} (no step_* folder)")
    return _checked_step(step)


def _damaged(directory: PathLike, step: int, problem: str) -> CheckpointError:
    """The error for a final folder that is not a complete checkpoint."""
    folder = step_dir(directory, step)
    others = [s for s in all_steps(directory) if s != step]
    earlier = [s for s in others if s < step] or others
    fix = (f"restore another step with step={earlier[-1]} or delete the folder {folder}"
           if others else f"delete the folder {folder}")
    return CheckpointError(f"checkpoint of step {step} in {directory} is damaged: {problem}; "
                           f"{fix}")


def _missing(directory: PathLike, step: int) -> CheckpointError:
    folder = step_dir(directory, step)
    hint = ""
    for child in _children(Path(directory)):
        owner = _OWNED_RE.fullmatch(child.name)
        if owner and owner["kind"] == "old" and int(owner["step"]) == step:
            hint = (f"; its previous copy is aside ({child.name}), from an overwrite in "
                    f"progress or interrupted: read again, or CheckpointManager("
                    f"{str(directory)!r}) puts it back once its writer is gone (another "
                    f"host's after STALE_AGE_S)")
            break
    return CheckpointError(f"checkpoint: no checkpoint of step {step}: {folder} does not "
                           f"exist (steps present: {all_steps(directory)}){hint}")


def read_manifest(directory: PathLike, step: Any = None) -> dict[str, Any]:
    """The manifest of ``step`` (default: latest) as a dict: ``format``, ``step``,
    ``metadata``, ``leaves`` (key path, dtype, shape ...) and checksums.

    Raises:
      CheckpointError: no such step, or its manifest is missing, malformed or fails its
        own checksum (the message names the step and another step to restore)."""
    step = _resolve_step(directory, step, "checkpoint.read_manifest")
    path = step_dir(directory, step) / MANIFEST
    if not path.parent.is_dir():
        raise _missing(directory, step)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if not path.parent.is_dir():  # pruned or overwritten meanwhile
            raise _missing(directory, step) from None
        raise _damaged(directory, step, f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as e:
        raise _damaged(directory, step, f"{MANIFEST} is unreadable or malformed "
                                        f"({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in KNOWN_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if isinstance(manifest, dict) and "manifest_sha256" in manifest and \
                manifest["manifest_sha256"] != _manifest_sha256(manifest):  # a flipped format
            raise _damaged(directory, step, f"{MANIFEST} has format {found!r} and does not "
                                            f"match its own checksum (manifest_sha256): it "
                                            f"was edited or corrupted")
        raise CheckpointError(f"checkpoint: {path} has format {found!r}; this funtrain reads "
                              f"formats {', '.join(map(str, KNOWN_FORMATS))}. It was written "
                              f"by another version of funtrain: restore it with that version")
    if manifest["format"] >= 2 and manifest.get("manifest_sha256") != _manifest_sha256(manifest):
        raise _damaged(directory, step, f"{MANIFEST} does not match its own checksum "
                                        f"(manifest_sha256): it was edited or corrupted")
    try:
        _ = manifest["step"]
        parts = manifest["format"] >= PARTS_FORMAT
        if parts:
            for part in manifest["parts"]:
                _ = part["file"], part["bytes"], part["sha256"]
        else:
            _ = manifest["arrays_sha256"], manifest["arrays_bytes"]
        for leaf in manifest["leaves"]:
            _ = leaf["path"], leaf["keys"], leaf["name"], leaf["kind"], leaf["dtype"]
            _ = leaf["shape"], leaf["stored_dtype"]
            if parts:
                _ = leaf["stored_shape"], [(p["part"], p["name"], p["index"], p["sha256"])
                                           for p in leaf["pieces"]]
            else:
                _ = leaf["sha256"]
    except (KeyError, TypeError) as e:
        raise _damaged(directory, step, f"{MANIFEST} is unreadable or malformed "
                                        f"({type(e).__name__}: {e})") from None
    if manifest["step"] != step:
        raise CheckpointError(f"checkpoint: {path} says step {manifest['step']}, but its "
                              f"folder is step {step}")
    return manifest


# ----------------------------------------------------------------------------- restore


def _load_arrays(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every stored array by name, after checking the file's size and SHA-256, and that it
    holds exactly the manifest's arrays (each array's own SHA-256 is checked by
    ``_decode``); for a checkpoint saved across processes, each leaf assembled from its
    pieces in the part files."""
    if manifest["format"] >= PARTS_FORMAT:
        return _assemble(folder, manifest)
    return _read_arrays(folder / ARRAYS, manifest["arrays_bytes"], manifest["arrays_sha256"],
                        manifest["leaves"])


def _read_arrays(path: Path, expected_size: int, expected_sha256: str,
                 listed: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` file, which must have this size and SHA-256 and hold
    exactly the ``listed`` arrays (entries with ``name``, ``sha256`` and key ``path``)."""
    try:  # one open file: a folder renamed or deleted meanwhile cannot swap it under us
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {path} is missing") from None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != expected_size:
                raise CheckpointError(f"checkpoint: {path} is truncated or corrupted: it has "
                                      f"{size} bytes, the manifest expects {expected_size}")
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            if h.hexdigest() != expected_sha256:
                raise _corrupted(path, listed)
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                _check_names(path, listed, npz.files)
                return {entry["name"]: npz[entry["name"]] for entry in listed}
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"checkpoint: {path} is truncated or unreadable "
                              f"({type(e).__name__}: {e})") from None


def _check_names(path: Path, listed: list[dict[str, Any]], names: list[str]) -> None:
    """The file must hold exactly the manifest's arrays: a dropped leaf entry (in a format 1
    manifest, which has no checksum of its own) must not go unnoticed."""
    wanted = {entry["name"] for entry in listed}
    problems = [f"key path {entry['path']!r}: array {entry['name']!r} is missing"
                for entry in listed if entry["name"] not in names]
    extra = sorted(set(names) - wanted, key=lambda n: (len(n), n))
    if extra:
        problems.append(f"arrays {', '.join(map(repr, extra))} are not in the manifest (it "
                        f"lists {len(wanted)} leaves, the file holds {len(names)} arrays: "
                        f"leaf entries were dropped from it)")
    if problems:
        raise CheckpointError(f"checkpoint: {path} does not match its manifest: "
                              + "; ".join(problems))


def _corrupted(path: Path, listed: list[dict[str, Any]]) -> CheckpointError:
    """The error for an arrays file whose SHA-256 does not match: it names the damaged
    leaves' key paths, or says the file is corrupted when no array can be blamed."""
    damaged = _damaged_leaves(path, listed)
    if damaged:
        return CheckpointError(f"checkpoint: {path} is corrupted (checksum mismatch): the "
                               f"arrays of key paths {', '.join(map(repr, damaged))} are "
                               f"damaged")
    return CheckpointError(f"checkpoint: {path} is corrupted: its SHA-256 does not match the "
                           f"manifest's (checksum mismatch), and no single array can be "
                           f"blamed (the damage is in the zip file's structure)")


def _damaged_leaves(path: Path, listed: list[dict[str, Any]]) -> list[str]:
    """Key paths whose array does not read back (zip CRC, npy header) or fails its own
    SHA-256; ``[]`` when the file cannot be opened at all."""
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception:  # an unreadable zip directory: no single array to blame
        return []
    damaged = []
    with npz:
        for entry in listed:
            try:
                intact = _sha256_array(npz[entry["name"]]) == entry["sha256"]
            except Exception:  # any failure to read it back means its bytes are damaged
                intact = False
            if not intact and entry["path"] not in damaged:
                damaged.append(entry["path"])
    return damaged


def _assemble(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each leaf of a checkpoint saved across processes, assembled on the host from its
    pieces (every part file is read and checked, so any process count can restore it)."""
    listed: list[list[dict[str, Any]]] = [[] for _ in manifest["parts"]]
    for leaf in manifest["leaves"]:
        for piece in leaf["pieces"]:
            listed[piece["part"]].append({**piece, "path": leaf["path"]})
    out = {leaf["name"]: np.empty(leaf["stored_shape"], leaf["stored_dtype"])
           for leaf in manifest["leaves"]}
    written = {name: np.zeros(a.shape, bool) for name, a in out.items()}  # coverage
    paths = {leaf["name"]: leaf["path"] for leaf in manifest["leaves"]}
    for part, pieces in zip(manifest["parts"], listed, strict=True):
        path = folder / part["file"]
        arrays = _read_arrays(path, part["bytes"], part["sha256"], pieces)
        for piece in pieces:
            leaf_name = piece["name"].split(".")[0]
            array = arrays[piece["name"]]
            where = tuple(slice(a, b) for a, b in piece["index"])
            dest = out[leaf_name]
            if _sha256_array(array) != piece["sha256"] or dest[where].shape != array.shape:
                raise CheckpointError(f"checkpoint: key path {paths[leaf_name]!r}: a piece in "
                                      f"{path} is corrupted (checksum or shape mismatch)")
            if written[leaf_name][where].any():
                raise CheckpointError(f"checkpoint: key path {paths[leaf_name]!r}: two "
                                      f"pieces overlap at {piece['index']}")
            dest[where] = array
            written[leaf_name][where] = True
    for name, mask in written.items():
        if not mask.all():
            raise CheckpointError(f"checkpoint: key path {paths[name]!r}: its pieces leave "
                                  f"{int((~mask).sum())} of its {mask.size} elements unwritten")
    return out


def _stored_as(leaf: dict[str, Any], stored: np.dtype) -> bool:
    """Whether the manifest's dtype agrees with the stored one: equal, the unsigned view of
    a dtype numpy cannot store, or (a key) unsigned key data."""
    kind, name = leaf["kind"], leaf["dtype"]
    if kind == "key":
        return stored.kind == "u"  # wrap_key_data checks the rest against the impl
    if kind == "scalar":
        return stored.kind in {"bool": "b", "int": "iu", "float": "f",
                               "complex": "c"}.get(name, "")
    try:
        dtype = _dtype_from_name(name)
    except (TypeError, ValueError):
        return False
    stored = stored.newbyteorder("=")  # byte order aside (stored by an older funtrain)
    return stored == (dtype if _is_native(dtype) else np.dtype(f"uint{dtype.itemsize * 8}"))


def _decode(leaf: dict[str, Any], stored: np.ndarray) -> Any:
    """Rebuild one leaf from its stored array, checking it against its manifest entry."""
    path = leaf["path"]
    if stored.dtype.name != leaf["stored_dtype"]:
        raise CheckpointError(f"checkpoint: key path {path!r}: stored dtype "
                              f"{stored.dtype.name}, the manifest says {leaf['stored_dtype']}")
    if "sha256" in leaf and _sha256_array(stored) != leaf["sha256"]:  # pieces: in _assemble
        raise CheckpointError(f"checkpoint: key path {path!r}: array is corrupted "
                              f"(checksum mismatch)")
    if not _stored_as(leaf, stored.dtype):
        raise CheckpointError(f"checkpoint: key path {path!r}: the manifest says dtype "
                              f"{leaf['dtype']}, but the array is stored as "
                              f"{stored.dtype.name}; the manifest was edited or damaged")
    if not stored.dtype.isnative:  # big-endian bytes (an older funtrain stored them so)
        stored = stored.astype(stored.dtype.newbyteorder("="))
    shape = tuple(leaf["shape"])
    kind = leaf["kind"]
    try:
        if kind == "key":
            value = jax.random.wrap_key_data(jnp.asarray(stored), impl=leaf["impl"])
        elif kind == "scalar":
            value = _SCALARS[leaf["dtype"]](stored.item())
        else:
            dtype = _dtype_from_name(leaf["dtype"])
            arr = stored if stored.dtype == dtype else stored.view(dtype)
            value = arr if kind == "numpy" else jnp.asarray(arr)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint: key path {path!r}: cannot rebuild a {kind} leaf "
                              f"of dtype {leaf['dtype']} ({type(e).__name__}: {e})") from None
    if tuple(np.shape(value)) != shape:
        raise CheckpointError(f"checkpoint: key path {path!r}: stored shape "
                              f"{tuple(np.shape(value))}, the manifest says {shape}")
    return value


def _in_order(leaves: list[dict[str, Any]], wanted: list[str]) -> list[dict[str, Any]]:
    """The saved leaves in the target's order when both hold the same key paths: a pytree
    whose flattening order changed (loss scales, now chex dataclasses, flatten their fields
    by name) still restores, since leaves are matched by key path."""
    by_path = {leaf["path"]: leaf for leaf in leaves}
    if len(by_path) == len(leaves) == len(wanted) and set(by_path) == set(wanted):
        return [by_path[path] for path in wanted]
    return leaves


def _check_against_target(leaves: list[dict[str, Any]], entries: list[dict[str, Any]],
                          target_leaves: list[Any]) -> None:
    saved = {leaf["path"]: leaf for leaf in leaves}
    wanted = [e["path"] for e in entries]
    if [leaf["path"] for leaf in leaves] != wanted:
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        parts = ["checkpoint.restore: the checkpoint does not match the structure of target."]
        if missing:
            parts.append(f"Missing key paths in the checkpoint: {', '.join(missing)}.")
        if extra:
            parts.append(f"Extra key paths in the checkpoint: {', '.join(extra)}.")
        if not missing and not extra:
            parts.append("Same key paths in a different order.")
        raise CheckpointError(" ".join(parts))
    problems = []
    for path, t in zip(wanted, target_leaves, strict=True):
        try:
            _, dtype, shape = _describe(t)
        except TypeError as e:
            raise TypeError(f"checkpoint.restore: target key path {path!r}: {e}") from None
        leaf = saved[path]
        if tuple(leaf["shape"]) != shape:
            problems.append(f"key path {path!r}: checkpoint has shape "
                            f"{tuple(leaf['shape'])}, target expects {shape}")
        elif leaf["dtype"] != dtype:
            problems.append(f"key path {path!r}: checkpoint has dtype {leaf['dtype']}, "
                            f"target expects {dtype}")
    if problems:
        count = "1 leaf does" if len(problems) == 1 else f"{len(problems)} leaves do"
        raise CheckpointError(f"checkpoint.restore: {count} not match the target: "
                              + "; ".join(problems))


def _nested(manifest: dict[str, Any], values: list[Any]) -> Any:
    if len(values) == 1 and not manifest["leaves"][0]["keys"]:
        return values[0]  # the state was a single leaf
    out: dict[str, Any] = {}
    for leaf, value in zip(manifest["leaves"], values, strict=True):
        node = out
        for k in leaf["keys"][:-1]:
            node = node.setdefault(k, {})
        node[leaf["keys"][-1]] = value
    return out


def restore(directory: PathLike, target: Any = None, step: Any = None) -> Any:
    """Read a checkpoint back, verifying every checksum.

    Args:
      directory: the checkpoint folder.
      target: a tree like the saved state (a fresh ``TrainState``, or one of
        ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``). Its structure, and each leaf's
        shape and dtype, must match the checkpoint; the result has its structure.
        A leaf sharded over several devices (``parallel.shard_state``) is restored with
        its sharding, so a checkpoint saved on one mesh restores onto another.
        ``None`` returns nested dicts keyed by the key path components.
      step: which step (default: the latest).

    Returns:
      the restored tree: jax arrays (numpy arrays where numpy was saved or the target leaf
      is numpy), typed PRNG keys and Python scalars.

    Raises:
      CheckpointError: a missing step; a damaged step (its manifest missing, malformed or
        failing its own checksum: the message names the step and another one to restore);
        a missing, truncated or corrupted arrays file (checksum mismatch: the message names
        the damaged key paths); arrays that do not match the manifest (missing or extra
        arrays, a dtype the stored array contradicts); or a structure, shape or dtype
        mismatch with ``target``. The message names the key path.

    Examples:
      >>> import jax.numpy as jnp, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = save(d, {"a": {"b": jnp.arange(2)}}, 1)
      >>> restore(d)["a"]["b"].tolist()
      [0, 1]
    """
    step = _resolve_step(directory, step, "checkpoint.restore")
    if has_fused(target):  # stored as leaves: restore those, then pack them like target
        packed = fuse_like(restore(directory, unfuse_spec(target), step), target)
        # the leaves were saved from host copies: the buffers go where target's are
        return jax.tree.map(_buffer_like, packed, target)
    manifest = read_manifest(directory, step)
    leaves = manifest["leaves"]
    if target is not None:
        entries, target_leaves, treedef = _flatten(target)
        leaves = _in_order(leaves, [e["path"] for e in entries])
        _check_against_target(leaves, entries, target_leaves)
    try:
        arrays = _load_arrays(step_dir(directory, step), manifest)
    except CheckpointError:
        if read_manifest(directory, step) == manifest:
            raise  # real damage, not an overwrite between our two reads
        return restore(directory, target, step)  # the step was overwritten: read it anew
    values = [_decode(leaf, arrays[leaf["name"]]) for leaf in leaves]
    if target is None:
        return _nested(manifest, values)
    values = [np.asarray(v) if isinstance(t, np.ndarray) and not isinstance(v, np.ndarray)
              else _placed_like(v, t) for v, t in zip(values, target_leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, values)


def _buffer_like(value: Any, target: Any) -> Any:
    """A restored fused buffer (numpy) as ``target``'s: a device array, placed like it."""
    if isinstance(value, np.ndarray) and not isinstance(target, np.ndarray):
        value = jnp.asarray(value)
    return _placed_like(value, target)


def _placed_like(value: Any, target: Any) -> Any:
    """``value`` with the target leaf's sharding when that spans several devices (a state
    placed by ``parallel.shard_state``, or a ``ShapeDtypeStruct`` given a sharding): a
    checkpoint restores onto any mesh, whatever mesh saved it. A target on one device other
    than the default one (``jax.device_put(x, jax.devices()[5])``) keeps that device. A
    weakly typed scalar (``inject_hyperparams``' values) stays weak: a jitted step would
    otherwise compile again for the restored state."""
    if getattr(target, "weak_type", False) and np.ndim(value) == 0:
        weak = jnp.asarray(np.asarray(value).item())  # a Python scalar's array is weak
        value = weak if weak.dtype == value.dtype else value
    sharding = getattr(target, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        from funtrain.parallel import _put  # across processes too

        return _put(value, sharding)
    if isinstance(sharding, jax.sharding.Sharding) and \
            sharding.device_set != {jax.devices()[0]}:
        return jax.device_put(value, sharding)
    return value


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves into one folder and keeps the ``keep_last`` newest checkpoints.

    Several managers, in several processes or on several hosts, may share the folder. On
    construction a manager puts back the old copy of any ``overwrite=True`` that was killed
    between its two renames, and deletes the stale leftovers of writers that are gone; it
    never touches a live writer's folders (the rule is in the module docstring). With
    ``keep_last``, each save then deletes the oldest steps in the folder, whoever wrote
    them (never the one just written); a step another process deleted first is skipped.

    Examples:
      >>> import jax.numpy as jnp, tempfile
      >>> m = CheckpointManager(tempfile.mkdtemp(), keep_last=2)
      >>> for s in range(4):
      ...     _ = m.save({"w": jnp.zeros(2)}, s)
      >>> m.all_steps()
      [2, 3]
    """

    def __init__(self, directory: PathLike, keep_last: int | None = None) -> None:
        if keep_last is not None and (isinstance(keep_last, (bool, np.bool_))
                                      or not isinstance(keep_last, (int, np.integer))
                                      or keep_last < 1):
            raise ValueError(f"CheckpointManager: keep_last must be a positive int or None, "
                             f"got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = None if keep_last is None else int(keep_last)
        if self.directory.exists() and not self.directory.is_dir():  # before any training
            raise CheckpointError(f"CheckpointManager: {str(self.directory)!r} is a file, "
                                  f"not a folder; give a folder for the checkpoints")
        if jax.process_index() == 0:  # with several processes, process 0 tidies up
            _recover(self.directory)

    def save(self, state: Any, step: Any, metadata: Any = None, *,
             overwrite: bool = False) -> Path:
        """:func:`save`, then delete the oldest checkpoints beyond ``keep_last`` (never the
        one just written)."""
        step = _checked_step(step)
        final = save(self.directory, state, step, metadata, overwrite=overwrite)
        if self.keep_last is not None and jax.process_index() == 0:
            for old in self.all_steps()[:-self.keep_last]:
                if old != step:
                    _remove(step_dir(self.directory, old), old)
        return final

    def latest_step(self) -> int | None:
        """The highest step, or ``None``."""
        return latest_step(self.directory)

    def all_steps(self) -> list[int]:
        """The steps, sorted (see :func:`all_steps`)."""
        return all_steps(self.directory)

    def restore(self, target: Any = None, step: Any = None) -> Any:
        """:func:`restore` from this manager's folder."""
        return restore(self.directory, target=target, step=step)

    def read_manifest(self, step: Any = None) -> dict[str, Any]:
        """:func:`read_manifest` from this manager's folder."""
        return read_manifest(self.directory, step)


# ----------------------------------------------------------------------------- fit's runs


def _order(shuffle: Any) -> str:
    return "not shuffled" if shuffle is None else f"shuffled with key data {shuffle}"


def _position_basis(data: Mapping[str, Any]) -> dict[str, Any]:
    """What the data position depends on, of a saved or current ``data`` basis."""
    return {k: data.get(k) for k in ("steps_per_epoch", "batch_size", "examples")}


class RunCheckpoints:
    """``fit``'s checkpoints: the ``TrainState``, and in the manifest's metadata (under
    ``"fit"``) what an exact resume needs besides it:

    - ``run_start``: the step the interrupted ``fit`` call started from (its ``epochs``
      count from there);
    - ``data``: the data position's basis (``steps_per_epoch``, ``batch_size``,
      ``examples``) and a ``Loader``'s shuffle key data (``shuffle``), checked on resume;
    - ``eval``: the run's evaluation records;
    - ``callbacks``: each callback's ``state_dict()`` (loggers' file sizes,
      ``EarlyStopping``'s counters), by class name and position;
    - ``skip_streak``: the non-finite guard's count of consecutive skipped steps.
    """

    def __init__(self, directory: PathLike, keep_last: int | None, basis: dict[str, Any]
                 ) -> None:
        self.manager = CheckpointManager(directory, keep_last=keep_last)
        self.basis = basis
        self.last_saved: int | None = None

    def begin(self, state: Any, *, resume: bool | str, overwrite: bool
              ) -> tuple[Any, dict[str, Any] | None]:
        """The state to train from and, when resuming, the saved run metadata."""
        where, directory = "fit", self.manager.directory
        steps = self.manager.all_steps()
        if resume and steps:
            try:
                manifest = self.manager.read_manifest()
            except CheckpointError as e:  # a damaged newest checkpoint: never skip it
                raise CheckpointError(f"{where}: cannot resume from {directory}: {e}") from None
            info = (manifest.get("metadata") or {}).get("fit")
            if info is None:
                raise CheckpointError(f"{where}: the latest checkpoint in {directory} (step "
                                      f"{manifest['step']}) was not written by fit; restore "
                                      f"it with checkpoint.restore and pass the state to fit")
            saved, now = _position_basis(info["data"]), _position_basis(self.basis)
            if saved != now and resume != "rederive":
                raise CheckpointError(
                    f"{where}: the checkpoint at step {manifest['step']} was trained on data "
                    f"with {saved}, but train_data now has {now}, so its data "
                    f"position cannot be found. Pass the same data, or resume='rederive' to "
                    f"continue at epoch, batch = divmod(step, steps_per_epoch) of the new data")
            # (checkpoints written before the shuffle key was kept have none to compare)
            now_key = self.basis.get("shuffle")
            was = info["data"].get("shuffle", now_key)
            if was != now_key and resume != "rederive":
                raise CheckpointError(
                    f"{where}: the checkpoint at step {manifest['step']} was trained on data "
                    f"{_order(was)}, but train_data is now {_order(now_key)}, so the resumed "
                    f"epochs would see other batches. Pass the same key, or "
                    f"resume='rederive' to continue with the new order")
            self.last_saved = manifest["step"]
            return self.manager.restore(target=state, step=manifest["step"]), info
        later = [s for s in steps if s > int(state.step)]
        if later and not overwrite:
            raise CheckpointError(
                f"{where}: {directory} already holds checkpoints of another run (steps up to "
                f"{steps[-1]}, beyond this state's step {int(state.step)}). Pass resume=True "
                f"to continue that run, overwrite=True to delete its checkpoints, or another "
                f"checkpoint_dir")
        if overwrite:
            for s in steps:
                _remove(step_dir(directory, s), s)
        elif int(state.step) in steps:  # continuing the state saved there: not saved again
            self.last_saved = int(state.step)
        return state, None

    def save(self, state: Any, step: int, run: dict[str, Any]) -> Path:
        """Save ``state`` as ``step`` with ``run`` (run_start, eval, callbacks, ...)."""
        path = self.manager.save(state, step, {"fit": {**run, "data": self.basis}})
        self.last_saved = step
        return path
