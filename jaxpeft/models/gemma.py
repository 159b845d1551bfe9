"""The Gemma 2 and Gemma 3 (text) families in Flax linen, built on the Llama family's attention, MLP and heads.

What differs from Llama, as in transformers' ``modeling_gemma2.py`` / ``modeling_gemma3.py``:

- RMSNorm scales by ``1 + weight`` in float32 (the weights start at zero). Each layer has four:
  ``input_layernorm`` and ``post_attention_layernorm`` around attention, ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm`` around the MLP; the post-norms normalise the sub-layer's output before the
  residual add.
- Token embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the parameter dtype (``inputs_embeds`` are
  taken as already scaled); the tied LM head uses the unscaled table.
- The MLP is GeGLU (``hidden_activation``, ``gelu_pytorch_tanh``); scores are scaled by
  ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps them (``attn_logit_softcapping``; transformers' Gemma 3
  ignores that option, so this does too) and both soft-cap the LM logits (``final_logit_softcapping``).
- ``config.layer_types`` makes each layer ``"sliding_attention"`` (a window of ``sliding_window`` slots, itself
  included) or ``"full_attention"``, in the forward pass and with the KV cache alike.
- Gemma 3 normalises each query and key head (``q_norm`` / ``k_norm``) and has one RoPE per layer type:
  ``config.rope_parameters["sliding_attention"]`` (``rope_theta`` from ``rope_local_base_freq``, no scaling) and
  ``["full_attention"]`` (``rope_theta`` and its ``rope_scaling``, e.g. ``linear``).

The layer type under ``scan_layers=True``: every layer is called with the masks and RoPE tables of both types
(broadcast, computed once per call) and carries its own index with the hidden state, ``(hidden, index)``; it picks
its mask and RoPE by ``index`` from the static ``layer_types``. The stack keeps one parameter slice per layer
(``(num_layers, ...)``, the layout of the Llama family, of Hugging Face per-layer tensors, ``layers_to_transform``
and the hub conversion), any pattern works (Gemma 3's five sliding layers to one full, an odd count), and the
select costs one elementwise pick per layer. Unrolled, the index is a constant and XLA folds the pick away.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100, sliding_window=4,
    ...     layer_types=["sliding_attention", "full_attention"])
    >>> model = AutoModelForCausalLM.from_config(config, scan_layers=True)
    >>> model(input_ids=[[1, 2, 3]]).logits.shape
    (1, 3, 100)
    >>> model.generate([[5, 6, 7, 8, 9, 10]], max_new_tokens=3, eos_token_id=None).shape
    (1, 9)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models import activations, attention, heads, hub, llama
from jaxpeft.models.family import ModelFamily, ModelOutput

MODEL_TYPES = ("gemma2", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"
def layer_types_of(config) -> tuple[str, ...]:
    """``"sliding_attention"`` or ``"full_attention"`` for each layer."""
    return tuple(config.layer_types)


def rope_parameters_by_layer_type(config) -> dict[str, dict]:
    """Layer type -> RoPE settings: Gemma 3's ``config.rope_parameters`` holds one set per type (transformers 5
    builds it from ``rope_local_base_freq``, ``rope_theta`` and ``rope_scaling``), Gemma 2's one set for all.

    Example:
        >>> import transformers
        >>> config = transformers.Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=1e4,
        ...     rope_scaling={"rope_type": "linear", "factor": 8.0})
        >>> by_type = rope_parameters_by_layer_type(config)
        >>> by_type["sliding_attention"]["rope_theta"], by_type["full_attention"]["factor"]
        (10000.0, 8.0)
    """
    params = getattr(config, "rope_parameters", None) or {}
    if SLIDING in params or FULL in params:
        return {kind: dict(params[kind]) for kind in (SLIDING, FULL)}
    shared = llama.rope_parameters(config)
    return {SLIDING: shared, FULL: shared}


def attention_softcap(config) -> float | None:
    """The attention-score soft-cap: Gemma 2's ``attn_logit_softcapping`` (transformers' Gemma 3 applies none)."""
    return config.attn_logit_softcapping if config.model_type == "gemma2" else None


def check_config(config) -> None:
    """One-line errors for options of the family this implementation does not cover."""
    activations.check_activation("hidden_activation", config.hidden_activation)
    llama.check_kv_heads(config)
    layer_types = layer_types_of(config)
    if len(layer_types) != config.num_hidden_layers or not set(layer_types) <= {SLIDING, FULL}:
        raise ValueError(
            f"layer_types must give {SLIDING!r} or {FULL!r} for each of the {config.num_hidden_layers} layers; "
            f"got {list(layer_types)}."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True is not supported; the Gemma family here is causal.")
    for params in rope_parameters_by_layer_type(config).values():
        llama.inverse_frequencies(params, llama.head_dim_of(config))


def masks_by_layer_type(
    config, token_ids, attention_mask, position_ids, cache, num_prefix_tokens, implementation=None
):
    """``(masks, position_ids, cache_index)``: the attention mask of each layer type present, as
    ``attention.prepare_decoder_inputs`` builds it (sliding layers with ``config.sliding_window``). With both
    types the full layers' window is one past the last slot, so the two masks have one structure to select from."""
    masks = {}
    kinds = sorted(set(layer_types_of(config)))
    for kind in kinds:
        window = config.sliding_window if kind == SLIDING else None
        if kind == FULL and len(kinds) > 1:
            window = jnp.iinfo(jnp.int32).max
        masks[kind], positions, cache_index = attention.prepare_decoder_inputs(
            token_ids, attention_mask, position_ids, cache, num_prefix_tokens=num_prefix_tokens, sliding_window=window,
            implementation=implementation,
        )
    return masks, positions, cache_index


