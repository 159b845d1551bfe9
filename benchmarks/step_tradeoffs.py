"""What a LoRA training step's settings cost in time and memory, side by side in one process: the per-layer remat
policy, the chunked or full-logits loss, scanned or unrolled layers, the compute dtype. SmolLM2-135M's shape (random
weights; ``--layers`` of its 30), LoRA r=16 on all seven projections, AdamW.

    python benchmarks/step_tradeoffs.py                                   # the remat policies, float32
    python benchmarks/step_tradeoffs.py --layers 4 --seq 1024 --variants loss=chunked loss=full

Each variant is ``key=value[,key=value]`` with keys ``remat`` (``none`` or a ``remat_policy`` name), ``loss``
(``chunked``, ``full``), ``scan`` (``true``, ``false``) and ``dtype`` (``float32``, ``bfloat16``: weights and
compute; adapters and AdamW state stay float32). The steps of all variants take turns, round after round, so that
a slow spell of the machine falls on all of them alike; each row gives the median and the fastest step, the median
as a multiple of the first variant's, and the temporaries of XLA's compiled step (``memory_analysis``: activations
kept for the backward pass, logits, gradients) with the argument bytes (weights, adapters, optimizer state, batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step_breakdown import SMOLLM2, llama_lora  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft import losses, training  # noqa: E402

DEFAULT_VARIANTS = ["remat=none", "remat=dots_with_no_batch_dims", "remat=dots", "remat=full"]
GIB = 2**30


def parse_variant(text: str) -> dict:
    """``"remat=dots,loss=full"`` as ``{"remat": "dots", "loss": "full", "scan": True, "dtype": "float32"}``."""
    settings = {"remat": "none", "loss": "chunked", "scan": "true", "dtype": "float32"}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in settings:
            raise SystemExit(f"unknown setting {key!r} in variant {text!r}; use remat, loss, scan or dtype")
        settings[key] = value
    if settings["loss"] not in ("chunked", "full") or settings["scan"] not in ("true", "false"):
        raise SystemExit(f"variant {text!r}: loss is chunked or full, scan is true or false")
    return {**settings, "scan": settings["scan"] == "true"}


def build_step(layers: int, settings: dict, batch: dict):
    """``(step, state, memory)`` for one variant: its jitted train step, a fresh state, and the compiled step's
    ``(temporary, argument)`` bytes."""
    _, _, model = llama_lora(layers, dtype=settings["dtype"], param_dtype=settings["dtype"],
                             scan_layers=settings["scan"],
                             remat_policy=None if settings["remat"] == "none" else settings["remat"])
    _, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    chunk = losses.DEFAULT_CHUNK_SIZE if settings["loss"] == "chunked" else None
    loss_fn = training.peft_loss_fn(model, lm_loss_chunk_size=chunk)
    optimizer = optax.adamw(1e-4)
    state = training.init_train_state(model.params, model.trainable_mask, optimizer)
    step = training.make_train_step(loss_fn, optimizer, frozen, compute_dtype=settings["dtype"], donate=False)
    compiled = step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    return step, state, (analysis.temp_size_in_bytes, analysis.argument_size_in_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    ids = jax.random.randint(jax.random.key(0), (args.batch_size, args.seq), 0, SMOLLM2["vocab_size"], jnp.int32)
    batch = {"input_ids": ids}
    runs = {}
    for text in args.variants:
        step, state, memory = build_step(args.layers, parse_variant(text), batch)
        start = time.perf_counter()
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        runs[text] = {"step": step, "state": state, "memory": memory, "seconds": [],
                      "first": time.perf_counter() - start, "loss": float(metrics["loss"])}
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], _ = run["step"](run["state"], batch)
            jax.block_until_ready(run["state"])
            run["seconds"].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq
    print(f"SmolLM2 shape, {args.layers} layers, {args.batch_size} x {args.seq} tokens, LoRA r=16, AdamW, "
          f"{jax.devices()[0].device_kind} (jax {jax.__version__}); median of {args.rounds} rounds")
    print("| variant | median s | fastest s | x first | tokens/s | temporaries GiB | arguments GiB | first 2 steps s "
          "| loss |\n|---|---|---|---|---|---|---|---|---|")
    reference = statistics.median(next(iter(runs.values()))["seconds"])
    for text, run in runs.items():
        median = statistics.median(run["seconds"])
        temp, arguments = run["memory"]
        print(f"| {text} | {median:.2f} | {min(run['seconds']):.2f} | {median / reference:.2f} | {tokens / median:.0f} "
              f"| {temp / GIB:.2f} | {arguments / GIB:.2f} | {run['first']:.1f} | {run['loss']:.5f} |")


if __name__ == "__main__":
    main()
