"""Run a model under a mixed-precision policy, with per-layer overrides by key path."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import jax

from funtrain._tree import keystr
from funtrain._typing import Params, PRNGKey
from funtrain.nn.module import (
    _CAST_INPUTS,
    _SCOPE,
    Module,
    apply_with_state,
    init_with_state,
)


def _matcher(default: Any, overrides: Mapping[str, Any]):
    """Return ``policy_for(path)``: the first override whose pattern matches, else default."""
    from funtrain.precision import as_policy

    rules = [(pattern, as_policy(p)) for pattern, p in overrides.items()]

    def policy_for(path: str) -> Any:
        for pattern, pol in rules:
            if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*"):
                return pol
        return default

    return policy_for


def _check_patterns(params: Params, patterns: list[str]) -> None:
    """Every override pattern must match some param key path (a typo would do nothing)."""
    paths = [keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + "/*")
                   for p in paths):
            shown = ", ".join(paths[:8]) + (" ..." if len(paths) > 8 else "")
            raise ValueError(f"with_policy: override pattern {pattern!r} matches no param key "
                             f"path (paths are: {shown})")


def _cast_params(params: Params, policy_for: Any, cast: str) -> Params:
    def leaf(path: Any, x: Any) -> Any:
        return getattr(policy_for(keystr(path)), cast)(x)

    return jax.tree_util.tree_map_with_path(leaf, params)


def with_policy(module: Module, policy: Any, *, overrides: Mapping[str, Any] | None = None
                ) -> Module:
    """Wrap ``module`` so it runs under a mixed-precision ``policy``.

    ``init`` stores params in ``param_dtype`` (FP32 master weights); ``apply`` casts the
    params and the floating inputs to ``compute_dtype`` and the outputs to
    ``output_dtype``. Norm statistics, softmax and losses already run in float32 inside
    funtrain's layers and losses, whatever the policy; model state (BatchNorm's running
    statistics) is never cast and stays float32.

    Args:
      module: the model.
      policy: a ``precision.Policy`` or its string, e.g. ``"params=f32,compute=bf16,output=f32"``.
      overrides: ``{pattern: policy}`` for parts of the model, matched against param key
        paths with shell-style wildcards; a pattern also covers everything below it.
        ``{"head": "float32", "*norm*": "float32"}`` keeps the last layer and every norm in
        full precision (their params stay float32, so their math runs in float32). With
        overrides, each child layer's floating inputs are cast to its own compute dtype:
        a float32 layer gets float32 inputs and outputs float32, and the layer after it
        computes in the default dtype again (an early float32 embedding does not turn
        the rest of the model to float32). The model's output is then cast to the policy's
        ``output_dtype``, a float32 head's too: that dtype defaults to the compute dtype, so
        write ``o=f32`` (``"p=f32,c=bf16,o=f32"``) to get float32 logits.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from funtrain import nn
      >>> model = nn.with_policy(nn.mlp([16, 4]), "p=f32,c=bf16,o=f32")
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
      >>> params["dense_0"]["w"].dtype, model.apply(params, jnp.ones((2, 8))).dtype
      (dtype('float32'), dtype('float32'))
    """
    from funtrain.precision import as_policy

    default = as_policy(policy)
    policy_for = _matcher(default, dict(overrides or {}))

    patterns = list(overrides or {})

    def init(key: PRNGKey, *xs: Any) -> Any:
        params, state = init_with_state(module, key, *xs)
        _check_patterns(params, patterns)
        params = _cast_params(params, policy_for, "cast_to_param")
        return (params, state) if module.stateful else params

    def apply(params: Params, *xs: Any, state: Any = None, key: PRNGKey | None = None,
              train: bool = False) -> Any:
        _check_patterns(params, patterns)
        compute_params = _cast_params(params, policy_for, "cast_to_compute")
        # Model state (BatchNorm statistics) is not cast: it stays float32.
        base = len(_SCOPE.get())  # a child's key path in these params drops the outer scope

        def cast(path: tuple[str, ...], args: tuple[Any, ...]) -> tuple[Any, ...]:
            return policy_for("/".join(path[base:])).cast_to_compute(args)

        # set also without overrides: an outer with_policy's casts stop at this model
        token = _CAST_INPUTS.set(cast if patterns else None)
        try:
            out, new = apply_with_state(module, compute_params, *default.cast_to_compute(xs),
                                        state=state, key=key, train=train)
        finally:
            _CAST_INPUTS.reset(token)
        out = default.cast_to_output(out)
        return (out, new) if module.stateful else out

    return Module(init, apply, module.name, module.kind, module.stateful)
