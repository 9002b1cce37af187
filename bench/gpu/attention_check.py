"""Which attention kernel does a bf16 funtrain transformer get on this device?

Compiles a bf16 ``multi_head_attention`` (head size 64) forward and backward and reports
whether the compiled program calls cuDNN's fused attention, plus the step time of
``implementation=None`` (the default) against ``"funtrain"`` and ``"xla"``.

    PYTHONPATH=. python bench/gpu/attention_check.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

from funtrain import nn

B, T, D, H = (8, 1024, 1024, 16) if jax.default_backend() == "gpu" else (2, 64, 128, 2)
x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.bfloat16)
params32 = nn.multi_head_attention(H).init(jax.random.key(1), x)
params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)  # as a bf16 policy casts
print(f"device: {jax.devices()[0].device_kind}; batch {B}, seq {T}, d_model {D}, heads {H}")
cases = [("None", None, params), ("funtrain", "funtrain", params), ("xla", "xla", params),
         ("None, f32 weights", None, params32)]  # bf16 x, f32 q: must not pick cuDNN
for label, impl, p in cases:
    layer = nn.multi_head_attention(H, causal=True, implementation=impl)
    grad = jax.jit(jax.grad(lambda p, x, m=layer: jnp.sum(m.apply(p, x).astype(jnp.float32))))
    hlo = grad.lower(p, x).compile().as_text()
    jax.block_until_ready(grad(p, x))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(p, x))
        times.append(time.perf_counter() - t0)
    fused = "cudnn" in hlo.lower() and "fmha" in hlo.lower()
    print(f"implementation={label:18s} cuDNN fused attention in HLO: {fused!s:5s} "
          f"fwd+bwd {statistics.median(times) * 1e3:8.2f} ms")
