"""Models written the way JAX LLM libraries write them, not the way jaxpeft's own families are: their own einsum
module with the equation given at call time and multi-axis kernels, raw ``self.param`` kernels used in
``jnp.einsum`` and ``@``, a mixture of experts held as one ``(experts, d_in, d_out)`` tensor and sliced per expert,
stacked with ``nn.scan`` and ``nn.remat``. jaxpeft must adapt them without knowing them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Einsum(nn.Module):
    """A library's own einsum layer: the kernel shape is an attribute, the equation comes with each call."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        w = self.param("w", nn.initializers.normal(0.2), self.shape)
        return jnp.einsum(equation, x, w.astype(x.dtype))


class Attention(nn.Module):
    """Gemma-style projections: q (heads, d, head_dim), stacked k/v (2, kv_heads, d, head_dim), out (heads,
    head_dim, d)."""

    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        q = Einsum((self.heads, d, self.head_dim), name="q_einsum")("bsd,ndh->bsnh", x)
        k, v = Einsum((2, self.kv_heads, d, self.head_dim), name="kv_einsum")("bsd,ckdh->cbskh", x)
        repeat = self.heads // self.kv_heads
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / jnp.sqrt(self.head_dim)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        mixed = jnp.einsum("bnqk,bknh->bqnh", probs, v)
        return Einsum((self.heads, self.head_dim, d), name="attn_vec_einsum")("bsnh,nhd->bsd", mixed)


class FeedForward(nn.Module):
    """Raw parameters: a gating kernel (2, d, hidden) used in one einsum, the output kernel used with ``@`` and an
    output bias."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gating = self.param("gating_einsum", nn.initializers.normal(0.2), (2, d, self.hidden))
        linear = self.param("linear", nn.initializers.normal(0.2), (self.hidden, d))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        gate, up = jnp.einsum("bsd,cdf->cbsf", x, gating)
        return (jax.nn.gelu(gate) * up) @ linear + bias


class Experts(nn.Module):
    """A mixture of experts whose weights are one tensor per projection, sliced per expert in a Python loop."""

    experts: int = 4
    hidden: int = 16
    top_k: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        router = self.param("router", nn.initializers.normal(0.2), (d, self.experts))
        w_in = self.param("w_in", nn.initializers.normal(0.2), (self.experts, d, self.hidden))
        w_out = self.param("w_out", nn.initializers.normal(0.2), (self.experts, self.hidden, d))
        logits = x @ router
        top, chosen = jax.lax.top_k(logits, self.top_k)
        weights = jax.nn.softmax(top, axis=-1)
        out = jnp.zeros_like(x)
        for e in range(self.experts):
            gate = jnp.sum(jnp.where(chosen == e, weights, 0.0), axis=-1, keepdims=True)
            out = out + gate * (jax.nn.silu(x @ w_in[e]) @ w_out[e])
        return out


class Block(nn.Module):
    moe: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        x = x + Attention(name="attn")(nn.RMSNorm(name="pre_attention_norm")(x))
        mlp = Experts(name="mlp") if self.moe else FeedForward(name="mlp")
        x = x + mlp(nn.RMSNorm(name="pre_ffw_norm")(x))
        return x, None


class Transformer(nn.Module):
    """Embedding, a stack of blocks (``nn.scan`` with ``scan=True``, ``nn.remat`` with ``remat=True``), tied
    output."""

    vocab: int = 50
    width: int = 16
    layers: int = 2
    moe: bool = False
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embedding = self.param("embedding", nn.initializers.normal(1.0), (self.vocab, self.width))
        x = embedding[tokens]
        block = nn.remat(Block) if self.remat else Block
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            x, _ = stack(moe=self.moe, name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = block(moe=self.moe, name=f"layers_{i}")(x)
        return nn.RMSNorm(name="final_norm")(x) @ embedding.T
