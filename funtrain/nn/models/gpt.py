"""GPT-2 (Radford et al., 2019), in the spirit of nanoGPT's ``model.py``.

Token and position embeddings, ``n_layer`` pre-norm transformer blocks (causal
self-attention, then a GELU MLP, each inside a residual), a final layer norm, and a
language-model head tied to the token embedding. The attention output and the MLP's
hidden activation are tagged ``attention_out`` and ``mlp_hidden`` with
``checkpoint_name``, so ``remat`` policies such as ``"names:attention_out"`` can keep them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from funtrain._typing import Array, Params, PRNGKey
from funtrain.nn import initializers as inits
from funtrain.nn import layers
from funtrain.nn.combinators import residual, serial
from funtrain.nn.layers import (
    _check_name,
    _positive_int,
    dense,
    gelu,
    layer_norm,
    multi_head_attention,
    stateless,
)
from funtrain.nn.module import Module, ModuleError, ModuleTypeError, call_in_scope, run_child


def transformer_block(d_model: int, num_heads: int, *, mlp_ratio: int = 4,
                      causal: bool = True, dropout: float = 0.0,
                      attention_dropout: float | None = None,
                      w_init: inits.Initializer | None = None,
                      gelu_approximate: bool = False, name: str | None = None) -> Module:
    """A pre-norm transformer block on ``(batch, seq, d_model)`` (GPT-2 layout).

    ``x + dropout(attention(layer_norm(x)))``, then ``x + dropout(mlp(layer_norm(x)))``
    with a GELU MLP of width ``mlp_ratio * d_model``. Params: ``{"attn": ..., "mlp": ...}``.
    ``apply(params, x, mask=None)`` passes an attention mask (e.g. a ``(batch, seq)``
    padding mask, True = a real token) to the attention, alongside ``causal``.
    The attention output and the MLP hidden activation are tagged ``attention_out`` and
    ``mlp_hidden`` for ``remat.checkpoint(block, "names:attention_out,mlp_hidden")``.

    Args:
      dropout: dropout on each residual branch (``train=True`` with a key).
      attention_dropout: dropout on the attention weights; defaults to ``dropout``.
      w_init: initializer of every weight matrix (default ``lecun_normal()``).
      gelu_approximate: the MLP's GELU in its tanh form (OpenAI's GPT-2, HuggingFace's
        ``gelu_new``) instead of the exact erf one (nanoGPT, PyTorch's ``nn.GELU()``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> block = transformer_block(32, 4)
      >>> params = block.init(jax.random.key(0), jnp.zeros((1, 8, 32)))
      >>> block.apply(params, jnp.ones((2, 8, 32))).shape
      (2, 8, 32)
    """
    attn_rate = dropout if attention_dropout is None else attention_dropout
    attention = multi_head_attention(num_heads, causal=causal, dropout=attn_rate,
                                     w_init=w_init)

    def build(attn: Module) -> Module:
        return serial(
            residual(layer_norm(), attn, layers.dropout(dropout), name="attn"),
            residual(layer_norm(), dense(mlp_ratio * d_model, w_init=w_init),
                     gelu(approximate=gelu_approximate),
                     stateless(lambda h: checkpoint_name(h, "mlp_hidden"), kind="tag"),
                     dense(d_model, w_init=w_init), layers.dropout(dropout), name="mlp"),
            name=name)

    block = build(attention)

    def apply(params: Params, x: Array, mask: Any = None, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        if mask is None:
            return block.apply(params, x, key=key, train=train)
        # The same block, its attention bound to this call's mask (modules are closures:
        # building one inside a trace costs nothing at run time).
        return build(with_mask(attention, mask)).apply(params, x, key=key, train=train)

    def init(key: PRNGKey, x: Any, mask: Any = None) -> Params:
        return block.init(key, x)

    return block._replace(init=init, apply=apply)


def with_mask(module: Module, mask: Any) -> Module:
    """``module`` with ``mask`` passed as its second input on every call."""

    def apply(params: Params, x: Array, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        return module.apply(params, x, mask, key=key, train=train)

    return module._replace(apply=apply)


# Paths, inside one block's params, of the projections that write into the residual
# stream; GPT-2 scales their initial weights by 1/sqrt(2 * n_layer).
RESIDUAL_PROJECTIONS = (("attn", "multi_head_attention_0", "out", "w"), ("mlp", "dense_1", "w"))


def gpt(vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, *,
        dropout: float = 0.0, mlp_ratio: int = 4, gelu_approximate: bool = False,
        name: str | None = None) -> Module:
    """A GPT-2 language model: token ids ``(batch, seq)`` → logits ``(batch, seq, vocab)``.

    GPT-2 small is ``gpt(50257, 1024, 12, 12, 768)``: 124,439,808 params. Weights are
    ``N(0, 0.02²)`` (residual projections ``0.02 / sqrt(2 n_layer)``), biases zero, and
    the output head reuses the token embedding (weight tying), as GPT-2 and nanoGPT.

    Args:
      vocab_size: number of token ids.
      block_size: the longest sequence (positions are learned up to it).
      n_layer, n_head, d_model: depth, heads per block, and width.
      dropout: on the embeddings, the attention weights and each residual branch.
      mlp_ratio: MLP width as a multiple of ``d_model``.
      gelu_approximate: the tanh GELU of OpenAI's GPT-2 checkpoints (their logits move by
        ~1e-3 under the exact GELU, nanoGPT's and the default).

    Params: ``wte`` (token embedding, ``(vocab_size, d_model)``), ``wpe`` (positions,
    ``(block_size, d_model)``), ``h`` (the blocks ``block_0`` ... ``block_{n-1}``) and
    ``ln_f``. ``apply(params, ids, mask=None)``: an optional ``(batch, seq)`` padding mask
    (True = a real token) joins the causal mask in every block.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = gpt(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32)
      >>> ids = jnp.zeros((2, 8), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)
      >>> model.apply(params, ids).shape
      (2, 8, 100)
    """
    kind = "gpt"
    for value, what in ((vocab_size, "vocab_size"), (block_size, "block_size"),
                        (n_layer, "n_layer"), (n_head, "n_head"), (d_model, "d_model"),
                        (mlp_ratio, "mlp_ratio")):
        _positive_int(value, what, kind)
    if d_model % n_head:
        raise ValueError(f"gpt: d_model ({d_model}) must be divisible by n_head ({n_head})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"gpt: dropout must be in [0, 1), got {dropout}")
    if name is not None:
        _check_name(name, kind)
    std = 0.02
    block_list = [transformer_block(d_model, n_head, mlp_ratio=mlp_ratio, dropout=dropout,
                                    w_init=inits.normal(std),
                                    gelu_approximate=gelu_approximate, name=f"block_{i}")
                  for i in range(n_layer)]
    blocks = serial(*block_list, name="h")
    ln_f = layer_norm()
    drop = layers.dropout(dropout)
    tokens = layers.embed(vocab_size, d_model)  # its lookup: an id outside the table is NaN

    def check_ids(idx: Any) -> None:
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise ModuleTypeError(kind, f"expected integer token ids, got dtype {idx.dtype} "
                                  f"with shape {tuple(idx.shape)}")
        if len(idx.shape) != 2:
            raise ModuleError(kind, f"expected token ids of shape (batch, seq), got shape "
                              f"{tuple(idx.shape)}")
        if idx.shape[1] > block_size:
            raise ModuleError(kind, f"sequence length {idx.shape[1]} exceeds block_size "
                              f"{block_size}")

    def init(key: PRNGKey, idx: Any, mask: Any = None) -> Params:
        check_ids(idx)
        k_wte, k_wpe, k_h = jax.random.split(key, 3)
        x = jax.ShapeDtypeStruct((*idx.shape, d_model), jnp.float32)
        h = call_in_scope("h", blocks.init, k_h, x)
        scale = 1.0 / math.sqrt(2 * n_layer)
        for block in h.values():
            for path in RESIDUAL_PROJECTIONS:
                *parents, leaf = path
                node = block
                for p in parents:
                    node = node[p]
                node[leaf] = node[leaf] * scale
        return {"wte": {"embedding": inits.normal(std)(k_wte, (vocab_size, d_model))},
                "wpe": {"embedding": inits.normal(std)(k_wpe, (block_size, d_model))},
                "h": h,
                "ln_f": ln_f.init(None, x)}

    def apply(params: Params, idx: Array, mask: Any = None, *, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        check_ids(idx)
        missing = sorted({"wte", "wpe", "h", "ln_f"} - set(params))
        if missing:
            raise ModuleError(kind, f"params are missing key path(s) {missing}")
        if train and dropout and key is None:  # else the embedding dropout's "at the root"
            raise ModuleError(kind, f"train=True with dropout={dropout} needs a PRNG key: "
                              f"call apply(params, ids, key=jax.random.key(...), train=True)")
        k_drop, k_h = (None, None) if key is None else jax.random.split(key)
        wte = params["wte"]["embedding"]
        t = idx.shape[1]
        x = tokens.apply(params["wte"], idx) + params["wpe"]["embedding"][:t]
        x = drop.apply({}, x, key=k_drop, train=train)
        h = blocks if mask is None else serial(*(with_mask(b, mask) for b in block_list))
        x, _ = run_child("h", h, params["h"], (x,), key=k_h, train=train)
        x, _ = run_child("ln_f", ln_f, params["ln_f"], (x,))
        return x @ wte.T.astype(x.dtype)  # the head is tied to the token embedding

    return Module(init, apply, name, kind)
