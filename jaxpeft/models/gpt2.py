"""GPT-2 in Flax linen, with parameter names that mirror transformers' (``transformer.h.0.attn.c_attn``).

GPT-2's ``Conv1D`` layers are ``nn.Dense`` whose kernel is ``[in, out]``, which is Conv1D's own layout, so their
weights load without a transpose.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    >>> model = AutoModelForCausalLM.from_config(config, scan_layers=True)
    >>> model(input_ids=[[5, 6, 7]]).logits.shape
    (1, 3, 100)
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import activations, attention, heads, hub
from jaxpeft.models.attention import dense as _dense
from jaxpeft.models.family import ModelFamily, ModelOutput


def check_config(config) -> None:
    """One-line errors for GPT-2 options this implementation does not cover."""
    activations.check_activation("GPT-2 activation_function", config.activation_function)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError(
            "GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported; set them to False."
        )
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}).")


def cache_spec(config, scan_layers: bool, dtype) -> attention.CacheSpec:
    """The key/value cache layout of a model of this config."""
    return attention.CacheSpec(config.n_layer, config.n_head, config.n_embd // config.n_head, scan_layers, dtype)


def _layer_norm(config, name: str, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=attention.logical(nn.initializers.ones_init(), "embed"),
        bias_init=attention.logical(nn.initializers.zeros_init(), "embed"),
        name=name,
    )


def _module_kind(name: str) -> str:
    if name in ("wte", "wpe"):
        return "embed"
    if name.startswith("ln_"):
        return "norm"
    if name in ("c_attn", "c_proj", "c_fc"):
        return "conv1d"
    return "dense"


def name_map(config) -> hub.NameMap:
    return hub.NameMap(
        base_prefix="transformer",
        layers_name="h",
        num_layers=config.n_layer,
        module_kind=_module_kind,
        head_modules={"causal_lm": ("lm_head",), "seq_cls": ("score",)},
    )


def params_from_hf(tensors, config, head, scan_layers):
    return hub.hf_tensors_to_params(tensors, name_map(config), head, scan_layers)


def params_to_hf(variables, config, head, scan_layers):
    return hub.params_to_hf_tensors(variables, name_map(config), head, scan_layers)


class GPT2Attention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, mask, cache_index, deterministic, layer_cache, layer_prefix):
        config = self.config
        num_heads, head_dim = config.n_head, config.n_embd // config.n_head
        batch, seq_len, _ = hidden.shape
        qkv = _dense(config, 3 * config.n_embd, ("embed", "heads"), "c_attn", self.dtype, self.param_dtype)(hidden)
        query, key, value = (x.reshape(batch, seq_len, num_heads, head_dim) for x in jnp.split(qkv, 3, axis=-1))
        if layer_cache is not None:
            layer_cache, key, value = attention.write_cache(layer_cache, key, value, cache_index)
        dropout_rate = 0.0 if deterministic else config.attn_pdrop
        out = attention.dot_product_attention(
            query,
            key,
            value,
            mask,
            prefix_key_value=layer_prefix,
            scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,
            dropout_rate=dropout_rate,
            dropout_rng=self.make_rng("dropout") if dropout_rate > 0 else None,
        )
        out = out.reshape(batch, seq_len, config.n_embd)
        out = _dense(config, config.n_embd, ("heads", "embed"), "c_proj", self.dtype, self.param_dtype)(out)
        out = nn.Dropout(config.resid_pdrop)(out, deterministic=deterministic)
        return out, layer_cache


class GPT2MLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic):
        config = self.config
        inner = config.n_inner or 4 * config.n_embd
        hidden = _dense(config, inner, ("embed", "mlp"), "c_fc", self.dtype, self.param_dtype)(hidden)
        hidden = activations.activation_function(config.activation_function)(hidden)
        hidden = _dense(config, config.n_embd, ("mlp", "embed"), "c_proj", self.dtype, self.param_dtype)(hidden)
        return nn.Dropout(config.resid_pdrop)(hidden, deterministic=deterministic)


class GPT2Block(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, mask, rope, cache_index, deterministic, layer_cache, layer_prefix):
        kwargs = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        attn_out, layer_cache = GPT2Attention(**kwargs, name="attn")(
            _layer_norm(self.config, "ln_1", self.dtype, self.param_dtype)(hidden),
            mask,
            cache_index,
            deterministic,
            layer_cache,
            layer_prefix,
        )
        hidden = hidden + attn_out
        mlp_in = _layer_norm(self.config, "ln_2", self.dtype, self.param_dtype)(hidden)
        hidden = hidden + GPT2MLP(**kwargs, name="mlp")(mlp_in, deterministic)
        return hidden, layer_cache


class GPT2Model(nn.Module):
    """The GPT-2 transformer (``GPT2Model``); returns ``ModelOutput(last_hidden_state=..., cache=...)``.

    ``prefix_key_values`` is ``(keys, values)``, each ``(n_layer, batch, num_virtual_tokens, n_head, head_dim)``:
    per-layer key/values attended before the sequence (prefix tuning). ``inputs_embeds`` ``(batch, seq, n_embd)``
    replaces ``input_ids``: it stands for the token embeddings only (position embeddings are still added), as in
    transformers; ``embed_input_ids`` gives the embeddings it replaces.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend

    def setup(self):
        config = self.config
        check_config(config)
        embed_init = nn.initializers.normal(config.initializer_range)
        self.wte = nn.Embed(
            config.vocab_size,
            config.n_embd,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=attention.logical(embed_init, "vocab", "embed"),
        )
        self.wpe = nn.Embed(
            config.n_positions,
            config.n_embd,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=attention.logical(embed_init, None, "embed"),
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = attention.layer_stack(
            GPT2Block,
            num_layers=config.n_layer,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            name="h",
            config=config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.ln_f = _layer_norm(config, "ln_f", self.dtype, self.param_dtype)

    def cache_spec(self) -> attention.CacheSpec:
        return cache_spec(self.config, self.scan_layers, self.dtype)

    def attend(self, hidden):
        """Logits from the tied input embedding."""
        return self.wte.attend(hidden)

    def embed_input_ids(self, input_ids):
        """The token embeddings of ``input_ids`` (what ``inputs_embeds`` replaces), e.g. for prompt tuning."""
        return self.wte(input_ids)

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
        batch_size = token_ids.shape[0]
        num_prefix = attention.check_prefix_key_values(
            prefix_key_values, config.n_layer, batch_size, config.n_head, config.n_embd // config.n_head
        )
        if position_ids is None:  # the default positions are the slots: of the sequence, or of the cache
            slots = token_ids.shape[1] if cache is None else attention.cache_length(cache)
            attention.check_sequence_length(slots, config.n_positions, "n_positions")
        mask, position_ids, cache_index = attention.prepare_decoder_inputs(
            token_ids, attention_mask, position_ids, cache, num_prefix_tokens=num_prefix,
            implementation=self.attention_implementation,
        )
        token_embeds = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        hidden = token_embeds + self.wpe(position_ids)
        hidden = self.drop(hidden, deterministic=deterministic)
        layers_cache = None if cache is None else cache.layers
        hidden, layers_cache = self.h(hidden, mask, None, cache_index, deterministic, layers_cache, prefix_key_values)
        hidden = self.ln_f(hidden)
        new_cache = None
        if cache is not None:
            new_cache = attention.KVCache(layers=layers_cache, index=cache.index + token_ids.shape[1])
        return ModelOutput(last_hidden_state=hidden, cache=new_cache)


class GPT2LMHeadModel(heads.DecoderForCausalLM):
    """GPT-2 with the language-model head (``lm_head``, tied to ``wte`` unless ``tie_word_embeddings=False``)."""

    base_model_cls: ClassVar[type] = GPT2Model
    backbone_name: ClassVar[str] = "transformer"
    cache_spec_of = staticmethod(cache_spec)


class GPT2ForSequenceClassification(heads.DecoderForSequenceClassification):
    """GPT-2 with a ``score`` layer on the last token that ``attention_mask`` keeps (without a mask: the last that
    is not ``config.pad_token_id``, as transformers)."""

    base_model_cls: ClassVar[type] = GPT2Model
    backbone_name: ClassVar[str] = "transformer"


FAMILY = ModelFamily(
    model_types=("gpt2",),
    modules={"base": GPT2Model, "causal_lm": GPT2LMHeadModel, "seq_cls": GPT2ForSequenceClassification},
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("c_attn",),
    position_table="n_positions",
    ignore_unexpected=(r"^lm_head\.", r"^score\.", r"attn\.(masked_)?bias$"),
    conv1d_layers=("c_attn", "c_proj", "c_fc"),
)
