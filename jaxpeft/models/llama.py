"""The Llama family in Flax linen: Llama 2/3/3.x, Mistral, Qwen2 and Qwen3.

One implementation covers all of them; the config says what differs: grouped-query attention
(``num_key_value_heads``), q/k/v biases (Qwen2, ``attention_bias``), per-head q/k RMSNorm (Qwen3), an explicit
``head_dim``, RoPE scaling (``"linear"``, ``"llama3"``), a sliding window (Mistral, Qwen with
``use_sliding_window``) and tied or untied embeddings. Parameter names mirror transformers'
(``model.layers.0.self_attn.q_proj``, ``lm_head``, ``score``).

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> model(input_ids=[[1, 2, 3]]).logits.shape
    (1, 3, 100)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models import activations, attention, heads, hub
from jaxpeft.models.attention import dense as _dense
from jaxpeft.models.family import ModelFamily, ModelOutput

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def rope_parameters(config) -> dict:
    """The RoPE settings (``rope_type``, ``rope_theta``, scaling fields) of a config, old or new style."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inverse_frequencies(config) -> np.ndarray:
    """The per-pair RoPE frequencies ``(head_dim // 2,)`` as transformers computes them for the config."""
    return inverse_frequencies(rope_parameters(config), head_dim_of(config))


def inverse_frequencies(params: dict, dim: int) -> np.ndarray:
    """The per-pair RoPE frequencies ``(dim // 2,)`` of one set of RoPE settings (``rope_type`` or ``type``,
    ``rope_theta``, the scaling fields), as transformers computes them.

    Example:
        >>> inverse_frequencies({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, dim=4).tolist()
        [0.5, 0.004999999888241291]
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {ROPE_TYPES}.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor != 1 is not supported ({rope_type} RoPE).")
    inv_freq = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` of shape ``(batch, seq, head_dim)`` for the given positions."""
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``(batch, seq, heads, head_dim)`` (the rotate-half convention of transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def sliding_window_of(config) -> int | None:
    """The attention window every layer uses, or ``None``; mixed full/sliding layers are refused."""
    if config.model_type in ("mistral", "mixtral", "qwen3_moe"):  # one window for every layer, when set
        return getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return config.sliding_window
    raise ValueError(
        f"Layers mixing full and sliding-window attention ({sorted(kinds)}) are not supported; "
        "set use_sliding_window=False or max_window_layers >= num_hidden_layers."
    )


def cache_spec(config, scan_layers: bool, dtype) -> attention.CacheSpec:
    """The key/value cache layout of a model of this config."""
    return attention.CacheSpec(config.num_hidden_layers, kv_heads_of(config), head_dim_of(config), scan_layers, dtype)


def check_config(config) -> None:
    """One-line errors for options of the family this implementation does not cover."""
    activations.check_activation("hidden_act", config.hidden_act)
    check_kv_heads(config)
    rope_inverse_frequencies(config)
    sliding_window_of(config)


def check_kv_heads(config) -> None:
    """A one-line error unless the query heads split evenly over the key/value heads."""
    if config.num_attention_heads % kv_heads_of(config):
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({kv_heads_of(config)})."
        )


def _biases(config) -> tuple[bool, bool, bool]:
    """Whether q/k/v, o and the MLP projections have biases."""
    attention_bias = bool(getattr(config, "attention_bias", False))
    if config.model_type == "qwen2":
        return True, False, False
    return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))


def token_embedding(config, dtype, param_dtype) -> nn.Embed:
    """The ``embed_tokens`` table ``(vocab_size, hidden_size)``."""
    return nn.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=attention.logical(nn.initializers.normal(config.initializer_range), "vocab", "embed"),
    )


def _module_kind(name: str) -> str:
    if name == "embed_tokens":
        return "embed"
    if name.endswith("norm") or name.endswith("layernorm"):
        return "norm"
    return "dense"


def name_map(config) -> hub.NameMap:
    return hub.NameMap(
        base_prefix="model",
        layers_name="layers",
        num_layers=config.num_hidden_layers,
        module_kind=_module_kind,
        head_modules={"causal_lm": ("lm_head",), "seq_cls": ("score",)},
    )


def params_from_hf(tensors, config, head, scan_layers):
    return hub.hf_tensors_to_params(tensors, name_map(config), head, scan_layers)


