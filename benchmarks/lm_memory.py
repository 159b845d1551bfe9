"""XLA's compiled memory of one LoRA training step at real shapes: the full-logits loss against the chunked one,
the dense XLA attention against the chunked one, with and without per-layer rematerialisation. Compiled from shapes
alone: no weight is ever materialised.

    python benchmarks/lm_memory.py                       # gpt2-124m (16 x 1024) and llama-1b (8 x 2048), bf16
    python benchmarks/lm_memory.py --models gpt2-124m --remat none,dots --attention xla

Each row is ``jit(step).lower(...).compile().memory_analysis()`` of the step ``benchmarks/gpu_lora.py`` times
(bf16 weights and compute, LoRA r=16 on every linear layer of the blocks, float32 adapters and AdamW state,
state donated): argument bytes (weights, adapters, optimizer state, batch) and temporaries (activations, logits,
gradients), on the backend this runs on (XLA's CPU and GPU compilers plan buffers differently; run it on the
device machine for GPU figures). torch.compile's measured peaks for the same steps on an H100 are printed beside.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from gpu_lora import ALPHA, RANK, TARGETS, model_setup  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft.losses import chunked_causal_lm_sums  # noqa: E402
from jaxpeft.models import AutoModelForCausalLM  # noqa: E402
from jaxpeft.training import loss_sums  # noqa: E402

TORCH_COMPILE_PEAK_GIB = {"gpt2-124m": 13.3, "llama-1b": 43.5}  # torch PEFT + torch.compile, H100 (RESULTS.md)
GIB = 2**30


def abstract_lora(name: str, remat: str | None, attention: str | None = None):
    """``(apply_fn, trainable, frozen, tokens)``, all abstract, for a benchmark model with LoRA."""
    family, config, batch, seq = model_setup(name, tiny=False)
    built = {}

    def build():
        built["model"] = AutoModelForCausalLM.from_config(config, dtype="bfloat16", param_dtype="bfloat16",
                                                          scan_layers=True, remat_policy=remat,
                                                          attention_implementation=attention)
        return built["model"].params

    params = jax.eval_shape(build)
    module = built["model"].module
    lora = jaxpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family])
    variables = jax.eval_shape(lambda p: jaxpeft.init_adapters(jax.random.key(0), lora, module.apply, p,
                                                                jnp.zeros((1, 8), jnp.int32)), params)
    mask = jaxpeft.trainable_mask(variables, lora)
    trainable, frozen = jaxpeft.partition(variables, mask)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return jaxpeft.rewrite(module.apply, lora), trainable, frozen, tokens


def loss_function(apply_fn, chunked: bool):
    def loss(variables, tokens):
        if not chunked:
            logits = apply_fn(variables, tokens).logits
            sums = loss_sums(logits, tokens, "causal_lm")
        else:
            hidden = apply_fn(variables, tokens, method="hidden_states")
            sums = chunked_causal_lm_sums(hidden, tokens, lambda h: apply_fn(variables, h, method="lm_logits"))
        return sums["loss_sum"] / sums["count"]

    return loss


def compiled_step_memory(loss_fn, trainable, frozen, batch) -> dict:
    """XLA's memory analysis of one training step (gradient of ``loss_fn(trainable, frozen, batch)``, AdamW update,
    trainable leaves and optimizer state donated), compiled from abstract arguments: argument and temporary bytes."""
    optimizer = optax.adamw(1e-4)

    def step(train, opt_state, fixed, batch):
        grads = jax.grad(loss_fn)(train, fixed, batch)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state

    opt_state = jax.eval_shape(optimizer.init, trainable)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, batch).compile()
    analysis = compiled.memory_analysis()
    return {"arguments": analysis.argument_size_in_bytes, "temporaries": analysis.temp_size_in_bytes}


def step_memory(name: str, remat: str | None, chunked: bool, attention: str | None) -> dict:
    apply_fn, trainable, frozen, tokens = abstract_lora(name, remat, attention)
    loss = loss_function(apply_fn, chunked)
    return compiled_step_memory(lambda train, fixed, batch: loss(jaxpeft.combine(train, fixed), batch), trainable,
                                frozen, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2-124m,llama-1b")
    parser.add_argument("--remat", default="full,dots", help="comma-separated remat policies ('none': no remat)")
    parser.add_argument("--attention", default="xla,xla_chunked",
                        help="comma-separated attention implementations (see jaxpeft.models.attention_kernels)")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"{'model':<10} {'remat':<6} {'attention':<12} {'loss':<8} {'args GiB':>9} {'temp GiB':>9} "
          f"{'total GiB':>10} {'/ torch.compile':>16}")
    for name in args.models.split(","):
        for remat in args.remat.split(","):
            for attention in args.attention.split(","):
                for chunked in (False, True):
                    memory = step_memory(name, None if remat == "none" else remat, chunked, attention)
                    total = (memory["arguments"] + memory["temporaries"]) / GIB
                    print(f"{name:<10} {remat:<6} {attention:<12} {'chunked' if chunked else 'full':<8} "
                          f"{memory['arguments'] / GIB:>9.2f} {memory['temporaries'] / GIB:>9.2f} {total:>10.2f} "
                          f"{total / TORCH_COMPILE_PEAK_GIB[name]:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
