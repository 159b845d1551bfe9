"""LoRA training step on one NNX model: jaxpeft.nnx vs Flax's own ``nnx.LoRA`` wrapping vs qwix's LoRA.

The same decoder (``nnx.Linear`` layers, untied head), the same targets (q and v projections of every block), rank
and alpha, the same batch, AdamW on ``nnx.LoRAParam`` only, each step an ``nnx.jit``-ed ``value_and_grad`` +
``optimizer.update``. The parameter counts are checked equal; the figure is the median step time of each (the
variants timed in turn, round after round), and jaxpeft's time over the others'. qwix is optional
(``pip install qwix``); without it that column is skipped.

    python benchmarks/nnx_lora_cpu.py [--hidden 256] [--layers 4] [--batch 8] [--length 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxpeft
from jaxpeft import nnx as peft_nnx

RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")


class Block(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.heads = max(hidden // 64, 1)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nnx.Linear(hidden, hidden, use_bias=False, rngs=rngs) for _ in range(4))
        self.up_proj = nnx.Linear(hidden, 4 * hidden, rngs=rngs)
        self.down_proj = nnx.Linear(4 * hidden, hidden, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(hidden, rngs=rngs), nnx.RMSNorm(hidden, rngs=rngs)

    def __call__(self, x):
        batch, length, hidden = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(batch, length, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        x = x + self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, hidden))
        return x + self.down_proj(jax.nn.gelu(self.up_proj(self.norm2(x))))


class Decoder(nnx.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
        self.blocks = nnx.List([Block(hidden, rngs) for _ in range(layers)])
        self.head = nnx.Linear(hidden, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def with_flax_lora(model: Decoder, rngs: nnx.Rngs) -> Decoder:
    """Flax's own way: each target ``nnx.Linear`` replaced by an ``nnx.LoRA`` that holds it as ``base_module``."""
    for block in model.blocks:
        for name in TARGETS:
            linear = getattr(block, name)
            lora = nnx.LoRA(linear.in_features, RANK, linear.out_features, base_module=linear, rngs=rngs)
            setattr(block, name, ScaledLoRA(lora, ALPHA / RANK))
    return model


class ScaledLoRA(nnx.Module):
    """``nnx.LoRA`` computes ``base(x) + x A B``; HF PEFT's LoRA scales the update by alpha / r."""

    def __init__(self, lora: nnx.LoRA, scaling: float):
        self.lora, self.scaling = lora, scaling

    def __call__(self, x):
        return self.lora.base_module(x) + self.scaling * ((x @ self.lora.lora_a[...]) @ self.lora.lora_b[...])


def with_qwix_lora(model: Decoder, tokens: jax.Array) -> nnx.Module:
    import qwix

    provider = qwix.LoraProvider([qwix.LoraRule(module_path=".*(" + "|".join(TARGETS) + ")", rank=RANK,
                                                alpha=ALPHA)])
    return qwix.apply_lora_to_model(model, provider, tokens)


def make_step(model: nnx.Module, tokens: jax.Array):
    """A warmed-up jitted LoRA training step of ``model`` (no arguments), and the number of trained parameters."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    def run():
        return jax.block_until_ready(step(model, optimizer, tokens))

    run()
    trained = sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam)))
    return run, trained


def median_times(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per step of each, timed in turn round after round so that load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length + 1), 0, args.vocab)

    def fresh():
        return Decoder(args.vocab, args.hidden, args.layers, nnx.Rngs(0))

    config = jaxpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
    variants = {"jaxpeft.nnx": lambda: peft_nnx.get_peft_model(fresh(), config),
                "flax nnx.LoRA": lambda: with_flax_lora(fresh(), nnx.Rngs(1))}
    try:
        import qwix  # noqa: F401
        variants["qwix"] = lambda: with_qwix_lora(fresh(), tokens[:, :-1])
    except ImportError:
        print("qwix is not installed: its column is skipped (pip install qwix)")
    built = {name: make_step(make(), tokens) for name, make in variants.items()}
    counts = {trained for _, trained in built.values()}
    assert len(counts) == 1, f"the variants train different numbers of parameters: {built}"
    seconds = median_times({name: run for name, (run, _) in built.items()}, args.repeats)
    print(f"{jax.devices()[0].platform}, hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
          f"{args.length}, r={RANK} on {'/'.join(TARGETS)}, {counts.pop():,} trained parameters")
    print("| variant | step s | jaxpeft / variant |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.4f} | {seconds['jaxpeft.nnx'] / value:.3f} |")


if __name__ == "__main__":
    main()
