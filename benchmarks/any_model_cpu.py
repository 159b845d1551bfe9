"""The generic path (modules that multiply their own parameters, traced to a jaxpr) against the stock-layer path,
on the CPU, in one run.

1. **Custom einsum layers vs stock layers.** The same 4-layer scanned transformer LM twice: once with Flax's
   ``nn.DenseGeneral``/``nn.Dense``, once with a library-style ``Einsum`` module (raw ``self.param`` kernel, the
   equation given at call time). LoRA r=8 on the six projections of every block; jitted AdamW steps on the same
   batch. Target: generic / stock <= 1.1, and the generic path adds nothing to LoRA's cost over the base step.
2. **Expert LoRA via target_parameters vs plain LoRA.** A mixture-of-experts block whose experts are one
   ``(experts, d, hidden)`` tensor per projection sliced per expert, adapted with ``target_parameters`` (one A and
   B per expert), against the same block written with one ``nn.Dense`` per expert and ``target_modules``: the same
   number of adapted weights, the same FLOPs.

Each pair alternates its engines in blocks of timed runs (the median over all runs is reported), so load from other
jobs hits both alike.

    python benchmarks/any_model_cpu.py [--rank 8] [--blocks 3] [--repeats 5]
"""

import argparse
import functools
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxpeft

PROJECTIONS = ["query", "key", "value", "output", "up", "down"]


