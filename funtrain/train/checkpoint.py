"""Atomic, verified checkpoints of any pytree (a ``TrainState`` above all).

A checkpoint of step ``s`` is the folder ``directory/step_{s:08d}/`` holding

* ``arrays.npz``: one uncompressed array per leaf, named by its index in flattening order.
  Dtypes numpy cannot store (bfloat16 and the other ``ml_dtypes``) are stored as unsigned
  integer views of their bytes; typed PRNG keys as their ``key_data``.
* ``manifest.json``: the format version, the step, the user's metadata, the size and
  SHA-256 of ``arrays.npz``, and every leaf's key path, dtype, shape and SHA-256.

``save`` writes both files into a ``.tmp_*`` folder, fsyncs them and the folder, renames it
to its final name and fsyncs ``directory``, so a process killed at any moment leaves every
earlier checkpoint intact, and a final folder is always complete. ``restore`` checks the
checksums and, given a ``target`` tree, its structure, shapes and dtypes: every problem is a
:class:`CheckpointError` that names the key path, never a silently wrong tree.

Example:
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

import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funtrain._tree import keystr

__all__ = ["CheckpointError", "CheckpointManager", "save", "restore", "latest_step",
           "all_steps", "read_manifest", "step_dir"]

PathLike = str | os.PathLike
ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KNOWN_FORMATS = (1,)  # manifest formats restore can read
_STEP_RE = re.compile(r"step_(\d{8,})")


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
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()


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
        return "scalar", type(leaf).__name__, ()
    if _is_key(leaf):
        return "key", str(leaf.dtype), tuple(leaf.shape)
    if isinstance(leaf, (np.ndarray, np.generic)):
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


# ----------------------------------------------------------------------------- save


def _encode(path: str, leaf: Any) -> tuple[dict[str, Any], np.ndarray]:
    """A leaf's manifest entry (kind, dtype, shape, ...) and the array stored for it."""
    try:
        kind, dtype, shape = _describe(leaf)
    except TypeError as e:
        raise TypeError(f"checkpoint.save: key path {path!r}: {e}") from None
    info: dict[str, Any] = {"kind": kind, "dtype": dtype, "shape": list(shape)}
    if kind == "key":
        info["impl"] = str(jax.random.key_impl(leaf))
        stored = np.asarray(jax.random.key_data(leaf))
    else:
        stored = np.asarray(leaf)
        if not _is_native(stored.dtype):  # bfloat16, float8_*, int4 ...: store the bytes
            stored = np.ascontiguousarray(stored).view(f"uint{stored.dtype.itemsize * 8}")
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
      overwrite: replace an existing checkpoint of ``step`` instead of raising.

    Returns:
      the final folder, ``directory/step_{step:08d}``.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> save(tempfile.mkdtemp(), {"w": jnp.zeros(2)}, 3).name
      'step_00000003'
    """
    step = _checked_step(step)
    directory = Path(directory)
    final = step_dir(directory, step)
    if final.exists() and not overwrite:
        raise CheckpointError(f"checkpoint.save: {final} already exists; pass overwrite=True "
                              f"to replace it")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint.save: metadata must be JSON-serializable: {e}") from None

    entries, leaves, _ = _flatten(state)
    arrays = {}
    for i, (entry, leaf) in enumerate(zip(entries, leaves, strict=True)):
        info, arrays[str(i)] = _encode(entry["path"], leaf)
        entry.update(info, name=str(i))

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp_step_{step:08d}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / ARRAYS, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "metadata": metadata,
            "arrays_sha256": _sha256_file(tmp / ARRAYS),
            "arrays_bytes": (tmp / ARRAYS).stat().st_size,
            "leaves": entries,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # overwrite: move the old one aside (a .tmp name is never read)
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: rename it to a ``.tmp`` name first, so a process killed
    mid-delete never leaves a half-deleted folder under a final name."""
    trash = path.parent / f".tmp_delete_{path.name}_{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- listing


def all_steps(directory: PathLike) -> list[int]:
    """Sorted steps whose final folder exists and holds a manifest (``.tmp*`` and other
    names are ignored); ``[]`` when ``directory`` does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for child in directory.iterdir():
        m = _STEP_RE.fullmatch(child.name)
        if m and child.is_dir() and (child / MANIFEST).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(directory: PathLike) -> int | None:
    """The highest complete step in ``directory``, or ``None`` when there is none."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _resolve_step(directory: PathLike, step: Any, where: str) -> int:
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(f"{where}: no checkpoint in {directory} (no step_* folder "
                                  f"with a {MANIFEST})")
    return _checked_step(step)


