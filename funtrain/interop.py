"""Load PyTorch weights: map a ``state_dict`` onto funtrain params and model state.

Torch is never imported here: the values of a ``state_dict`` may be torch tensors (read
through ``.detach().cpu().numpy()``) or numpy arrays, so a checkpoint saved as ``.npz``
loads without torch installed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funtrain._tree import keystr

# funtrain leaf name -> PyTorch parameter name, for params and for model state.
PARAM_NAMES = {
    "w": "weight", "b": "bias",                # dense, conv
    "scale": "weight", "bias": "bias",         # layer_norm, group_norm, batch_norm
    "embedding": "weight",                     # embed
    "w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0",  # lstm, gru
    "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0",
}
STATE_NAMES = {"mean": "running_mean", "var": "running_var", "count": "num_batches_tracked"}
_BN_STATS = tuple(STATE_NAMES.values())

Rename = Callable[[str], "str | None"] | Mapping[str, str]


def from_torch(params_template: Any, state_dict: Mapping[str, Any], *,
               model_state: Any = None, rename: Rename | None = None,
               strict: bool = True, channels_first_flatten: bool = True) -> Any:
    """Map a PyTorch ``state_dict`` onto funtrain params (and model state).

    A funtrain key path ``a/b/c/leaf`` reads the torch key ``a.b.c.<name>``, where
    ``<name>`` renames the leaf as PyTorch does: ``w``, ``scale`` and ``embedding`` are
    ``weight``; ``b`` and ``bias`` are ``bias``; ``w_ih``/``w_hh``/``b_ih``/``b_hh`` are
    ``weight_ih_l0``/``weight_hh_l0``/``bias_ih_l0``/``bias_hh_l0``; in the model state
    ``mean``, ``var`` and ``count`` are ``running_mean``, ``running_var`` and
    ``num_batches_tracked``. So a torchvision ResNet's ``layer1.0.bn1.running_mean`` fills
    ``layer1/0/bn1/mean`` of ``funtrain.nn.models.resnet``'s state. ``num_batches_tracked``
    may be absent (older files), and a loaded count is at least 1: loaded statistics count
    as trained ones in eval mode.

    Layouts are converted by the template leaf: a rank-2 ``w`` (dense) is torch's
    ``(out, in)`` transposed; a rank-3 or rank-4 ``w`` (conv, ``(*kernel, in, out)``) comes
    from torch's ``(out, in, *kernel)``; ``w_ih`` and ``w_hh`` are transposed; everything
    else is taken as is. A ``Linear`` whose nearest earlier weight of two or more
    dimensions (in the ``state_dict``'s order) is a conv's reads the conv stack's output
    flattened: torch's ``nn.Flatten`` orders it channels first ``(C, H, W)``, funtrain's
    ``flatten`` channels last ``(H, W, C)``, so its input columns are reordered to match.
    Each result has the template leaf's dtype and shape, in memory of its own (torch may
    update its tensors in place later). A transposed convolution's ``w`` cannot be told
    from a conv's by its shape, so it is read by the layer's name: a ``w`` under a layer
    named ``conv_transpose*`` (``nn.conv_transpose``'s default name) comes from torch's
    ``ConvTranspose`` ``(in, out, *kernel)``. Under another name, rename the layer so, or
    load it by hand (``w = np.moveaxis(weight, (0, 1), (-2, -1))``).

    Args:
      params_template: the params to fill, e.g. from ``model.init``; only the structure,
        shapes and dtypes are read, so ``jax.eval_shape(model.init, key, x)`` will do.
      state_dict: ``{torch_key: tensor or numpy array}``, e.g. ``module.state_dict()``.
      model_state: the model-state template (BatchNorm statistics) to fill as well; when
        given, the result is ``(params, model_state)``.
      rename: for models whose names differ from torch's, either a callable
        ``funtrain_path -> torch_key`` (returning ``None`` keeps the default key) or a
        dict of overrides. A dict key that is a whole key path (``"dense_0/w"``) maps
        to a torch key (``"0.weight"``); a key that is a layer's path (``"dense_0"``)
        maps to a torch module prefix (``"0"``), and the leaf is renamed as usual.
      strict: raise if a torch key is left unused (PyTorch's ``load_state_dict(strict=)``).
        Missing and mis-shaped keys are always errors.
      channels_first_flatten: reorder the inputs of a ``Linear`` after a conv stack, as
        above; ``False`` for a torch model that flattens channels last itself
        (``x.permute(0, 2, 3, 1).flatten(1)``).

    Returns:
      ``params`` (jax arrays, the structure of ``params_template``), or
      ``(params, model_state)`` when ``model_state`` is given.

    Raises:
      ValueError: listing every problem at once: funtrain key paths with no torch key
        (and the key looked for), torch keys left unused, and mis-shaped keys.

    Example (needs torch, so not run as a doctest)::

        import torch, jax, jax.numpy as jnp
        from funtrain import nn, interop

        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                  torch.nn.Linear(4, 2))
        model = nn.serial(nn.dense(4), nn.relu(), nn.dense(2))
        template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3)))
        params = interop.from_torch(template, net.state_dict(),
                                    rename={"dense_0": "0", "dense_1": "2"})
        # a torchvision ResNet, BatchNorm statistics included:
        params, state = interop.from_torch(params, tv_model.state_dict(),
                                           model_state=state)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_torch: state_dict must be a mapping of torch keys to tensors "
                        f"or arrays (e.g. module.state_dict()), got "
                        f"{type(state_dict).__name__}")
    if rename is not None and not (callable(rename) or isinstance(rename, Mapping)):
        raise TypeError(f"from_torch: rename must be a callable (funtrain path -> torch key) "
                        f"or a dict of overrides, got {type(rename).__name__}")

    missing: list[tuple[str, str, str]] = []  # (what, funtrain path, torch key)
    after_conv = _linears_after_convs(state_dict) if channels_first_flatten else {}
    misshaped: list[str] = []
    used: set[str] = set()

    def fill(template: Any, names: Mapping[str, str], what: str) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = []
        for path, leaf in flat:
            parts = [_part(p) for p in path]
            fpath = keystr(path)
            tkey = _torch_key(parts, fpath, names, rename)
            shape = tuple(leaf.shape)
            if tkey not in state_dict:
                if what == "model_state" and parts and parts[-1] == "count":
                    # Older PyTorch files have no num_batches_tracked: the statistics
                    # are still trained ones.
                    leaves.append(jnp.ones(shape, leaf.dtype))
                    continue
                missing.append((what, fpath, tkey))
                leaves.append(leaf)
                continue
            used.add(tkey)
            value = _to_numpy(state_dict[tkey])
            perm = _permutation(parts[-1] if parts else "", len(shape),
                                parts[-2] if len(parts) > 1 else "")
            want = tuple(shape[i] for i in np.argsort(perm)) if perm else shape
            if tuple(value.shape) != want:
                misshaped.append(
                    f"torch key '{tkey}' has shape {tuple(value.shape)}, expected {want} "
                    f"for {what} '{fpath}' of shape {shape}")
                leaves.append(leaf)
                continue
            if tkey in after_conv:  # (out, C * S) channels first -> (out, S * C)
                c = after_conv[tkey]
                value = value.reshape(value.shape[0], c, -1).transpose(0, 2, 1).reshape(
                    value.shape[0], -1)
            if perm:
                value = np.transpose(value, perm)
            if what == "model_state" and parts and parts[-1] == "count":
                # torch leaves num_batches_tracked at 0 when it loads an old checkpoint; the
                # loaded statistics are trained ones, so eval mode must accept them.
                value = np.maximum(value, 1)
            # a copy: numpy() shares the tensor's memory, which torch may update in place
            leaves.append(jnp.array(value, dtype=leaf.dtype, copy=True))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    params = fill(params_template, PARAM_NAMES, "params")
    state = None if model_state is None else fill(model_state, STATE_NAMES, "model_state")

    unused = [k for k in state_dict if k not in used] if strict else []
    if missing or misshaped or unused:
        left = [k for k in state_dict if k not in used]
        lines = [_missing_message(*m, left) for m in missing]
        lines += misshaped
        lines += [f"torch key '{k}' (shape {_shape(state_dict[k])}) matches no funtrain key "
                  f"path (strict=True)" for k in unused]
        count = len(lines)
        stats = [k for k in unused if k.rsplit(".", 1)[-1] in _BN_STATS]
        if stats and model_state is None:
            lines.append(f"the state_dict holds BatchNorm statistics ({len(stats)} key(s) "
                         f"such as '{stats[0]}'): pass model_state= (the state from "
                         f"model.init) to load them, or strict=False to drop them")
        raise ValueError(f"from_torch: the state_dict does not match the template "
                         f"({count} problem(s)):\n" + "\n".join(f"  - {s}" for s in lines))
    return params if model_state is None else (params, state)