class Einsum(nn.Module):
    """A library's own layer: the kernel shape is an attribute, the equation comes with each call."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, equation, x):
        return jnp.einsum(equation, x, self.param("w", nn.initializers.lecun_normal(), self.shape))


class Block(nn.Module):
    hidden: int
    heads: int
    custom: bool

    def project(self, name, x, equation, shape, stock):
        return Einsum(shape, name=name)(equation, x) if self.custom else stock(name=name, use_bias=False)(x)

    @nn.compact
    def __call__(self, x, _):
        h, n = self.hidden, self.heads
        d = h // n
        q, k, v = (self.project(name, x, "btc,cnd->btnd", (h, n, d), functools.partial(nn.DenseGeneral, (n, d)))
                   for name in ("query", "key", "value"))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        out = self.project("output", attended, "btnd,ndc->btc", (n, d, h),
                           functools.partial(nn.DenseGeneral, h, axis=(-2, -1)))
        x = nn.LayerNorm()(x + out)
        up = nn.gelu(self.project("up", x, "btc,cf->btf", (h, 4 * h), functools.partial(nn.Dense, 4 * h)))
        return nn.LayerNorm()(x + self.project("down", up, "btf,fc->btc", (4 * h, h), functools.partial(nn.Dense, h))
                              ), None


class LM(nn.Module):
    vocab: int
    hidden: int
    heads: int
    layers: int
    custom: bool

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.hidden)(ids)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
        x, _ = stack(self.hidden, self.heads, self.custom, name="layers")(x, None)
        return nn.Dense(self.vocab, name="lm_head")(x)


class StackedExperts(nn.Module):
    """Experts as one tensor per projection, sliced per expert (dense dispatch: every expert sees every token,
    weighted by its gate)."""

    experts: int
    inner: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        gates = jax.nn.softmax(x @ self.param("router", nn.initializers.lecun_normal(), (d, self.experts)))
        w_in = self.param("w_in", nn.initializers.lecun_normal(), (self.experts, d, self.inner))
        w_out = self.param("w_out", nn.initializers.lecun_normal(), (self.experts, self.inner, d))
        return sum(gates[..., e:e + 1] * (jax.nn.silu(x @ w_in[e]) @ w_out[e]) for e in range(self.experts))


class DenseExperts(nn.Module):
    """The same experts, one ``nn.Dense`` per expert and projection."""

    experts: int
    inner: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        gates = jax.nn.softmax(x @ self.param("router", nn.initializers.lecun_normal(), (d, self.experts)))
        return sum(gates[..., e:e + 1] * nn.Dense(d, use_bias=False, name=f"w_out_{e}")(
            jax.nn.silu(nn.Dense(self.inner, use_bias=False, name=f"w_in_{e}")(x))) for e in range(self.experts))


class MoELM(nn.Module):
    vocab: int
    hidden: int
    experts: int
    layers: int
    stacked: bool

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.hidden)(ids)
        for i in range(self.layers):
            experts = StackedExperts if self.stacked else DenseExperts
            x = nn.LayerNorm(name=f"norm_{i}")(x + experts(self.experts, 2 * self.hidden, name=f"moe_{i}")(x))
        return nn.Dense(self.vocab, name="lm_head")(x)


def make_step(apply_fn):
    optimizer = optax.adamw(1e-4)

    def loss_fn(trainable, frozen, ids):
        logits = apply_fn(jaxpeft.combine(trainable, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(trainable, frozen, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    return optimizer, step


def prepared_step(model, config, ids):
    """A jitted, warmed-up LoRA step of ``model`` (``config`` None: the base step, everything trainable) and a
    function that runs it once; and the trainable share."""
    base = model.init(jax.random.key(1), ids[:, :-1])
    if config is None:
        mask = jax.tree_util.tree_map(lambda _: True, base)
        variables, apply_fn = base, model.apply
    else:
        variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, ids[:, :-1])
        mask = jaxpeft.trainable_mask(variables, config)
        apply_fn = jaxpeft.rewrite(model.apply, config)
    trainable, frozen = jaxpeft.partition(variables, mask)
    optimizer, step = make_step(apply_fn)
    state = optimizer.init(trainable)
    step(trainable, frozen, state, ids)[2].block_until_ready()

    def once():
        start = time.perf_counter()
        step(trainable, frozen, state, ids)[2].block_until_ready()
        return time.perf_counter() - start

    return once, jaxpeft.count_parameters(variables, mask).trainable


def alternate(runs: dict, blocks: int, repeats: int) -> dict[str, float]:
    """Median seconds per engine, the engines taking turns in ``blocks`` blocks of ``repeats`` runs."""
    times = {name: [] for name in runs}
    for _ in range(blocks):
        for name, once in runs.items():
            times[name].extend(once() for _ in range(repeats))
    return {name: statistics.median(values) for name, values in times.items()}


def custom_vs_stock(rank, blocks, repeats):
    vocab, hidden, heads, layers, batch, seq = 2048, 256, 4, 4, 8, 128
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    config = jaxpeft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS)
    runs, counts = {}, {}
    for custom in (False, True):
        model = LM(vocab, hidden, heads, layers, custom)
        kind = "generic" if custom else "stock"
        runs[f"{kind} base"], _ = prepared_step(model, None, ids)
        runs[f"{kind} LoRA"], counts[kind] = prepared_step(model, config, ids)
    seconds = alternate(runs, blocks, repeats)
    assert counts["generic"] == counts["stock"], counts
    print(f"\n1. custom einsum layers vs stock layers: hidden {hidden}, {layers} scanned layers, batch {batch} x {seq},"
          f" LoRA r={rank} on {', '.join(PROJECTIONS)} ({counts['stock']:,} trainable on both)")
    print(f"{'path':<10}{'base step s':>13}{'LoRA step s':>13}{'LoRA / base':>13}")
    for kind in ("stock", "generic"):
        base, lora = seconds[f"{kind} base"], seconds[f"{kind} LoRA"]
        print(f"{kind:<10}{base:>13.4f}{lora:>13.4f}{lora / base:>13.3f}")
    print(f"generic / stock, LoRA step: {seconds['generic LoRA'] / seconds['stock LoRA']:.3f} (target <= 1.1)")


def experts_vs_dense(rank, blocks, repeats):
    vocab, hidden, experts, layers, batch, seq = 2048, 256, 4, 2, 8, 128
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
    stacked = jaxpeft.LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["w_in", "w_out"])
    dense = jaxpeft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=r".*moe_\d+\.w_(in|out)_\d+")
    runs, counts = {}, {}
    runs["target_parameters"], counts["target_parameters"] = prepared_step(
        MoELM(vocab, hidden, experts, layers, stacked=True), stacked, ids)
    runs["target_modules"], counts["target_modules"] = prepared_step(
        MoELM(vocab, hidden, experts, layers, stacked=False), dense, ids)
    seconds = alternate(runs, blocks, repeats)
    assert counts["target_parameters"] == counts["target_modules"], counts
    print(f"\n2. expert LoRA: {layers} MoE layers of {experts} experts (hidden {hidden}, inner {2 * hidden}), batch "
          f"{batch} x {seq}, r={rank} on every expert's two projections ({counts['target_modules']:,} trainable on "
          "both)")
    print(f"{'adapted through':<20}{'LoRA step s':>13}")
    for name, value in seconds.items():
        print(f"{name:<20}{value:>13.4f}")
    print(f"target_parameters / target_modules: {seconds['target_parameters'] / seconds['target_modules']:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; median jitted AdamW step times")
    custom_vs_stock(args.rank, args.blocks, args.repeats)
    experts_vs_dense(args.rank, args.blocks, args.repeats)


if __name__ == "__main__":
    main()