def rope_by_layer_type(config, position_ids, dtype) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``(cos, sin)`` of each layer type present, from that type's RoPE settings."""
    head_dim = llama.head_dim_of(config)
    settings = rope_parameters_by_layer_type(config)
    return {
        kind: llama.rope_cos_sin(llama.inverse_frequencies(settings[kind], head_dim), position_ids, dtype)
        for kind in sorted(set(layer_types_of(config)))
    }


def _pick_layer_type(by_type: dict, is_sliding: jax.Array):
    """This layer's entry of ``by_type`` (a mask or a RoPE pair): the only one, or a select by ``is_sliding``."""
    if len(by_type) == 1:
        return next(iter(by_type.values()))
    return jax.tree.map(functools.partial(jnp.where, is_sliding), by_type[SLIDING], by_type[FULL])


def name_map(config) -> hub.NameMap:
    heads = {"causal_lm": ("lm_head",), "seq_cls": ("score",), "token_cls": ("score",)}
    return dataclasses.replace(llama.name_map(config), head_modules=heads)


def params_from_hf(tensors, config, head, scan_layers):
    return hub.hf_tensors_to_params(tensors, name_map(config), head, scan_layers)


def params_to_hf(variables, config, head, scan_layers):
    return hub.params_to_hf_tensors(variables, name_map(config), head, scan_layers)


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + scale)`` computed in float32, then cast to ``dtype`` (as transformers' Gemma2RMSNorm).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> norm = GemmaRMSNorm(epsilon=1e-6)
        >>> x = jnp.array([[3.0, -4.0]])
        >>> variables = norm.init(jax.random.key(0), x)  # scale starts at zero: a plain RMS normalisation
        >>> [round(float(v), 4) for v in norm.apply(variables, x)[0]]
        [0.8485, -1.1314]
    """

    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", attention.logical(nn.initializers.zeros_init(), self.axis_name), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class GemmaAttention(llama.LlamaAttention):
    """Llama's attention with ``query_pre_attn_scalar`` scaling, Gemma 2's score soft-capping and Gemma 3's
    per-head q/k norms."""

    def head_norm(self, name: str) -> nn.Module | None:
        if self.config.model_type != "gemma3_text":
            return None
        return GemmaRMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, axis_name=None, name=name)

    def score_options(self) -> dict:
        return {"scale": self.config.query_pre_attn_scalar**-0.5, "logit_softcap": attention_softcap(self.config)}


class GemmaMLP(llama.LlamaMLP):
    """Llama's gated MLP with ``config.hidden_activation`` (GeGLU)."""

    def activation(self, x):
        return activations.activation_function(self.config.hidden_activation)(x)


class GemmaDecoderLayer(nn.Module):
    """One layer; ``carry`` is ``(hidden, layer_index)`` and ``masks`` / ``ropes`` map layer types to the mask and
    ``(cos, sin)`` that layers of that type use (see the module docstring for why the index travels along)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def norm(self, name: str) -> GemmaRMSNorm:
        return GemmaRMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, carry, masks, ropes, cache_index, deterministic, layer_cache, layer_prefix):
        hidden, layer_index = carry
        is_sliding = jnp.asarray([kind == SLIDING for kind in layer_types_of(self.config)])[layer_index]
        mask, rope = _pick_layer_type(masks, is_sliding), _pick_layer_type(ropes, is_sliding)
        kwargs = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        attn_out, layer_cache = GemmaAttention(**kwargs, name="self_attn")(
            self.norm("input_layernorm")(hidden), mask, rope, cache_index, deterministic, layer_cache, layer_prefix
        )
        hidden = hidden + self.norm("post_attention_layernorm")(attn_out)
        mlp_out = GemmaMLP(**kwargs, name="mlp")(self.norm("pre_feedforward_layernorm")(hidden))
        hidden = hidden + self.norm("post_feedforward_layernorm")(mlp_out)
        return (hidden, layer_index + 1), layer_cache


class GemmaModel(nn.Module):
    """The decoder stack (``Gemma2Model`` / ``Gemma3TextModel``); returns ``ModelOutput(last_hidden_state=...,
    cache=...)``. Inputs as ``LlamaModel``'s (``prefix_key_values``, ``inputs_embeds``, a ``KVCache``)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend

    def setup(self):
        config = self.config
        check_config(config)
        self.embed_tokens = llama.token_embedding(config, self.dtype, self.param_dtype)
        self.layers = attention.layer_stack(
            GemmaDecoderLayer,
            num_layers=config.num_hidden_layers,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            name="layers",
            config=config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.norm = GemmaRMSNorm(config.rms_norm_eps, self.dtype, self.param_dtype)

    def cache_spec(self) -> attention.CacheSpec:
        return llama.cache_spec(self.config, self.scan_layers, self.dtype)

    def attend(self, hidden):
        """Logits from the tied input embedding (unscaled)."""
        return self.embed_tokens.attend(hidden)

    def embed_input_ids(self, input_ids):
        """The token embeddings times ``sqrt(hidden_size)`` (what ``inputs_embeds`` replaces)."""
        scale = jnp.asarray(self.config.hidden_size**0.5, self.param_dtype).astype(self.dtype)
        return self.embed_tokens(input_ids) * scale

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
            prefix_key_values,
            config.num_hidden_layers,
            token_ids.shape[0],
            llama.kv_heads_of(config),
            llama.head_dim_of(config),
        )
        masks, position_ids, cache_index = masks_by_layer_type(
            config, token_ids, attention_mask, position_ids, cache, num_prefix, self.attention_implementation
        )
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        ropes = rope_by_layer_type(config, position_ids, self.dtype)
        carry = (hidden, jnp.zeros((), jnp.int32))
        layers_cache = None if cache is None else cache.layers
        (hidden, _), layers_cache = self.layers(
            carry, masks, ropes, cache_index, deterministic, layers_cache, prefix_key_values
        )
        new_cache = None
        if cache is not None:
            new_cache = attention.KVCache(layers=layers_cache, index=cache.index + token_ids.shape[1])
        return ModelOutput(last_hidden_state=self.norm(hidden), cache=new_cache)


class GemmaForCausalLM(llama.LlamaForCausalLM):
    """The decoder with the tied ``embed_tokens`` (or ``lm_head``) and ``final_logit_softcapping``."""

    base_model_cls: ClassVar[type] = GemmaModel

    def lm_logits(self, hidden):
        return attention.soft_cap(super().lm_logits(hidden), self.config.final_logit_softcapping)


class GemmaForSequenceClassification(llama.LlamaForSequenceClassification):
    """The decoder with a ``score`` layer on the last non-pad token (as ``LlamaForSequenceClassification``)."""

    base_model_cls: ClassVar[type] = GemmaModel


class GemmaForTokenClassification(heads.DecoderForTokenClassification):
    """The decoder with dropout and a ``score`` layer on every token (transformers' ``Gemma2ForTokenClassification``;
    it has none for ``gemma3_text``)."""

    base_model_cls: ClassVar[type] = GemmaModel

    def setup(self):
        if self.config.model_type != "gemma2":
            raise ValueError(f"transformers has no token classification class for {self.config.model_type!r}.")
        super().setup()


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    modules={
        "base": GemmaModel,
        "causal_lm": GemmaForCausalLM,
        "seq_cls": GemmaForSequenceClassification,
        "token_cls": GemmaForTokenClassification,
    },
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("q_proj", "v_proj"),
    ignore_unexpected=(r"^lm_head\.", r"^score\.", r"rotary_emb\."),
)