def _linears_after_convs(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """``{linear weight key: C}`` for each 2-D weight whose nearest earlier tensor of two or
    more dimensions is a conv's ``(C, in, *kernel)``, when ``C`` divides its inputs. Any
    such tensor ends a conv's reach: an LSTM's ``weight_ih_l0`` between them, a ViT's
    ``cls_token``."""
    out: dict[str, int] = {}
    previous: tuple[int, ...] = ()
    for key, value in state_dict.items():
        shape = _shape(value)
        if len(shape) < 2:
            continue
        if (key.endswith("weight") and len(shape) == 2 and len(previous) >= 3
                and shape[1] % previous[0] == 0):
            out[key] = previous[0]
        previous = shape if key.endswith("weight") else ()
    return out


def _part(entry: Any) -> str:
    """One key-path entry as a string (dict key, sequence index or attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _default_key(parts: list[str], names: Mapping[str, str]) -> str:
    """``['layer1', '0', 'bn1', 'scale']`` -> ``'layer1.0.bn1.weight'``."""
    if not parts:
        return ""
    return ".".join([*parts[:-1], names.get(parts[-1], parts[-1])])


def _torch_key(parts: list[str], fpath: str, names: Mapping[str, str],
               rename: Rename | None) -> str:
    """The torch key a funtrain leaf reads: ``rename``'s, else the default mapping."""
    if rename is None:
        return _default_key(parts, names)
    if not isinstance(rename, Mapping):
        key = rename(fpath)
        return _default_key(parts, names) if key is None else str(key)
    if fpath in rename:
        return rename[fpath]
    for n in range(len(parts) - 1, 0, -1):  # the longest layer prefix that is overridden
        prefix = "/".join(parts[:n])
        if prefix in rename:
            rest = _default_key(parts[n:], names)
            return f"{rename[prefix]}.{rest}" if rename[prefix] else rest
    return _default_key(parts, names)


def _permutation(leaf_name: str, rank: int, layer: str = "") -> tuple[int, ...] | None:
    """Axes that turn the torch layout into funtrain's, or ``None`` for as is."""
    if leaf_name == "w" and rank >= 3 and layer.startswith("conv_transpose"):
        return (*range(2, rank), 0, 1)  # ConvTranspose: (in, out, *kernel)
    if leaf_name in ("w_ih", "w_hh") and rank == 2:
        return (1, 0)
    if leaf_name == "w" and rank == 2:  # dense: (out, in) -> (in, out)
        return (1, 0)
    if leaf_name == "w" and rank >= 3:  # conv: (out, in, *kernel) -> (*kernel, in, out)
        return (*range(2, rank), 1, 0)
    return None


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (by duck typing, so torch is not imported) or array as numpy."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if "bfloat16" in str(value.dtype) or "float8" in str(value.dtype):
            value = value.float()  # numpy has no such dtype
        return value.numpy()
    return np.asarray(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def _missing_message(what: str, fpath: str, tkey: str, unused: list[str]) -> str:
    close = difflib.get_close_matches(tkey, unused, n=1)
    hint = f" (closest unused key: '{close[0]}')" if close else ""
    return f"{what} '{fpath}' has no torch key: looked for '{tkey}'{hint}"