def params_to_hf(variables, config, head, scan_layers):
    return hub.params_to_hf_tensors(variables, name_map(config), head, scan_layers)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled after casting back (as transformers' LlamaRMSNorm)."""

    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", attention.logical(nn.initializers.ones_init(), self.axis_name), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nn.Module):
    """q/k/v projections, RoPE, (grouped-query) attention over the cache and prefix, ``o_proj``.

    Subclasses change the per-head q/k norm (``head_norm``) and how scores are formed (``score_options``).
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def head_norm(self, name: str) -> nn.Module | None:
        """The per-head RMSNorm of the queries or keys (Qwen3's ``q_norm`` / ``k_norm``); None for none."""
        if self.config.model_type not in ("qwen3", "qwen3_moe"):
            return None
        return RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, axis_name=None, name=name)

    def score_options(self) -> dict:
        """Keywords of ``attention.dot_product_attention`` shaping the scores (``scale``, ``logit_softcap``);
        empty: ``head_dim ** -0.5`` and no soft-capping."""
        return {}

    @nn.compact
    def __call__(self, hidden, mask, rope, cache_index, deterministic, layer_cache, layer_prefix):
        config = self.config
        num_heads, num_kv_heads, head_dim = config.num_attention_heads, kv_heads_of(config), head_dim_of(config)
        qkv_bias, o_bias, _ = _biases(config)
        batch, seq_len, _ = hidden.shape
        dense = dict(config=config, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(dense, use_bias=qkv_bias)
        query = _dense(features=num_heads * head_dim, axes=("embed", "heads"), name="q_proj", **dense)(hidden)
        key = _dense(features=num_kv_heads * head_dim, axes=("embed", "kv"), name="k_proj", **dense)(hidden)
        value = _dense(features=num_kv_heads * head_dim, axes=("embed", "kv"), name="v_proj", **dense)(hidden)
        query = query.reshape(batch, seq_len, num_heads, head_dim)
        key = key.reshape(batch, seq_len, num_kv_heads, head_dim)
        value = value.reshape(batch, seq_len, num_kv_heads, head_dim)
        query_norm, key_norm = self.head_norm("q_norm"), self.head_norm("k_norm")
        if query_norm is not None:
            query, key = query_norm(query), key_norm(key)
        cos, sin = rope
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if layer_cache is not None:
            layer_cache, key, value = attention.write_cache(layer_cache, key, value, cache_index)
        dropout_rate = 0.0 if deterministic else getattr(config, "attention_dropout", 0.0)
        out = attention.dot_product_attention(
            query,
            key,
            value,
            mask,
            prefix_key_value=layer_prefix,
            dropout_rate=dropout_rate,
            dropout_rng=self.make_rng("dropout") if dropout_rate > 0 else None,
            **self.score_options(),
        )
        out = out.reshape(batch, seq_len, num_heads * head_dim)
        dense = dict(dense, use_bias=o_bias)
        out = _dense(features=config.hidden_size, axes=("heads", "embed"), name="o_proj", **dense)(out)
        return out, layer_cache


class LlamaMLP(nn.Module):
    """The gated MLP ``down_proj(activation(gate_proj(x)) * up_proj(x))``; subclasses change ``activation``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def activation(self, x):
        return activations.activation_function(self.config.hidden_act)(x)

    @nn.compact
    def __call__(self, hidden):
        config = self.config
        bias = _biases(config)[2]
        dense = dict(config=config, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=bias)
        gate = _dense(features=config.intermediate_size, axes=("embed", "mlp"), name="gate_proj", **dense)(hidden)
        up = _dense(features=config.intermediate_size, axes=("embed", "mlp"), name="up_proj", **dense)(hidden)
        hidden = self.activation(gate) * up
        return _dense(features=config.hidden_size, axes=("mlp", "embed"), name="down_proj", **dense)(hidden)


class LlamaDecoderLayer(nn.Module):
    """Attention, then the feed-forward block (``feed_forward``), each after an RMSNorm and added to the residual.

    Returns ``(hidden, layer_cache)``, or ``(hidden, (layer_cache, router_logits))`` for a subclass that
    ``emits_router_logits`` (the second output of its ``feed_forward``; the MoE families).
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    emits_router_logits: ClassVar[bool] = False

    def feed_forward(self, hidden, deterministic):
        """``(mlp(hidden), None)``: the ``mlp`` block on the normed hidden state, and no router logits."""
        return LlamaMLP(self.config, self.dtype, self.param_dtype, name="mlp")(hidden), None

    @nn.compact
    def __call__(self, hidden, mask, rope, cache_index, deterministic, layer_cache, layer_prefix):
        config = self.config
        kwargs = dict(config=config, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(epsilon=config.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        attn_out, layer_cache = LlamaAttention(**kwargs, name="self_attn")(
            RMSNorm(**norm, name="input_layernorm")(hidden),
            mask,
            rope,
            cache_index,
            deterministic,
            layer_cache,
            layer_prefix,
        )
        hidden = hidden + attn_out
        mlp_in = RMSNorm(**norm, name="post_attention_layernorm")(hidden)
        mlp_out, router_logits = self.feed_forward(mlp_in, deterministic)
        hidden = hidden + mlp_out
        return hidden, ((layer_cache, router_logits) if self.emits_router_logits else layer_cache)


class LlamaModel(nn.Module):
    """The decoder stack (``LlamaModel``); returns ``ModelOutput(last_hidden_state=..., cache=...)``.

    ``prefix_key_values`` is ``(keys, values)``, each ``(num_layers, batch, num_virtual_tokens, kv_heads,
    head_dim)``: per-layer key/values attended before the sequence, not rotated (prefix tuning). ``inputs_embeds``
    ``(batch, seq, hidden_size)`` replaces ``input_ids``; ``embed_input_ids`` gives the embeddings it replaces.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend
    decoder_layer_cls: ClassVar[type] = LlamaDecoderLayer

    def setup(self):
        config = self.config
        check_config(config)
        self.embed_tokens = token_embedding(config, self.dtype, self.param_dtype)
        self.layers = attention.layer_stack(
            self.decoder_layer_cls,
            num_layers=config.num_hidden_layers,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            name="layers",
            config=config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.norm = RMSNorm(config.rms_norm_eps, self.dtype, self.param_dtype)

    def cache_spec(self) -> attention.CacheSpec:
        return cache_spec(self.config, self.scan_layers, self.dtype)

    def run_layers(self, hidden, mask, rope, cache_index, deterministic, layers_cache, prefix_key_values):
        """``(hidden, layers_cache, extra_outputs)``: the layer stack run on ``hidden``; ``extra_outputs`` holds
        further ``ModelOutput`` fields (none here; the MoE families' ``router_logits``)."""
        hidden, layers_cache = self.layers(
            hidden, mask, rope, cache_index, deterministic, layers_cache, prefix_key_values
        )
        return hidden, layers_cache, {}

    def attend(self, hidden):
        """Logits from the tied input embedding."""
        return self.embed_tokens.attend(hidden)

    def embed_input_ids(self, input_ids):
        """The token embeddings of ``input_ids`` (what ``inputs_embeds`` replaces), e.g. for prompt tuning."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: attention.KVCache | None = None,
        prefix_key_values=None,
        deterministic: bool = True,
        inputs_embeds=None,
    ) -> ModelOutput:
        config = self.config
        token_ids = attention.token_ids_of(input_ids, inputs_embeds)
        num_prefix = attention.check_prefix_key_values(
            prefix_key_values, config.num_hidden_layers, token_ids.shape[0], kv_heads_of(config), head_dim_of(config)
        )
        mask, position_ids, cache_index = attention.prepare_decoder_inputs(
            token_ids,
            attention_mask,
            position_ids,
            cache,
            num_prefix_tokens=num_prefix,
            sliding_window=sliding_window_of(config),
            implementation=self.attention_implementation,
        )
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        rope = rope_cos_sin(rope_inverse_frequencies(config), position_ids, self.dtype)
        layers_cache = None if cache is None else cache.layers
        hidden, layers_cache, extra_outputs = self.run_layers(
            hidden, mask, rope, cache_index, deterministic, layers_cache, prefix_key_values
        )
        hidden = self.norm(hidden)
        new_cache = None
        if cache is not None:
            new_cache = attention.KVCache(layers=layers_cache, index=cache.index + token_ids.shape[1])
        return ModelOutput(last_hidden_state=hidden, cache=new_cache, **extra_outputs)


class LlamaForCausalLM(heads.DecoderForCausalLM):
    """The decoder with ``lm_head`` (or the tied ``embed_tokens`` when ``tie_word_embeddings``).

    Subclasses wrap another decoder (``base_model_cls``) and may change ``lm_logits``.
    """

    base_model_cls: ClassVar[type] = LlamaModel
    cache_spec_of = staticmethod(cache_spec)


class LlamaForSequenceClassification(heads.DecoderForSequenceClassification):
    """The decoder with a ``score`` layer on the last token that ``attention_mask`` keeps (without a mask: the last
    that is not ``config.pad_token_id``, as transformers)."""

    base_model_cls: ClassVar[type] = LlamaModel


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    modules={"base": LlamaModel, "causal_lm": LlamaForCausalLM, "seq_cls": LlamaForSequenceClassification},
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("q_proj", "v_proj"),
    ignore_unexpected=(r"^lm_head\.", r"^score\.", r"rotary_emb\.inv_freq$"),
)
