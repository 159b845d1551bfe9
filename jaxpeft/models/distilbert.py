"""DistilBERT in Flax linen, parameter for parameter like ``transformers``' torch ``DistilBertModel`` and its heads.

Module names mirror the torch names: ``distilbert/transformer/layer/0/attention/q_lin`` (``k_lin``, ``v_lin``,
``out_lin``), ``sa_layer_norm``, ``ffn/lin1``, ``ffn/lin2``, ``output_layer_norm``. DistilBERT has no token type
embeddings and no pooler; ``token_type_ids`` is accepted for a call signature shared with BERT and ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import activations, attention, encoder_layers, heads
from jaxpeft.models.encoder_layers import Dtype, EncoderOutput, EncoderSettings
from jaxpeft.models.family import ModelFamily

# torch DistilBERT hard-codes the epsilon of all its LayerNorms.
_LAYER_NORM_EPS = 1e-12


def distilbert_settings(config: Any) -> EncoderSettings:
    """The settings the modules read from a ``transformers.DistilBertConfig``."""
    return EncoderSettings(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        intermediate_size=config.hidden_dim,
        activation=config.activation,
        hidden_dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        classifier_dropout=config.seq_classif_dropout,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=0,
        layer_norm_eps=_LAYER_NORM_EPS,
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
        num_labels=config.num_labels,
        sinusoidal_positions=config.sinusoidal_pos_embds,
    )


class DistilBertEmbeddings(nn.Module):
    """Word + position embeddings (sin/cos initialised with ``sinusoidal_pos_embds``), LayerNorm, dropout."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        settings, dtypes = self.settings, (self.dtype, self.param_dtype)
        self.word_embeddings = encoder_layers.embed(
            settings.vocab_size,
            "word_embeddings",
            ("vocab", "embed"),
            settings,
            *dtypes,
            init=encoder_layers.normal_table_init(settings.initializer_range, settings.pad_token_id),
        )
        position_init = encoder_layers.sinusoidal_table_init if settings.sinusoidal_positions else None
        self.position_embeddings = encoder_layers.embed(
            settings.max_position_embeddings, "position_embeddings", (None, "embed"), settings, *dtypes, position_init
        )
        self.LayerNorm = encoder_layers.layer_norm("LayerNorm", settings.layer_norm_eps, *dtypes)
        self.dropout = nn.Dropout(settings.hidden_dropout)

    def __call__(self, input_ids, position_ids, inputs_embeds, deterministic: bool):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds.astype(self.dtype) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings), deterministic=deterministic)


class DistilBertSelfAttention(nn.Module):
    """``q_lin``/``k_lin``/``v_lin``, attention, ``out_lin``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, prefix_key_value, attention_mask, deterministic: bool):
        settings = self.settings
        heads_shape = hidden_states.shape[:-1] + (settings.num_heads, settings.head_dim)

        def linear(name, axes):
            return encoder_layers.dense(settings.hidden_size, name, axes, settings, self.dtype, self.param_dtype)

        query, key, value = (
            linear(name, ("embed", "heads"))(hidden_states).reshape(heads_shape) for name in ("q_lin", "k_lin", "v_lin")
        )
        context = encoder_layers.self_attention(
            self, query, key, value, attention_mask, prefix_key_value, settings.attention_dropout, deterministic
        )
        context = context.reshape(hidden_states.shape[:-1] + (settings.hidden_size,))
        return linear("out_lin", ("heads", "embed"))(context)


class DistilBertFFN(nn.Module):
    """``lin1`` -> activation -> ``lin2`` -> dropout."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, deterministic: bool):
        settings, dtypes = self.settings, (self.dtype, self.param_dtype)
        hidden_states = encoder_layers.dense(settings.intermediate_size, "lin1", ("embed", "mlp"), settings, *dtypes)(
            hidden_states
        )
        hidden_states = activations.activation_function(settings.activation)(hidden_states)
        hidden_states = encoder_layers.dense(settings.hidden_size, "lin2", ("mlp", "embed"), settings, *dtypes)(
            hidden_states
        )
        return nn.Dropout(settings.hidden_dropout)(hidden_states, deterministic=deterministic)


