"""QLoRA against bf16 LoRA: parameter bytes, XLA's compiled memory of one training step, and step time.

    python benchmarks/qlora_cpu.py            # SmolLM2-135M shapes for time, llama-1b shapes for memory

Parameter bytes and XLA's memory analysis of one compiled training step come from shapes alone
(``jax.eval_shape``, ``jit(...).lower(...).compile()``): the llama-1b-shaped model is never materialised. Step
times are medians of round-robin runs of both steps.
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
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from lm_memory import compiled_step_memory  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft import quantization, training  # noqa: E402
from jaxpeft.models import AutoModelForCausalLM  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def abstract_model(name: str, layers: int | None = None):
    settings = dict(SHAPES[name], **({"num_hidden_layers": layers} if layers else {}))
    config = transformers.LlamaConfig(**settings, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config, scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def abstract_params(name: str):
    """(model, abstract params) of a model shape: the params are never computed (only the module is used)."""
    built = {}

    def build():
        built["model"] = abstract_model(name)
        return built["model"].params

    params = jax.eval_shape(build)
    return built["model"], params


def quantized_like(params, qconfig):
    return jax.eval_shape(lambda p: jaxpeft.quantize(p, qconfig), params)


def nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def step_parts(model, params, tokens_shape):
    config = jaxpeft.LoraConfig(r=16, target_modules=TARGETS)
    tokens = jnp.zeros(tokens_shape, jnp.int32)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.module.apply, params, tokens)
    apply_fn = jaxpeft.rewrite(model.module.apply, config)

    def loss_fn(p, batch, rng):
        logits = apply_fn(p, batch[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

    mask = jaxpeft.trainable_mask(variables, config)
    optimizer = optax.adamw(1e-4)
    frozen = jaxpeft.partition(variables, mask)[1]
    state = training.init_train_state(variables, mask, optimizer)
    return training.make_train_step(loss_fn, optimizer, frozen, donate=False), state, tokens


def compiled_memory(model, params, tokens_shape) -> dict:
    """XLA's memory analysis of one LoRA training step (loss, gradients, AdamW update) with ``params`` (abstract)
    as an argument: nothing is materialised."""
    config = jaxpeft.LoraConfig(r=16, target_modules=TARGETS)
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    variables = jax.eval_shape(lambda p: jaxpeft.init_adapters(jax.random.key(0), config, model.module.apply, p,
                                                                 jnp.zeros((1, 8), jnp.int32)), params)
    apply_fn = jaxpeft.rewrite(model.module.apply, config)
    mask = jaxpeft.trainable_mask(variables, config)
    trainable, frozen = jaxpeft.partition(variables, mask)

    def loss_fn(train, fixed, batch):
        logits = apply_fn(jaxpeft.combine(train, fixed), batch[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

    if quantization.has_quantized(frozen):
        loss_fn = quantization.recompute_dequantized(loss_fn)
    return compiled_step_memory(loss_fn, trainable, frozen, tokens)


def memory_table(name: str, qconfig) -> None:
    _, float_params = abstract_params(name)
    quantized = quantized_like(float_params, qconfig)
    sizes = quantization.parameter_bytes(quantized)
    mib = 2**20
    print(f"{name}: quantized layers {sizes['quantized'] / mib:.1f} MiB vs bf16 {sizes['quantized_as_bf16'] / mib:.1f}"
          f" MiB = {sizes['quantized'] / sizes['quantized_as_bf16']:.3f}x; whole model {nbytes(quantized) / 2**20:.1f}"
          f" MiB vs {nbytes(float_params) / 2**20:.1f} MiB = {nbytes(quantized) / nbytes(float_params):.3f}x")


def timed(step, state, tokens, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        state, metrics = step(state, tokens)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - started)
    return times


def speed(name: str, qconfig, layers: int, repeats: int) -> None:
    model = abstract_model(name, layers)
    quantized = jaxpeft.quantize(model.params, qconfig)
    tokens_shape = (4, 129)
    runs = {"bf16 LoRA": step_parts(model, model.params, tokens_shape),
            "QLoRA": step_parts(model, quantized, tokens_shape)}
    for step, state, _ in runs.values():
        timed(step, state, jnp.ones(tokens_shape, jnp.int32), 2)
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, (step, state, _) in runs.items():
            times[label] += timed(step, state, jnp.ones(tokens_shape, jnp.int32), 1)
    medians = {label: statistics.median(values) for label, values in times.items()}
    print(f"{name} ({layers} layers, batch 4 x 128): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in medians.items())
          + f"; QLoRA / bf16 LoRA = {medians['QLoRA'] / medians['bf16 LoRA']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant-type", default="nf4")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--layers", type=int, default=4, help="layers of the timed model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="skip the llama-1b compiled-memory figures")
    options = parser.parse_args()
    qconfig = jaxpeft.QuantizationConfig(options.quant_type, double_quant=options.double_quant)
    print(f"device: {jax.devices()[0].device_kind}, {qconfig}")
    for name in SHAPES:
        memory_table(name, qconfig)
    if not options.skip_compile:
        model, float_params = abstract_params("llama-1b")
        for label, params in (("bf16 LoRA", float_params), ("QLoRA", quantized_like(float_params, qconfig))):
            figures = compiled_memory(model, params, (1, 513))
            print(f"llama-1b one step (batch 1 x 512), {label}: arguments {figures['arguments'] / 2**30:.2f} GiB, "
                  f"temporaries {figures['temporaries'] / 2**30:.2f} GiB")
    speed("smollm2-135m", qconfig, options.layers, options.repeats)


if __name__ == "__main__":
    main()
