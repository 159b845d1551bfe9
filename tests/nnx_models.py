"""NNX models written the way NNX codebases write them, not for jaxpeft.

- ``Llama``: a Llama written with ``nnx.Linear``/``nnx.Embed`` and transformers' parameter names
  (``model.layers.0.self_attn.q_proj``), with ``load_torch`` to take a transformers ``LlamaForCausalLM``'s weights.
- ``EinsumMoE``: in the style of Gemma's and MaxText's NNX code: its own einsum modules (the equation fixed at
  construction, ``(d, heads, head_dim)`` kernels as raw ``nnx.Param``), a mixture of experts with raw
  ``(experts, d, f)`` parameters sliced per expert, ``nnx.RMSNorm``, and its blocks either stacked with
  ``nnx.vmap`` and run by ``nnx.scan`` or kept in an ``nnx.List``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------------------- Llama


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones(dim))
        self.eps = eps

    def __call__(self, x):
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return self.weight[...] * (x * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        hidden, self.heads, self.kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = hidden // self.heads
        self.theta = config.rope_parameters["rope_theta"] if config.rope_parameters else 10000.0
        self.q_proj = nnx.Linear(hidden, self.heads * self.head_dim, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(hidden, self.kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(hidden, self.kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(self.heads * self.head_dim, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x, attention_mask=None):
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, self.kv_heads, self.head_dim)
        inv_freq = 1.0 / self.theta ** (jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim)
        angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
        angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
        q = q * jnp.cos(angles) + rotate_half(q) * jnp.sin(angles)
        k = k * jnp.cos(angles) + rotate_half(k) * jnp.sin(angles)
        k = jnp.repeat(k, self.heads // self.kv_heads, axis=2)
        v = jnp.repeat(v, self.heads // self.kv_heads, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        weights = jax.nn.softmax(jnp.where(allowed, scores, -1e30).astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(hidden, inner, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(hidden, inner, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(inner, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, attention_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, config, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.norm(x)


class Llama(nnx.Module):
    """``LlamaForCausalLM`` (untied head, no biases, default RoPE) in NNX, with transformers' module names."""

    def __init__(self, config, rngs: nnx.Rngs):
        self.model = LlamaModel(config, rngs)
        self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        return self.lm_head(self.model(input_ids, attention_mask))


def tiny_llama() -> Llama:
    """A factory for ``jaxpeft train --model nnx_models:tiny_llama``: a random Llama (the same weights on every call)
    over the MiniLM tokenizer's vocabulary."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    return Llama(config, nnx.Rngs(0))


def load_torch(model: nnx.Module, state_dict) -> None:
    """Sets ``model``'s parameters from a torch state dict with the same module names (Linear weights
    transposed)."""
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = model
        for segment in path:
            module = module[int(segment)] if segment.isdigit() else getattr(module, segment)
        value = jnp.asarray(tensor.detach().float().numpy())
        if isinstance(module, nnx.Linear):
            module.kernel.set_value(value.T)
        elif isinstance(module, nnx.Embed):
            module.embedding.set_value(value)
        else:
            getattr(module, leaf).set_value(value)


# ----------------------------------------------------------------------------------------- einsum + MoE


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    vocab: int = 50
    dim: int = 16
    heads: int = 2
    head_dim: int = 8
    experts: int = 4
    top_k: int = 2
    expert_dim: int = 24
    layers: int = 2
    stacked: bool = True


class Einsum(nnx.Module):
    """An einsum with its equation fixed at construction and a raw kernel."""

    def __init__(self, equation: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.equation = equation
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.2)

    def __call__(self, x):
        return jnp.einsum(self.equation, x, self.w[...])


class EinsumAttention(nnx.Module):
    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        d, n, h = config.dim, config.heads, config.head_dim
        self.q_einsum = Einsum("BTD,DNH->BTNH", (d, n, h), rngs)
        self.kv_einsum = Einsum("BSD,CDNH->CBSNH", (2, d, n, h), rngs)
        self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (n, h, d), rngs)

    def __call__(self, x):
        q = self.q_einsum(x)
        k, v = self.kv_einsum(x)
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        return self.attn_vec_einsum(jnp.einsum("BNTS,BSNH->BTNH", weights, v))


class MoE(nnx.Module):
    """Top-k routed experts; ``gate_up`` ``(experts, d, 2 f)`` and ``down`` ``(experts, f, d)`` are raw parameters,
    each expert's slice multiplied densely and weighted by its routing probability."""

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        e, d, f = config.experts, config.dim, config.expert_dim
        self.top_k = config.top_k
        self.router = nnx.Linear(d, e, use_bias=False, rngs=rngs)
        self.gate_up = nnx.Param(jax.random.normal(rngs.params(), (e, d, 2 * f)) * 0.2)
        self.down = nnx.Param(jax.random.normal(rngs.params(), (e, f, d)) * 0.2)

    def __call__(self, x):
        logits = self.router(x)
        top_values, top_index = jax.lax.top_k(logits, self.top_k)
        weights = jnp.zeros_like(logits).at[
            jnp.arange(x.shape[0])[:, None, None], jnp.arange(x.shape[1])[None, :, None], top_index].set(
            jax.nn.softmax(top_values, axis=-1))
        out = jnp.zeros_like(x)
        for expert in range(self.gate_up.shape[0]):
            gate, up = jnp.split(x @ self.gate_up[expert], 2, axis=-1)
            out = out + weights[..., expert:expert + 1] * ((jax.nn.gelu(gate) * up) @ self.down[expert])
        return out


class MoEBlock(nnx.Module):
    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        self.pre_attention_norm = nnx.RMSNorm(config.dim, rngs=rngs)
        self.attn = EinsumAttention(config, rngs)
        self.pre_ffw_norm = nnx.RMSNorm(config.dim, rngs=rngs)
        self.moe = MoE(config, rngs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.moe(self.pre_ffw_norm(x))


class EinsumMoE(nnx.Module):
    """A decoder of ``MoEBlock``s: stacked with ``nnx.vmap`` and run by ``nnx.scan`` (``stacked=True``), or an
    ``nnx.List`` run in a Python loop; the output head is the embedding table (``attend``)."""

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        self.stacked = config.stacked
        self.embedder = nnx.Embed(config.vocab, config.dim, rngs=rngs)
        if config.stacked:
            @nnx.split_rngs(splits=config.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs):
                return MoEBlock(config, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([MoEBlock(config, rngs) for _ in range(config.layers)])
        self.final_norm = nnx.RMSNorm(config.dim, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder(tokens)
        if self.stacked:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x, block):
                return block(x)

            x = run(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
        return self.embedder.attend(self.final_norm(x))
