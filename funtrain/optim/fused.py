"""Fused flat buffers: params, gradients and optimizer state in one buffer per group.

``fuse(params)`` packs a params tree into ``FlatParams``: one contiguous 1-D buffer per group
(by default per dtype, with matrices apart from vectors), every leaf a slice of one. A
``FlatParams`` is a pytree whose leaves are its buffers, so an element-wise optimizer given
one updates each buffer in one kernel, and its moments are buffers too. The model sees
``unflatten()``: the leaves as views, split from the buffers inside the jitted step, whose
gradient arrives as one concatenated buffer (the transpose of ``split``).

Rules that need each leaf's shape (trust ratios, factored statistics, Muon, and the
``masked``/``partition``/``freeze`` wrappers) are built with ``leafwise``: given buffers,
they unflatten, run per leaf, and flatten their updates back. That is correct, but only the
element-wise part of an optimizer runs fused. A per-leaf mask of ``add_decayed_weights``
becomes one bool per buffer when the buffers are grouped the way the mask is (the default
grouping matches the usual "no decay on biases and norms"), else an element-wise mask.

``TrainState.create(..., fused=True)`` makes a fused state; checkpoints store the leaves
(``unfuse``), so a fused run restores into an unfused one and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funtrain._tree import keystr
from funtrain.optim.base import Optimizer

GroupFn = Callable[[str, Any], Any]  # (key path "a/b", leaf) -> a label for the leaf's buffer


class Layout(NamedTuple):
    """Where each leaf lives: static (hashable), so it is the pytree's aux data.

    ``groups``: ``(label, dtype name, size)`` per buffer; ``leaves``: ``(group index,
    shape)`` per leaf, in the tree's flattening order (a leaf follows the one before it in
    its buffer); ``treedef``: the params' structure. A group's size counts the zeros
    that may end its buffer past the leaves (``fuse``'s ``multiple``): the params and the
    updates stay zero there (their gradient is zero); a moment may not (AdaMax's ``u`` gets
    ``eps``), and checkpoints, which store the leaves, restore it as zero.
    """

    treedef: Any
    groups: tuple[tuple[str, str, int], ...]
    leaves: tuple[tuple[int, tuple[int, ...]], ...]


def default_group(path: str, leaf: Any) -> str:
    """Matrices (``ndim >= 2``) and vectors apart, so the usual weight-decay mask (decay the
    matrices only) is one bool per buffer."""
    return "matrices" if np.ndim(leaf) >= 2 else "vectors"


@jax.tree_util.register_pytree_with_keys_class
class FlatParams:
    """Params as one 1-D buffer per group; the leaves of this pytree are the buffers.

    ``unflatten()`` gives the params tree (views split from the buffers). ``buffers`` maps
    each group's label (``"float32:matrices"``) to its buffer.
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: tuple[Any, ...], layout: Layout) -> None:
        self.buffers, self.layout = tuple(buffers), layout

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Layout]:
        keys = [jax.tree_util.DictKey(label) for label, _, _ in self.layout.groups]
        return list(zip(keys, self.buffers, strict=True)), self.layout

    @classmethod
    def tree_unflatten(cls, layout: Layout, buffers: Any) -> FlatParams:
        return cls(tuple(buffers), layout)

    def unflatten(self) -> Any:
        """The params tree: each leaf split from its buffer and reshaped."""
        layout, pieces = self.layout, []
        for g, buffer in enumerate(self.buffers):
            shapes = [s for gi, s in layout.leaves if gi == g]
            parts = _split(buffer, [math.prod(s) for s in shapes])
            pieces.append(iter([p.reshape(s) for p, s in zip(parts, shapes, strict=True)]))
        return layout.treedef.unflatten([next(pieces[g]) for g, _ in layout.leaves])

    def __repr__(self) -> str:
        groups = ", ".join(f"{label}[{size}]" for label, _, size in self.layout.groups)
        return f"FlatParams({len(self.layout.leaves)} leaves in {groups})"


def _split(buffer: Any, sizes: list[int]) -> list[Any]:
    """``buffer`` cut into consecutive pieces of ``sizes`` (a padded tail left out).
    ``jnp.split`` transposes to one concatenate, so the gradient arrives flat (slices
    would transpose to a pad per leaf)."""
    cuts = np.cumsum(sizes).tolist()
    if cuts and cuts[-1] == np.shape(buffer)[0]:
        cuts = cuts[:-1]
    if isinstance(buffer, np.ndarray):  # host copies (checkpoints): numpy views
        return np.split(buffer, cuts)[:len(sizes)]
    return (jnp.split(buffer, cuts) if cuts else [buffer])[:len(sizes)]


