"""``summary``: a table of a model's layers, output shapes, params and state, computing nothing.

In the spirit of flax's ``tabulate`` and torchinfo. Shapes come from ``jax.eval_shape``: the
params and model state from ``init``, each layer's output from tracing ``apply`` while the
combinators record what their children return (``nn.module.recording``). No array is
allocated and no kernel runs, so a summary of a model on a ``(4096, 4096)`` batch is as
cheap as on a ``(1, 4096)`` one.

Rows follow the params' key paths (``layer1/0/conv1``). A row's param count and bytes are
those of the params subtree at its path, so a parent's numbers include its children's; the
totals come from the whole trees. Params subtrees that no combinator runs as a child (a
custom model's own weights, such as GPT's ``wte``) get a row with output ``-``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax

from funtrain._checks import check_int
from funtrain._typing import PRNGKey
from funtrain.nn.module import Module, apply_with_state, init_with_state, recording

Path = tuple[str, ...]

ROOT = "<root>"


class SummaryRow(NamedTuple):
    """One line of a :class:`Summary`.

    Attributes:
      path: the key path (``"layer1/0/conv1"``; ``"<root>"`` for the model itself).
      kind: the layer type (``"conv"``), or ``"-"`` for a params subtree no combinator ran.
      output: the output shape(s) as text (``"(2, 16)"``, dtype appended unless float32),
        or ``"-"`` when unknown.
      params: number of param elements in the subtree at ``path``.
      param_bytes: their size in bytes.
      state_bytes: size in bytes of the model state (e.g. BatchNorm statistics) at ``path``.
      depth: 0 for the root, else the number of keys in ``path``.
    """

    path: str
    kind: str
    output: str
    params: int
    param_bytes: int
    state_bytes: int
    depth: int


@dataclass(frozen=True, repr=False)
class Summary:
    """What :func:`summary` returns: ``rows`` and totals; ``str()`` renders the table.

    Attributes:
      rows: one :class:`SummaryRow` per layer, root first, parents before children.
      total_params: number of param elements in the whole params tree.
      total_param_bytes: their size in bytes.
      total_state_bytes: size in bytes of the whole model state (0 for a stateless model).
    """

    rows: tuple[SummaryRow, ...]
    total_params: int
    total_param_bytes: int
    total_state_bytes: int

    def __getitem__(self, path: str) -> SummaryRow:
        """The row at key path ``path`` (``"<root>"`` for the model)."""
        for row in self.rows:
            if row.path == path:
                return row
        raise KeyError(f"summary has no row {path!r}; rows are "
                       f"{[r.path for r in self.rows]}")

    def __str__(self) -> str:
        with_state = self.total_state_bytes > 0 or any(r.state_bytes for r in self.rows)
        header = ["Path", "Kind", "Output", "Params", "Param bytes"]
        if with_state:
            header.append("State bytes")
        lines = []
        for r in self.rows:
            cells = ["  " * r.depth + r.path, r.kind, r.output,
                     f"{r.params:,}" if r.params else "-", format_bytes(r.param_bytes, "-")]
            if with_state:
                cells.append(format_bytes(r.state_bytes, "-"))
            lines.append(cells)
        widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]
        right = {3, 4, 5}  # numbers are right-aligned

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))
                             ).rstrip()

        rule = "-" * len(fmt(["-" * w for w in widths]))
        total = (f"Total: {self.total_params:,} params "
                 f"({format_bytes(self.total_param_bytes)})")
        if with_state:
            total += f", state {format_bytes(self.total_state_bytes)}"
        return "\n".join([fmt(header), rule, *(fmt(c) for c in lines), rule, total])

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


def format_bytes(n: int, zero: str = "0 B") -> str:
    """Human-readable bytes: ``512 B``, ``1.2 KiB``, ``3.4 MiB`` (``zero`` for 0)."""
    if n == 0:
        return zero
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def summary(model: Module, *example_inputs: Any, train: bool = False, depth: int | None = None,
            key: PRNGKey | None = None) -> Summary:
    """Tabulate a model's layers: output shapes, param counts and bytes, model-state bytes.

    Nothing runs: params, state and outputs are abstract (``jax.eval_shape``), so any input
    size costs the same.

    Args:
      model: the model (stateless or stateful).
      example_inputs: the inputs, as arrays or ``jax.ShapeDtypeStruct``; their shapes are
        the ones reported.
      train: trace ``apply`` in train mode (a key is passed, so dropout works).
      depth: keep rows at most this many keys deep (0: the root only; ``None``: all).
      key: the key given to ``init`` (and to ``apply`` when ``train``); default
        ``jax.random.key(0)``. It only matters to models whose shapes depend on it.

    Returns:
      A :class:`Summary`: ``rows`` (root first), ``total_params``, ``total_param_bytes``
      and ``total_state_bytes``; ``print`` it for the table.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> s = nn.summary(nn.mlp([16, 4]), jax.ShapeDtypeStruct((2, 8), jnp.float32))
      >>> s.total_params
      212
      >>> s["dense_0"].output
      '(2, 16)'
      >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
      Path       Kind    Output   Params  Param bytes
      -----------------------------------------------
      <root>     serial  (2, 4)      212        848 B
        dense_0  dense   (2, 16)     144        576 B
        relu_0   relu    (2, 16)       -            -
        dense_1  dense   (2, 4)       68        272 B
      -----------------------------------------------
      Total: 212 params (848 B)
    """
    if not isinstance(model, Module):
        raise TypeError(f"summary: model must be a Module, got {type(model).__name__}")
    check_int("summary", "depth", depth, low=0, optional=True)
    if key is None:
        key = jax.random.key(0)
    xs = jax.tree.map(_abstract_leaf, example_inputs)

    # Init, abstractly. jax.eval_shape returns dicts with sorted keys; keep init's order
    # (the order layers are built and run) by reading the trees inside the trace.
    trees: list[Any] = []

    def init(k: Any, *a: Any) -> Any:
        out = init_with_state(model, k, *a)
        trees.append(_ordered_abstract(out))
        return out

    jax.eval_shape(init, key, *xs)
    params, state = trees[0]

    def apply(p: Any, s: Any, k: Any, *a: Any) -> Any:
        return apply_with_state(model, p, *a, state=s, key=k, train=train)[0]

    with recording() as rows:
        out = jax.eval_shape(apply, params, state, key if train else None, *xs)
    recorded: dict[Path, tuple[str, str]] = {}
    for path, kind, outputs in rows:  # a traced function may be traced twice: keep the first
        if path not in recorded:
            recorded[tuple(path)] = (kind, _shape_text(outputs))

    table = [SummaryRow(ROOT, model.kind, _shape_text(out), *_size(params), _size(state)[1], 0)]
    for path, (kind, text) in _walk(recorded, params, state):
        if depth is not None and len(path) > depth:
            continue
        n, nbytes = _size(_subtree(params, path))
        table.append(SummaryRow("/".join(path), kind, text, n, nbytes,
                                _size(_subtree(state, path))[1], len(path)))
    n, nbytes = _size(params)
    return Summary(tuple(table), n, nbytes, _size(state)[1])


# ----------------------------------------------------------------------------- helpers


def _abstract_leaf(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x


def _ordered_abstract(node: Any) -> Any:
    """``node`` with arrays (or tracers) as ``ShapeDtypeStruct``, dicts in their own order."""
    if isinstance(node, dict):
        return {k: _ordered_abstract(v) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple
        return type(node)(*(_ordered_abstract(v) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_ordered_abstract(v) for v in node)
    return _abstract_leaf(node)


def _size(tree: Any) -> tuple[int, int]:
    """``(elements, bytes)`` of every array in ``tree``."""
    n = nbytes = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            size = math.prod(leaf.shape)
            n += size
            nbytes += size * getattr(leaf.dtype, "itemsize", 0)
    return n, nbytes


def _subtree(tree: Any, path: Path) -> Any:
    """The subtree of a nested dict at ``path``, or ``{}`` where there is none."""
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return {}
        tree = tree[k]
    return tree


def _dict_keys(tree: Any) -> list[str]:
    """Keys of ``tree`` whose values are non-empty subtrees (layers), in order."""
    if not isinstance(tree, dict):
        return []
    return [k for k, v in tree.items() if isinstance(v, dict) and v]


def _shape_text(out: Any) -> str:
    leaves = jax.tree.leaves(out)
    if not leaves:
        return "-"
    texts = []
    for leaf in leaves:
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        text = str(shape)
        if dtype is not None and str(dtype) != "float32":
            text += f" {dtype}"
        texts.append(text)
    if len(texts) == 1 and hasattr(out, "shape"):
        return texts[0]
    return "[" + ", ".join(texts) + "]"


def _walk(recorded: dict[Path, tuple[str, str]], params: Any, state: Any,
          path: Path = (), container: bool = True) -> list[tuple[Path, tuple[str, str]]]:
    """Rows in pre-order: recorded children in the order they ran, and, inside containers
    (the root, a combinator, a params-only subtree), params subtrees no row covers, placed
    by their order in the params."""
    n = len(path)
    ran = list(dict.fromkeys(p[n] for p in recorded if len(p) > n and p[:n] == path))
    order = ran
    if container:
        known = _dict_keys(_subtree(params, path))
        known += [k for k in _dict_keys(_subtree(state, path)) if k not in known]
        pending = [k for k in known if k not in ran]
        order = []
        for k in ran:
            while pending and k in known and known.index(pending[0]) < known.index(k):
                order.append(pending.pop(0))
            order.append(k)
        order += pending
    result = []
    for k in order:
        child = (*path, k)
        if child in recorded:
            has_children = any(len(p) > len(child) and p[:len(child)] == child
                               for p in recorded)
            result.append((child, recorded[child]))
            result += _walk(recorded, params, state, child, has_children)
        else:
            result.append((child, ("-", "-")))
            result += _walk(recorded, params, state, child, True)
    return result