def read_manifest(directory: PathLike, step: Any = None) -> dict[str, Any]:
    """The manifest of ``step`` (default: latest) as a dict: ``format``, ``step``,
    ``metadata``, ``leaves`` (key path, dtype, shape ...) and checksums."""
    step = _resolve_step(directory, step, "checkpoint.read_manifest")
    folder = step_dir(directory, step)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint: no checkpoint of step {step}: {folder} does not "
                              f"exist (steps present: {all_steps(directory)})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing; the checkpoint of step {step} "
                              f"is incomplete or damaged")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") not in KNOWN_FORMATS:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise CheckpointError(f"checkpoint: {path} has format {found!r}; this funtrain "
                                  f"reads format {', '.join(map(str, KNOWN_FORMATS))}. It was "
                                  f"written by another version of funtrain: restore it with "
                                  f"that version")
        _ = manifest["step"], manifest["arrays_sha256"], manifest["arrays_bytes"]
        _ = manifest["leaves"]
        for leaf in manifest["leaves"]:
            _ = leaf["path"], leaf["keys"], leaf["name"], leaf["kind"], leaf["dtype"]
            _ = leaf["shape"], leaf["stored_dtype"], leaf["sha256"]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint: {path} is unreadable or malformed "
                              f"({type(e).__name__}: {e})") from None
    if manifest["step"] != step:
        raise CheckpointError(f"checkpoint: {path} says step {manifest['step']}, but its "
                              f"folder is step {step}")
    return manifest


# ----------------------------------------------------------------------------- restore


