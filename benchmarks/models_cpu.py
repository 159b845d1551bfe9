"""CPU throughput of jaxpeft's models against transformers' torch models, and compile time of scanned layers.

Run: ``python benchmarks/models_cpu.py``. Prints, for a small GPT-2 and a small Llama, tokens/s of the forward and of
forward+backward (next-token cross-entropy) for both libraries on the same batch (median of several timed runs after
a warm-up; torch with 2 threads), then the first-call time (trace + compile + run) of a jitted forward for 4 and 32
layers, scanned and unrolled.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from jaxpeft.models import AutoModelForCausalLM

BATCH, SEQ_LEN, REPEATS = 4, 128, 7
CONFIGS = {
    "gpt2": lambda layers: transformers.GPT2Config(
        n_embd=256, n_layer=layers, n_head=4, vocab_size=8192, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "llama": lambda layers: transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=8192, max_position_embeddings=256,
    ),
}  # fmt: skip


def median_seconds(run, repeats=REPEATS):
    run()  # warm-up (and compile for jax)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_runs(model, ids):
    forward = jax.jit(lambda params, ids: model.module.apply(params, ids).logits)

    def loss(params, ids):
        logits = model.module.apply(params, ids).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    grad = jax.jit(jax.value_and_grad(loss))
    ids = jnp.asarray(ids)
    return (
        lambda: forward(model.params, ids).block_until_ready(),
        lambda: jax.block_until_ready(grad(model.params, ids)),
    )


def torch_runs(model, ids):
    ids = torch.tensor(ids)

    def forward():
        with torch.no_grad():
            model(ids)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return forward, forward_backward


def throughput_rows():
    rows = []
    ids = np.random.RandomState(0).randint(0, 8192, (BATCH, SEQ_LEN))
    tokens = BATCH * SEQ_LEN
    for name, make_config in CONFIGS.items():
        config = make_config(4)
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config).train()
        model = AutoModelForCausalLM.from_config(config, scan_layers=True)
        for (label, ours), theirs in zip(
            zip(("forward", "forward+backward"), jax_runs(model, ids), strict=True),
            torch_runs(reference, ids),
            strict=True,
        ):
            jax_tps, torch_tps = tokens / median_seconds(ours), tokens / median_seconds(theirs)
            rows.append((name, label, jax_tps, torch_tps, jax_tps / torch_tps))
    return rows


def compile_rows():
    rows = []
    ids = jnp.zeros((1, 32), jnp.int32)
    for layers in (4, 32):
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
        )  # fmt: skip
        for scan_layers in (True, False):
            model = AutoModelForCausalLM.from_config(config, scan_layers=scan_layers)
            forward = jax.jit(lambda params, ids, model=model: model.module.apply(params, ids).logits)
            start = time.perf_counter()
            forward(model.params, ids).block_until_ready()
            rows.append((layers, "scanned" if scan_layers else "unrolled", time.perf_counter() - start))
    return rows


def main():
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with 2 threads")
    print(f"batch {BATCH} x {SEQ_LEN} tokens, median of {REPEATS} runs; models: hidden 256, 4 layers, vocab 8192")
    print()
    print(f"{'model':<7}{'pass':<18}{'jaxpeft tok/s':>15}{'torch tok/s':>14}{'ratio':>8}")
    for name, label, ours, theirs, ratio in throughput_rows():
        print(f"{name:<7}{label:<18}{ours:>15,.0f}{theirs:>14,.0f}{ratio:>8.2f}")
    print()
    print("first jitted forward call (trace + compile + run), Llama hidden 64")
    print(f"{'layers':<8}{'stack':<10}{'seconds':>9}")
    for layers, stack, seconds in compile_rows():
        print(f"{layers:<8}{stack:<10}{seconds:>9.2f}")


if __name__ == "__main__":
    main()
