"""A LoRA training step against a full fine-tuning step of the same small transformer, on the CPU.

Both steps are jitted AdamW steps on the same batch; the LoRA step differentiates only the adapter leaves (the
trainable half from ``jaxpeft.partition``). Prints the median step time of each and their ratio
(target: LoRA / full <= 0.7).

    python benchmarks/lora_vs_full_cpu.py [--rank 8] [--repeats 10] [--shape NAME ...]
"""

import argparse
import functools
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import optax

import jaxpeft


class Block(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        head_dim = self.hidden // self.heads
        q, k, v = (nn.DenseGeneral((self.heads, head_dim), name=n)(x) for n in ("query", "key", "value"))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = nn.LayerNorm()(x + nn.DenseGeneral(self.hidden, axis=(-2, -1), name="output")(attended))
        h = nn.gelu(nn.Dense(4 * self.hidden, name="up")(x))
        return nn.LayerNorm()(x + nn.Dense(self.hidden, name="down")(h)), None


class LM(nn.Module):
    vocab: int
    hidden: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.hidden)(ids)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = stack(self.hidden, self.heads, name="layers")(x, None)
        return nn.Dense(self.vocab, name="lm_head")(x)


def make_step(apply_fn):
    optimizer = optax.adamw(1e-4)

    def loss_fn(trainable, frozen, ids):
        logits = apply_fn(jaxpeft.combine(trainable, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(trainable, frozen, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    return optimizer, step


def median_step_seconds(step, trainable, frozen, state, ids, repeats):
    trainable, state, loss = step(trainable, frozen, state, ids)
    loss.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainable, state, loss = step(trainable, frozen, state, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SHAPES = {  # name: (vocab, hidden, heads, layers, batch, seq)
    "256 wide, 16x128 tokens": (2048, 256, 4, 4, 16, 128),
    "512 wide, 8x128 tokens": (2048, 512, 8, 4, 8, 128),
    "1024 wide, 8x64 tokens": (1024, 1024, 16, 4, 8, 64),
}


def measure(vocab, hidden, heads, layers, batch, seq, rank, repeats):
    model = LM(vocab, hidden, heads, layers)
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    base = model.init(jax.random.key(1), ids[:, :-1])
    config = jaxpeft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, ids[:, :-1])

    # LoRA first: the full step donates (and so deletes) the base arrays that both trees share.
    mask = jaxpeft.trainable_mask(variables, config)
    percent = jaxpeft.count_parameters(variables, mask).percent
    lora_trainable, lora_frozen = jaxpeft.partition(variables, mask)
    optimizer, lora_step = make_step(jaxpeft.rewrite(model.apply, config))
    lora = median_step_seconds(lora_step, lora_trainable, lora_frozen, optimizer.init(lora_trainable), ids, repeats)

    full_trainable, full_frozen = jaxpeft.partition(base, jax.tree_util.tree_map(lambda _: True, base))
    optimizer, full_step = make_step(model.apply)
    full = median_step_seconds(full_step, full_trainable, full_frozen, optimizer.init(full_trainable), ids, repeats)
    return full, lora, percent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; 4-layer scanned transformer LM, AdamW, LoRA r={args.rank} on all "
          "linear layers")
    print(f"{'shape':<26}{'trainable':>10}{'full s':>10}{'LoRA s':>10}{'LoRA/full':>11}")
    for name in args.shape or SHAPES:
        full, lora, percent = measure(*SHAPES[name], args.rank, args.repeats)
        print(f"{name:<26}{percent:>9.2f}%{full:>10.4f}{lora:>10.4f}{lora / full:>11.3f}")
    print("target: LoRA/full <= 0.7 (median step times)")


if __name__ == "__main__":
    main()