def _load_arrays(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every stored array, after checking the file's size and SHA-256 and each array's."""
    path = folder / ARRAYS
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing")
    size = path.stat().st_size
    expected_size = manifest["arrays_bytes"]
    if size != expected_size:
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupted: it has {size} "
                              f"bytes, the manifest expects {expected_size}")
    if _sha256_file(path) != manifest["arrays_sha256"]:
        raise CheckpointError(f"checkpoint: {path} is corrupted: its SHA-256 does not match "
                              f"the manifest's (checksum mismatch)")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            for leaf in manifest["leaves"]:
                if leaf["name"] not in names:
                    raise CheckpointError(f"checkpoint: key path {leaf['path']!r}: array "
                                          f"{leaf['name']!r} is missing from {path}")
                out[leaf["name"]] = npz[leaf["name"]]
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"checkpoint: {path} is truncated or unreadable "
                              f"({type(e).__name__}: {e})") from None
    return out


def _decode(leaf: dict[str, Any], stored: np.ndarray) -> Any:
    """Rebuild one leaf from its stored array, checking it against its manifest entry."""
    path = leaf["path"]
    if stored.dtype.name != leaf["stored_dtype"]:
        raise CheckpointError(f"checkpoint: key path {path!r}: stored dtype "
                              f"{stored.dtype.name}, the manifest says {leaf['stored_dtype']}")
    if _sha256_array(stored) != leaf["sha256"]:
        raise CheckpointError(f"checkpoint: key path {path!r}: array is corrupted "
                              f"(checksum mismatch)")
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


def _check_against_target(manifest: dict[str, Any], entries: list[dict[str, Any]],
                          target_leaves: list[Any]) -> None:
    saved = {leaf["path"]: leaf for leaf in manifest["leaves"]}
    wanted = [e["path"] for e in entries]
    if [leaf["path"] for leaf in manifest["leaves"]] != wanted:
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
        ``None`` returns nested dicts keyed by the key path components.
      step: which step (default: the latest).

    Returns:
      the restored tree: jax arrays (numpy arrays where numpy was saved or the target leaf
      is numpy), typed PRNG keys and Python scalars.

    Raises:
      CheckpointError: a missing or malformed manifest, a missing, truncated or corrupted
        arrays file (checksum mismatch), or a structure, shape or dtype mismatch with
        ``target``; the message names the key path.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> d = tempfile.mkdtemp()
      >>> _ = save(d, {"a": {"b": jnp.arange(2)}}, 1)
      >>> restore(d)["a"]["b"].tolist()
      [0, 1]
    """
    step = _resolve_step(directory, step, "checkpoint.restore")
    manifest = read_manifest(directory, step)
    if target is not None:
        entries, target_leaves, treedef = _flatten(target)
        _check_against_target(manifest, entries, target_leaves)
    arrays = _load_arrays(step_dir(directory, step), manifest)
    values = [_decode(leaf, arrays[leaf["name"]]) for leaf in manifest["leaves"]]
    if target is None:
        return _nested(manifest, values)
    values = [np.asarray(v) if isinstance(t, np.ndarray) and not isinstance(v, np.ndarray)
              else v for v, t in zip(values, target_leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, values)


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves into one folder and keeps the ``keep_last`` newest checkpoints.

    It assumes it is the only writer of ``directory``: on construction it removes ``.tmp*``
    folders that a killed process left behind.

    Example:
      >>> import jax.numpy as jnp, tempfile
      >>> m = CheckpointManager(tempfile.mkdtemp(), keep_last=2)
      >>> for s in range(4):
      ...     _ = m.save({"w": jnp.zeros(2)}, s)
      >>> m.all_steps()
      [2, 3]
    """

    def __init__(self, directory: PathLike, keep_last: int | None = None) -> None:
        if keep_last is not None and (isinstance(keep_last, bool)
                                      or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"CheckpointManager: keep_last must be a positive int or None, "
                             f"got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        if self.directory.is_dir():
            for child in self.directory.iterdir():
                if child.name.startswith(".tmp") and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)

    def save(self, state: Any, step: Any, metadata: Any = None, *,
             overwrite: bool = False) -> Path:
        """:func:`save`, then delete the oldest checkpoints beyond ``keep_last`` (never the
        one just written)."""
        step = _checked_step(step)
        final = save(self.directory, state, step, metadata, overwrite=overwrite)
        if self.keep_last is not None:
            steps = self.all_steps()
            for old in steps[:-self.keep_last]:
                if old != step:
                    _remove(step_dir(self.directory, old))
        return final

    def latest_step(self) -> int | None:
        """The highest complete step, or ``None``."""
        return latest_step(self.directory)

    def all_steps(self) -> list[int]:
        """The complete steps, sorted."""
        return all_steps(self.directory)

    def restore(self, target: Any = None, step: Any = None) -> Any:
        """:func:`restore` from this manager's folder."""
        return restore(self.directory, target=target, step=step)

    def read_manifest(self, step: Any = None) -> dict[str, Any]:
        """:func:`read_manifest` from this manager's folder."""
        return read_manifest(self.directory, step)


# ----------------------------------------------------------------------------- fit's runs


class RunCheckpoints:
    """``fit``'s checkpoints: the ``TrainState``, and in the manifest's metadata (under
    ``"fit"``) what an exact resume needs besides it:

    - ``run_start``: the step the interrupted ``fit`` call started from (its ``epochs``
      count from there);
    - ``data``: the data position's basis (``steps_per_epoch``, ``batch_size``,
      ``examples``), checked on resume;
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
            manifest = self.manager.read_manifest()
            info = (manifest.get("metadata") or {}).get("fit")
            if info is None:
                raise CheckpointError(f"{where}: the latest checkpoint in {directory} (step "
                                      f"{manifest['step']}) was not written by fit; restore "
                                      f"it with checkpoint.restore and pass the state to fit")
            if info["data"] != self.basis and resume != "rederive":
                raise CheckpointError(
                    f"{where}: the checkpoint at step {manifest['step']} was trained on data "
                    f"with {info['data']}, but train_data now has {self.basis}, so its data "
                    f"position cannot be found. Pass the same data, or resume='rederive' to "
                    f"continue at epoch, batch = divmod(step, steps_per_epoch) of the new data")
            self.last_saved = manifest["step"]
            return self.manager.restore(target=state), info
        later = [s for s in steps if s > int(state.step)]
        if later and not overwrite:
            raise CheckpointError(
                f"{where}: {directory} already holds checkpoints of another run (steps up to "
                f"{steps[-1]}, beyond this state's step {int(state.step)}). Pass resume=True "
                f"to continue that run, overwrite=True to delete its checkpoints, or another "
                f"checkpoint_dir")
        if overwrite:
            for s in steps:
                _remove(step_dir(directory, s))
        elif int(state.step) in steps:  # continuing the state saved there: not saved again
            self.last_saved = int(state.step)
        return state, None

    def save(self, state: Any, step: int, run: dict[str, Any]) -> Path:
        """Save ``state`` as ``step`` with ``run`` (run_start, eval, callbacks, ...)."""
        path = self.manager.save(state, step, {"fit": {**run, "data": self.basis}})
        self.last_saved = step
        return path