def _concat(parts: list[Any]) -> Any:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate([p.ravel() for p in parts])
    return jnp.concatenate([jnp.ravel(p) for p in parts])


def layout_of(params: Any, group: GroupFn | None = None, multiple: int = 1) -> Layout:
    """The layout ``fuse`` gives ``params``: leaves grouped by dtype and ``group``'s label,
    buffers in order of first appearance, each padded to a multiple of ``multiple``."""
    group = group or default_group
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels: dict[str, int] = {}
    groups: list[tuple[str, str]] = []  # (label, dtype)
    leaves = []
    for path, leaf in flat:
        dtype, shape = np.dtype(leaf.dtype).name, tuple(np.shape(leaf))
        label = f"{dtype}:{group(keystr(path), leaf)}"
        if label not in labels:
            labels[label] = len(groups)
            groups.append((label, dtype))
        leaves.append((labels[label], shape))
    return Layout(treedef, _sized(groups, leaves, multiple), tuple(leaves))


def _sized(groups: Any, leaves: Any, multiple: int) -> tuple[tuple[str, str, int], ...]:
    """``(label, dtype, size)`` per group: its leaves' elements, padded to a multiple."""
    used = [0] * len(groups)
    for g, shape in leaves:
        used[g] += math.prod(shape)
    return tuple((label, dtype, -(-n // multiple) * multiple)
                 for (label, dtype, *_), n in zip(groups, used, strict=True))


def pack(params: Any, layout: Layout, dtypes: tuple[str, ...] | None = None) -> FlatParams:
    """``params`` (a tree with ``layout``'s structure, shapes and dtypes) into buffers.

    ``dtypes``: the buffers' dtypes where they are not the layout's, which are the params'
    (an optimizer state's moments in float32 for bfloat16 params, or in ``mu_dtype``).
    """
    leaves = layout.treedef.flatten_up_to(params)
    for i, ((g, shape), leaf) in enumerate(zip(layout.leaves, leaves, strict=True)):
        label, dtype, _ = layout.groups[g]
        dtype = dtype if dtypes is None else dtypes[g]
        if tuple(np.shape(leaf)) != shape or np.dtype(leaf.dtype).name != dtype:
            path = keystr(jax.tree_util.tree_flatten_with_path(
                layout.treedef.unflatten(range(len(leaves))))[0][i][0])
            raise ValueError(f"fuse: the leaf at key path {path} is "
                             f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}, which does "
                             f"not fit the layout's {dtype}{list(shape)} in buffer {label!r}")
    buffers = []
    for g, (_, _, size) in enumerate(layout.groups):
        parts = [x for (gi, _), x in zip(layout.leaves, leaves, strict=True) if gi == g]
        used = sum(math.prod(np.shape(x)) for x in parts)
        if used < size:  # the zeros that pad the buffer to its size
            xp = np if isinstance(parts[0], np.ndarray) else jnp
            parts.append(xp.zeros(size - used, parts[0].dtype))
        buffers.append(_concat(parts))
    return FlatParams(tuple(buffers), layout)


def fuse(params: Any, group: GroupFn | None = None, multiple: int = 1) -> FlatParams:
    """Pack ``params`` into one buffer per dtype and ``group`` label.

    ``group(key_path, leaf) -> label`` splits the buffers further (default: matrices and
    vectors apart, ``default_group``); group the way your masks split the params, so that
    a mask stays one bool per buffer. ``multiple``: each buffer is padded with zeros to a
    multiple of it, so that FSDP can split it over that many devices
    (``TrainState.create(..., fused=True)`` pads to ``jax.device_count()``).

    Examples:
      >>> import jax.numpy as jnp
      >>> flat = fuse({"b": jnp.zeros(3), "w": jnp.ones((2, 3))})
      >>> flat
      FlatParams(2 leaves in float32:vectors[3], float32:matrices[6])
      >>> flat.unflatten()["w"].shape
      (2, 3)
    """
    if isinstance(multiple, (bool, np.bool_)) or not isinstance(multiple, (int, np.integer)) \
            or multiple < 1:
        raise ValueError(f"fuse: multiple must be a positive int, got {multiple!r}")
    if isinstance(params, FlatParams):  # re-padded if its sizes do not divide
        layout = params.layout
        if all(size % multiple == 0 for _, _, size in layout.groups):
            return params
        padded = _sized(layout.groups, layout.leaves, multiple)
        return pack(params.unflatten(), layout._replace(groups=padded))
    # Python scalars as arrays (numpy and jax leaves stay as they are)
    params = jax.tree.map(lambda x: x if hasattr(x, "dtype") else jnp.asarray(x), params)
    return pack(params, layout_of(params, group, multiple))


def _is_flat(x: Any) -> bool:
    return isinstance(x, FlatParams)


def unfuse(tree: Any) -> Any:
    """``tree`` with every ``FlatParams`` in it (params, moments ...) unflattened; a fused
    ``TrainState`` becomes an unfused one."""
    return jax.tree.map(lambda x: x.unflatten() if _is_flat(x) else x, tree, is_leaf=_is_flat)


def unfuse_on_host(tree: Any) -> Any:
    """``unfuse`` with each buffer first copied to the host: the leaves are numpy views."""
    def host(x: Any) -> Any:
        return FlatParams(tuple(np.asarray(b) for b in x.buffers), x.layout).unflatten()

    return jax.tree.map(lambda x: host(x) if _is_flat(x) else x, tree, is_leaf=_is_flat)


def unfuse_spec(tree: Any) -> Any:
    """``unfuse`` for shapes: each ``FlatParams`` becomes its leaves' ``ShapeDtypeStruct``s
    (nothing is computed, so buffers may be ``ShapeDtypeStruct``s too)."""
    def spec(x: Any) -> Any:
        # the buffers' dtypes: a moment's may differ from the params' in the layout
        return x.layout.treedef.unflatten(
            [jax.ShapeDtypeStruct(shape, x.buffers[g].dtype) for g, shape in x.layout.leaves])

    return jax.tree.map(lambda x: spec(x) if _is_flat(x) else x, tree, is_leaf=_is_flat)


def has_fused(tree: Any) -> bool:
    """Whether ``tree`` holds a ``FlatParams``."""
    return any(_is_flat(x) for x in jax.tree.leaves(tree, is_leaf=_is_flat))


def fuse_like(tree: Any, template: Any) -> Any:
    """``tree`` (unfused) packed the way ``template`` is: every subtree where ``template``
    has a ``FlatParams`` is packed with that layout. The inverse of ``unfuse``."""
    structure = jax.tree.structure(template, is_leaf=_is_flat)
    parts = structure.flatten_up_to(tree)
    marks = jax.tree.leaves(template, is_leaf=_is_flat)
    return structure.unflatten([pack(p, m.layout, _dtypes(m)) if _is_flat(m) else p
                                for p, m in zip(parts, marks, strict=True)])


def _dtypes(flat: FlatParams) -> tuple[str, ...]:
    return tuple(np.dtype(b.dtype).name for b in flat.buffers)


def leafwise(opt: Optimizer) -> Optimizer:
    """``opt`` made safe for fused params: given ``FlatParams``, it runs on the unflattened
    leaves (its state is per leaf) and its updates are flattened back. Trees pass through.

    Transforms whose rule needs a leaf's shape or norm (``scale_by_trust_ratio``,
    ``scale_by_factored_rms``, ``scale_by_muon``, ``masked``, ``partition``, ``freeze``)
    are built with it.
    """

    def init_state(params: Any) -> Any:
        return opt.init(params.unflatten() if _is_flat(params) else params)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not _is_flat(grads):
            return opt.update(grads, state, params)
        tree_params = params.unflatten() if _is_flat(params) else params
        updates, state = opt.update(grads.unflatten(), state, tree_params)
        return pack(updates, grads.layout, _dtypes(grads)), state  # grads may be upcast

    return Optimizer(init_state, update)


def flat_mask(mask: Any, params: FlatParams) -> tuple[Any, ...]:
    """A per-leaf mask tree (bools, or bool arrays broadcastable to each leaf) as one mask
    per buffer: a bool where every leaf of the buffer agrees, else a bool vector."""
    leaves = params.layout.treedef.flatten_up_to(mask)
    out: list[Any] = []
    for g in range(len(params.layout.groups)):
        members = [(m, s) for (gi, s), m in zip(params.layout.leaves, leaves, strict=True)
                   if gi == g]
        if all(isinstance(m, (bool, np.bool_)) for m, _ in members) and \
                len({bool(m) for m, _ in members}) == 1:
            out.append(bool(members[0][0]))
        else:  # the buffer mixes masked and unmasked elements (its padding: unmasked)
            used = sum(math.prod(s) for _, s in members)
            out.append(jnp.concatenate(
                [jnp.broadcast_to(jnp.asarray(m, bool), s).ravel() for m, s in members]
                + [jnp.zeros(params.layout.groups[g][2] - used, bool)]))
    return tuple(out)