class DistilBertTransformerBlock(nn.Module):
    """One layer: ``attention`` + ``sa_layer_norm`` (post-norm residual), ``ffn`` + ``output_layer_norm``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, prefix_key_value, attention_mask, deterministic: bool):
        common = dict(settings=self.settings, dtype=self.dtype, param_dtype=self.param_dtype)
        epsilon, dtypes = self.settings.layer_norm_eps, (self.dtype, self.param_dtype)
        attention_output = DistilBertSelfAttention(**common, name="attention")(
            hidden_states, prefix_key_value, attention_mask, deterministic
        )
        attention_output = encoder_layers.layer_norm("sa_layer_norm", epsilon, *dtypes)(
            attention_output + hidden_states
        )
        ffn_output = DistilBertFFN(**common, name="ffn")(attention_output, deterministic)
        layer_output = encoder_layers.layer_norm("output_layer_norm", epsilon, *dtypes)(ffn_output + attention_output)
        return layer_output, None


class DistilBertModel(nn.Module):
    """The DistilBERT encoder (torch ``DistilBertModel``): ``embeddings`` and ``transformer``.

    Returns an ``EncoderOutput`` (``last_hidden_state``). The call arguments are those of ``BertModel``:
    ``prefix_key_values`` is None or ``(keys, values)``, each (num_layers, batch or 1, num_prefix, heads, head_dim),
    always attended; torch DistilBERT has no cache, so default position ids stay ``0, 1, ...`` with a prefix.
    ``inputs_embeds`` replaces ``input_ids``; ``token_type_ids`` is ignored.

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.distilbert import DistilBertModel
        >>> config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
        >>> model = DistilBertModel(config=config)
        >>> input_ids = jnp.array([[2, 7, 8, 3, 0]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids, attention_mask=jnp.array([[1, 1, 1, 1, 0]])).last_hidden_state.shape
        (1, 5, 32)
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend

    @property
    def settings(self) -> EncoderSettings:
        return distilbert_settings(self.config)

    def setup(self):
        settings, dtypes = self.settings, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = DistilBertEmbeddings(settings, **dtypes, name="embeddings")
        self.transformer = encoder_layers.LayerStack(
            DistilBertTransformerBlock,
            settings,
            **dtypes,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            name="transformer",
        )

    def embed_input_ids(self, input_ids):
        """The word embeddings of ``input_ids`` (what ``inputs_embeds`` replaces), e.g. for prompt tuning."""
        return self.embeddings.word_embeddings(input_ids)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic: bool = True,
        prefix_key_values=None,
        inputs_embeds=None,
    ) -> EncoderOutput:
        del token_type_ids
        batch_size, seq_length = encoder_layers.embedding_inputs(input_ids, inputs_embeds)
        prefix_key_values, num_prefix = encoder_layers.check_prefix_key_values(
            prefix_key_values, self.settings, batch_size
        )
        if position_ids is None:
            table_size = self.settings.max_position_embeddings
            attention.check_sequence_length(seq_length, table_size, "max_position_embeddings")
            position_ids = jnp.broadcast_to(jnp.arange(seq_length, dtype=jnp.int32), (batch_size, seq_length))
        hidden_states = self.embeddings(input_ids, position_ids, inputs_embeds, deterministic)
        mask = encoder_layers.encoder_attention_mask(
            attention_mask, batch_size, seq_length, num_prefix, self.attention_implementation
        )
        hidden_states = self.transformer(hidden_states, mask, prefix_key_values, deterministic)
        return EncoderOutput(last_hidden_state=hidden_states)


class DistilBertForSequenceClassification(heads.EncoderHead):
    """First token -> ``pre_classifier`` -> ReLU -> dropout -> ``classifier`` (torch
    ``DistilBertForSequenceClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.distilbert import DistilBertForSequenceClassification
        >>> config = transformers.DistilBertConfig(
        ...     vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=3)
        >>> model = DistilBertForSequenceClassification(config=config)
        >>> input_ids = jnp.array([[2, 7, 8, 3]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 3)
    """

    base_model_cls: ClassVar[type] = DistilBertModel
    backbone_name: ClassVar[str] = "distilbert"
    settings_of = staticmethod(distilbert_settings)

    def setup(self):
        super().setup()
        self.pre_classifier = self.dense(self.settings.hidden_size, "pre_classifier")
        self.dropout = nn.Dropout(self.settings.classifier_dropout)
        self.classifier = self.dense(self.settings.num_labels, "classifier")

    def head_logits(self, outputs, deterministic: bool):
        pooled = nn.relu(self.pre_classifier(outputs.last_hidden_state[:, 0]))
        return self.classifier(self.dropout(pooled, deterministic=deterministic))


class DistilBertForTokenClassification(heads.EncoderForTokenClassification):
    """DistilBERT with dropout and ``classifier`` on every token (torch ``DistilBertForTokenClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.distilbert import DistilBertForTokenClassification
        >>> config = transformers.DistilBertConfig(
        ...     vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=5)
        >>> model = DistilBertForTokenClassification(config=config, scan_layers=True)
        >>> input_ids = jnp.array([[2, 7, 8, 3]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 4, 5)
    """

    base_model_cls: ClassVar[type] = DistilBertModel
    backbone_name: ClassVar[str] = "distilbert"
    settings_of = staticmethod(distilbert_settings)
    dropout_setting: ClassVar[str] = "hidden_dropout"


CHECKPOINT_LAYOUT = encoder_layers.CheckpointLayout(
    prefix="distilbert",
    backbone_modules=("embeddings", "transformer"),
    layer_stack=("transformer", "layer"),
    head_modules={"base": (), "seq_cls": ("pre_classifier", "classifier"), "token_cls": ("classifier",)},
)


def params_from_hf(tensors, config, head: str, scan_layers: bool):
    """Hugging Face DistilBERT tensors (``distilbert.``-prefixed or not) -> ``({"params": ...}, unused_names)``."""
    return encoder_layers.params_from_hf(CHECKPOINT_LAYOUT, tensors, config.n_layers, head, scan_layers)


def params_to_hf(variables, config, head: str, scan_layers: bool):
    """``{"params": ...}`` -> tensors named as torch ``DistilBertModel`` / ``DistilBertFor...`` of ``head`` loads."""
    del config
    return encoder_layers.params_to_hf(CHECKPOINT_LAYOUT, variables, head, scan_layers)


FAMILY = ModelFamily(
    model_types=("distilbert",),
    modules={
        "base": DistilBertModel,
        "seq_cls": DistilBertForSequenceClassification,
        "token_cls": DistilBertForTokenClassification,
    },
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("q_lin", "v_lin"),
    position_table="max_position_embeddings",
    # Other heads' weights in a checkpoint (masked LM, classifiers, question answering) are left out quietly.
    ignore_unexpected=(r"^vocab_(transform|projector|layer_norm)\.", r"^(pre_)?classifier\.", r"^qa_outputs\."),
)
