"""The device's fused attention kernel (cuDNN on a GPU, splash on a TPU) against ``xla_attention`` in bfloat16:
for each shape and mask it prints max |kernel - xla| over the output (at the queries that are not padding) and
over the query/key/value gradients, and the time per call of each (jit, warmed up, ``block_until_ready``),
forward and forward + backward.

Run: ``python benchmarks/attention_check.py [--repeats 10]``. Without a GPU or TPU it says it is skipping the
device kernels and only checks the harness itself on splash in Pallas interpret mode at a tiny shape.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models import attention_kernels as kernels
from jaxpeft.models.attention import AttentionMask

BATCH, HEADS, KV_HEADS = 2, 16, 4
LENGTHS = (1024, 2048)
HEAD_DIMS = (64, 128)
MASK_CASES = ("none", "right padding", "left padding", "packed segments")


def build_mask(case: str, batch: int, length: int) -> AttentionMask:
    """A causal self-attention ``AttentionMask`` for ``case`` (one of ``MASK_CASES``)."""
    segments = np.ones((batch, length), np.int32)
    if case == "right padding":
        segments[:, length - length // 4 :] = 0
    elif case == "left padding":
        segments[:, : length // 4] = 0
    elif case == "packed segments":
        bounds = np.linspace(0, length - length // 8, 4).astype(int)
        for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=1):
            segments[:, start:stop] = segment
        segments[:, bounds[-1] :] = 0
    return AttentionMask(jnp.asarray(segments), jnp.zeros((), jnp.int32), query_length=length,
                         given=case != "none")


def make_inputs(batch: int, length: int, head_dim: int, dtype=jnp.bfloat16, seed: int = 0):
    """Random bfloat16 ``(query, key, value)`` with ``HEADS`` query heads and ``KV_HEADS`` key/value heads."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (batch, length, HEADS, head_dim), dtype),
        jax.random.normal(keys[1], (batch, length, KV_HEADS, head_dim), dtype),
        jax.random.normal(keys[2], (batch, length, KV_HEADS, head_dim), dtype),
    )


def attention_functions(kernel, mask: AttentionMask, scale: float):
    """``(forward, gradients)`` of ``kernel``, jitted; the loss is the output against a fixed random cotangent
    that is zero at padding queries."""
    real = (mask.query_segments() != 0).astype(jnp.float32)[:, :, None, None]
    weight = jax.random.normal(jax.random.key(1), (*real.shape[:2], HEADS, 1)) * real

    def forward(query, key, value):
        return kernel(query, key, value, mask, scale=scale)

    def loss(query, key, value):
        return (forward(query, key, value).astype(jnp.float32) * weight).sum()

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def seconds_per_call(function, inputs, repeats: int) -> float:
    """Mean wall time of ``function(*inputs)`` after one warm-up call."""
    jax.block_until_ready(function(*inputs))
    start = time.perf_counter()
    for _ in range(repeats):
        result = function(*inputs)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / repeats


def max_difference(a, b, where=None) -> float:
    """max |a - b| in float32, over the rows of ``where`` (batch, T) when given."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max()) if a.size else 0.0


def check_case(kernel, applies, case: str, length: int, head_dim: int, repeats: int, batch: int = BATCH) -> str:
    """One line: errors and times of ``kernel`` against ``xla_attention`` on one shape and mask (or why
    ``applies``, the kernel's ``*_applies``, skips it)."""
    mask = build_mask(case, batch, length)
    inputs = make_inputs(batch, length, head_dim)
    label = f"T={length:5d} head_dim={head_dim:3d} {case:16s}"
    reason = applies(mask, inputs[0], inputs[1])
    if reason is not None:
        return f"{label} skipped: {reason}"
    scale = head_dim**-0.5
    fused_forward, fused_grad = attention_functions(kernel, mask, scale)
    xla_forward, xla_grad = attention_functions(kernels.xla_attention, mask, scale)
    real = np.asarray(mask.query_segments() != 0)
    out_error = max_difference(fused_forward(*inputs), xla_forward(*inputs), real)
    grad_errors = [max_difference(a, b) for a, b in zip(fused_grad(*inputs), xla_grad(*inputs), strict=True)]
    times = [seconds_per_call(function, inputs, repeats) * 1e3
             for function in (fused_forward, xla_forward, fused_grad, xla_grad)]
    return (f"{label} out {out_error:.3g}  dq/dk/dv {' '.join(f'{e:.3g}' for e in grad_errors)}  "
            f"fwd ms kernel {times[0]:.3f} xla {times[1]:.3f}  fwd+bwd ms kernel {times[2]:.3f} xla {times[3]:.3f}")


def device_kernel():
    """``(name, kernel, applies)`` for this backend's fused attention, or None on CPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn", kernels.cudnn_attention, kernels.cudnn_applies
    if backend == "tpu":
        return "splash", kernels.splash_attention, kernels.splash_applies
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per function after a warm-up")
    args = parser.parse_args()
    found = device_kernel()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}: {jax.devices()[0].device_kind}")
    if found is None:
        print("no GPU or TPU: skipping the device kernels (cudnn, splash); checking this harness on splash in "
              "Pallas interpret mode at batch 1, 128 tokens")
        interpreted = functools.partial(kernels.splash_attention, interpret=True)
        print(check_case(interpreted, kernels.splash_applies, "packed segments", 128, 64, repeats=1, batch=1))
        return
    name, kernel, applies = found
    print(f"{name} vs xla, batch {BATCH}, {HEADS} heads / {KV_HEADS} kv heads, bfloat16, causal")
    for length in LENGTHS:
        for head_dim in HEAD_DIMS:
            for case in MASK_CASES:
                print(check_case(kernel, applies, case, length, head_dim, args.repeats), flush=True)


if __name__ == "__main__":
    main()
