"""Where a LoRA training step's time goes, op by op: a ``jax.profiler`` trace of the jitted step at SmolLM2-135M's
shape (random weights; ``--layers`` of its 30), its XLA ops grouped by what they compute, forward and backward.

    python benchmarks/step_profile.py                        # 30 scanned layers, 4 x 256 tokens, float32
    python benchmarks/step_profile.py --layers 4 --remat dots_with_no_batch_dims --top 20
    python benchmarks/step_profile.py --shape tiny            # cpu_targets.py's 4-layer Llama, 8 x 128 tokens

Each XLA op of the trace is named after the JAX operation it came from (the compiled step's ``op_name``
metadata), which says which module ran it and whether it belongs to the backward pass (``transpose(...)``). The
groups: the matmuls of the MLP and of the attention projections (adapters included: they run inside the same
modules), the attention itself (scores, softmax, weighted sum), the norms and the rest of the layer, the scanned
loop's bookkeeping (slicing each layer's weights out of the stacked ones, writing and reading the values kept for
the backward pass, zero-filling their buffers), the output head with the loss, and the optimizer. Times are the
sum of the ops' durations per step; on a multi-core CPU two ops may overlap, so the sum can exceed the step.
On the CPU the ops are traced with ``--xla_cpu_enable_xprof_traceme``, which this script adds to ``XLA_FLAGS``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step_breakdown import add_shape_arguments, llama_lora, parse_shape_arguments  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft import losses, training  # noqa: E402

# Within the layers, (group, pattern on the op_name): the first match wins.
LAYER_GROUPS = [
    ("MLP matmuls", r"mlp/(gate|up|down)_proj/dot_general"),
    ("attention projections", r"self_attn/[qkvo]_proj/dot_general"),
    ("attention (scores, softmax, sum)", r"self_attn/"),
    ("scan bookkeeping", r"run_layers/(while/body/)?(jit\(dynamic_(update_)?index_in_dim\)|broadcast_in_dim)"),
    ("norms, activation, residuals", r""),
]


def op_names(compiled_text: str) -> dict[str, str]:
    """Each XLA instruction's name to the JAX operation it came from ("" where XLA made it up: zero-fills, copies)."""
    names = {}
    for line in compiled_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match and not re.search(r" (while|conditional|call)\(", line):  # their bodies' ops are traced apart
            op_name = re.search(r"op_name=\"([^\"]*)\"", line)
            names[match.group(1)] = op_name.group(1) if op_name else ""
    return names


def group_of(op_name: str) -> str:
    if not op_name:
        return "ops XLA added (buffer zero-fills, copies)"
    if "run_layers" in op_name:
        return next(group for group, pattern in LAYER_GROUPS if re.search(pattern, op_name))
    if "lm_logits" in op_name or "/while/" in op_name:
        return "output head and loss"
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer"
    return "other (embedding, final norm)"


def traced_ops(step, state, batch, steps: int) -> tuple[list[dict], object]:
    """The complete events of ``steps`` profiled steps, and the state after them."""
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(steps):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as trace:
            events = json.load(trace)["traceEvents"]
    return [event for event in events if event.get("ph") == "X"], state


def summarise(events: list[dict], names: dict[str, str], steps: int, top: int) -> None:
    by_group = collections.defaultdict(lambda: [0.0, 0.0])
    by_op = collections.Counter()
    for event in events:
        op_name = names.get(event["name"])
        if op_name is None:
            continue  # runtime events (executor, thread pool), not XLA ops
        backward = "transpose(" in op_name
        milliseconds = event["dur"] / 1e3 / steps
        by_group[group_of(op_name)][backward] += milliseconds
        label = re.sub(r"\d+", "#", op_name or event["name"])[-110:]
        by_op[("backward" if backward else "forward", label)] += milliseconds
    total = sum(sum(times) for times in by_group.values())
    print("| group | forward ms | backward ms | share |\n|---|---|---|---|")
    for group, (forward, backward) in sorted(by_group.items(), key=lambda item: -sum(item[1])):
        print(f"| {group} | {forward:.0f} | {backward:.0f} | {(forward + backward) / total:.0%} |")
    print(f"| all XLA ops | {sum(t[0] for t in by_group.values()):.0f} | {sum(t[1] for t in by_group.values()):.0f} "
          f"| 100% |")
    print(f"\nthe {top} largest ops (ms per step):")
    for (phase, op_name), milliseconds in by_op.most_common(top):
        print(f"{milliseconds:8.1f}  {phase:8s}  {op_name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--remat", default="none", help="a remat_policy name, or none")
    parser.add_argument("--unrolled", action="store_true", help="unrolled layers rather than one scanned stack")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after two unprofiled ones)")
    parser.add_argument("--top", type=int, default=15)
    args = parse_shape_arguments(parser)
    config, _, model = llama_lora(args.layers, args.shape, scan_layers=not args.unrolled,
                                  remat_policy=None if args.remat == "none" else args.remat)
    _, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    optimizer = optax.adamw(1e-4)
    loss_fn = training.peft_loss_fn(model, lm_loss_chunk_size=losses.DEFAULT_CHUNK_SIZE)
    step = training.make_train_step(loss_fn, optimizer, frozen, compute_dtype="float32")
    state = training.init_train_state(model.params, model.trainable_mask, optimizer)
    batch = {"input_ids": jax.random.randint(jax.random.key(0), (args.batch_size, args.seq), 0, config.vocab_size)}
    names = op_names(step.lower(state, batch).compile().as_text())
    for _ in range(2):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    events, state = traced_ops(step, state, batch, args.steps)
    print(f"{args.shape} shape, {args.layers} {'unrolled' if args.unrolled else 'scanned'} layers, remat {args.remat}, "
          f"{args.batch_size} x {args.seq} tokens, LoRA r=16, AdamW, float32, {jax.devices()[0].device_kind} "
          f"(jax {jax.__version__}); one unprofiled step: {seconds * 1e3:.0f} ms; mean of {args.steps} traced steps")
    summarise(events, names, args.steps, args.top)


if __name__ == "__main__":
    main()
