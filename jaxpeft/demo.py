"""The offline demo: pre-train a small transformer on one task, then LoRA-adapt it to another.

Run with ``python -m jaxpeft.demo``. Everything is built in (model, data), nothing is downloaded. Task A is
"which of three token groups occurs most often in the sequence"; task B, the adaptation, is "which occurs
least often". A LoRA adapter (and a trainable copy of the classifier) learns task B and is merged back at the end.
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft

VOCAB, GROUPS, LENGTH = 30, 3, 24


class Block(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        head_dim = self.hidden // self.heads
        q, k, v = (nn.DenseGeneral((self.heads, head_dim), name=n)(x) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
        attended = nn.DenseGeneral(self.hidden, axis=(-2, -1), name="output")(
            jnp.einsum("bhqk,bkhd->bqhd", weights, v))
        x = nn.LayerNorm(name="attention_norm")(x + attended)
        h = nn.Dense(4 * self.hidden, name="intermediate")(x)
        return nn.LayerNorm(name="output_norm")(x + nn.Dense(self.hidden, name="mlp_output")(nn.gelu(h))), None


class TinyEncoder(nn.Module):
    """An encoder classifier with scanned, rematerialised layers."""

    hidden: int = 64
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, self.hidden, name="embed")(ids)
        x = x + self.param("position", nn.initializers.normal(0.02), (LENGTH, self.hidden))
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.layers)
        x, _ = stack(self.hidden, self.heads, name="layer")(x, None)
        return nn.Dense(GROUPS, name="classifier")(x.mean(axis=1))


def make_task(rng: np.random.Generator, size: int, least: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of tokens; the label is the token group (token % 3) that occurs most (or least) often."""
    ids = rng.integers(0, VOCAB, (size, LENGTH))
    counts = np.stack([(ids % GROUPS == g).sum(1) for g in range(GROUPS)], axis=1)
    labels = counts.argmin(1) if least else counts.argmax(1)
    unique = (counts == (counts.min(1) if least else counts.max(1))[:, None]).sum(1) == 1
    return ids[unique], labels[unique]


def train(loss_apply, trainable, frozen, ids, labels, steps: int, lr: float, seed: int):
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), weight_decay=0.01)
    state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, frozen, state, batch_ids, batch_labels):
        def loss_fn(trainable):
            logits = loss_apply(jaxpeft.combine(trainable, frozen), batch_ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        batch = rng.integers(0, len(ids), 64)
        trainable, state, loss = step(trainable, frozen, state, ids[batch], labels[batch])
        if (i + 1) % max(steps // 4, 1) == 0:
            print(f"    step {i + 1:4d}  loss {float(loss):.4f}")
    return trainable


def accuracy(apply_fn, variables, ids, labels) -> float:
    logits = jax.jit(apply_fn)(variables, ids)
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lora-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    rng = np.random.default_rng(args.seed)
    model = TinyEncoder()
    train_a, test_a = make_task(rng, 8000, least=False), make_task(rng, 2000, least=False)
    train_b, test_b = make_task(rng, 8000, least=True), make_task(rng, 2000, least=True)

    print("1. Pre-train the whole model on task A (most frequent token group)")
    base = model.init(jax.random.key(args.seed), train_a[0][:1])
    no_mask = jax.tree_util.tree_map(lambda _: True, base)
    base = train(model.apply, *jaxpeft.partition(base, no_mask), *train_a, args.pretrain_steps, 3e-3, args.seed)
    print(f"   task A test accuracy: {accuracy(model.apply, base, *test_a):.3f}")
    print(f"   the same model on task B (least frequent group): {accuracy(model.apply, base, *test_b):.3f}")

    print("2. LoRA on attention and MLP, classifier in modules_to_save, for task B")
    config = jaxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["classifier"])
    variables = jaxpeft.init_adapters(jax.random.key(args.seed + 1), config, model.apply, base, train_b[0][:1])
    mask = jaxpeft.trainable_mask(variables, config)
    print(f"   {jaxpeft.count_parameters(variables, mask)}")
    adapted = jaxpeft.rewrite(model.apply, config)
    trainable, frozen = jaxpeft.partition(variables, mask)
    trainable = train(adapted, trainable, frozen, *train_b, args.lora_steps, 3e-3, args.seed)
    variables = jaxpeft.combine(trainable, frozen)
    lora_accuracy = accuracy(adapted, variables, *test_b)
    print(f"   task B test accuracy with the adapter: {lora_accuracy:.3f}")
    base_only = functools.partial(adapted, adapter_name=None)
    print(f"   task A accuracy with the adapter switched off: {accuracy(base_only, variables, *test_a):.3f}")

    print("3. Merge the adapter into the weights")
    merged = jaxpeft.merge(variables, config)
    print(f"   merged model (plain apply) on task B: {accuracy(model.apply, merged, *test_b):.3f}")
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
