"""BERT in Flax linen, parameter for parameter like ``transformers``' torch ``BertModel`` and its heads.

Module names mirror the torch attribute names, so a parameter path such as
``bert/encoder/layer/0/attention/self/query/kernel`` is the torch ``bert.encoder.layer.0.attention.self.query.weight``
(transposed), and HF PEFT ``target_modules`` and adapter keys carry over one to one. With ``scan_layers=True`` the
layers are one scanned module ``encoder/layer`` whose parameters have a leading layer axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import activations, attention, encoder_layers, heads
from jaxpeft.models.encoder_layers import Dtype, EncoderOutput, EncoderSettings
from jaxpeft.models.family import ModelFamily


def bert_settings(config: Any) -> EncoderSettings:
    """The settings the modules read from a ``transformers.BertConfig`` (or a config with the same fields)."""
    if getattr(config, "is_decoder", False):
        raise NotImplementedError("jaxpeft's BERT is an encoder; is_decoder=True (causal BERT) is not supported")
    classifier_dropout = getattr(config, "classifier_dropout", None)
    return EncoderSettings(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        activation=config.hidden_act,
        hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        classifier_dropout=config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
        num_labels=config.num_labels,
    )


class BertEmbeddings(nn.Module):
    """Word + position + token type embeddings, then LayerNorm and dropout."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    position_padding_idx: int | None = None

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
        self.position_embeddings = encoder_layers.embed(
            settings.max_position_embeddings,
            "position_embeddings",
            (None, "embed"),
            settings,
            *dtypes,
            init=encoder_layers.normal_table_init(settings.initializer_range, self.position_padding_idx),
        )
        self.token_type_embeddings = encoder_layers.embed(
            settings.type_vocab_size, "token_type_embeddings", (None, "embed"), settings, *dtypes
        )
        self.LayerNorm = encoder_layers.layer_norm("LayerNorm", settings.layer_norm_eps, *dtypes)
        self.dropout = nn.Dropout(settings.hidden_dropout)

    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds, deterministic: bool):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = (
            inputs_embeds.astype(self.dtype)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings), deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """``query``/``key``/``value`` projections and the attention itself (torch ``attention.self``)."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, prefix_key_value, attention_mask, deterministic: bool):
        settings = self.settings
        heads_shape = hidden_states.shape[:-1] + (settings.num_heads, settings.head_dim)

        def project(name):
            projection = encoder_layers.dense(
                settings.hidden_size, name, ("embed", "heads"), settings, self.dtype, self.param_dtype
            )
            return projection(hidden_states).reshape(heads_shape)

        context = encoder_layers.self_attention(
            self,
            project("query"),
            project("key"),
            project("value"),
            attention_mask,
            prefix_key_value,
            settings.attention_dropout,
            deterministic,
        )
        return context.reshape(hidden_states.shape[:-1] + (settings.hidden_size,))


class BertResidualOutput(nn.Module):
    """``dense`` -> dropout -> ``LayerNorm(x + residual)``: torch ``BertSelfOutput`` and ``BertOutput``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    input_axis: str = "heads"

    @nn.compact
    def __call__(self, hidden_states, residual, deterministic: bool):
        settings = self.settings
        hidden_states = encoder_layers.dense(
            settings.hidden_size, "dense", (self.input_axis, "embed"), settings, self.dtype, self.param_dtype
        )(hidden_states)
        hidden_states = nn.Dropout(settings.hidden_dropout)(hidden_states, deterministic=deterministic)
        norm = encoder_layers.layer_norm("LayerNorm", settings.layer_norm_eps, self.dtype, self.param_dtype)
        return norm(hidden_states + residual)


class BertAttention(nn.Module):
    """Self-attention (``self``) and its output projection with residual and norm (``output``)."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, prefix_key_value, attention_mask, deterministic: bool):
        common = dict(settings=self.settings, dtype=self.dtype, param_dtype=self.param_dtype)
        context = BertSelfAttention(**common, name="self")(
            hidden_states, prefix_key_value, attention_mask, deterministic
        )
        return BertResidualOutput(**common, input_axis="heads", name="output")(context, hidden_states, deterministic)


class BertIntermediate(nn.Module):
    """``dense`` to the intermediate size and the activation."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        settings = self.settings
        hidden_states = encoder_layers.dense(
            settings.intermediate_size, "dense", ("embed", "mlp"), settings, self.dtype, self.param_dtype
        )(hidden_states)
        return activations.activation_function(settings.activation)(hidden_states)


class BertLayer(nn.Module):
    """One transformer layer: ``attention``, ``intermediate`` (dense + activation), ``output``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, prefix_key_value, attention_mask, deterministic: bool):
        common = dict(settings=self.settings, dtype=self.dtype, param_dtype=self.param_dtype)
        attention_output = BertAttention(**common, name="attention")(
            hidden_states, prefix_key_value, attention_mask, deterministic
        )
        intermediate_output = BertIntermediate(**common, name="intermediate")(attention_output)
        layer_output = BertResidualOutput(**common, input_axis="mlp", name="output")(
            intermediate_output, attention_output, deterministic
        )
        return layer_output, None


class BertPooler(nn.Module):
    """``tanh(dense(first token))``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        settings = self.settings
        projection = encoder_layers.dense(
            settings.hidden_size, "dense", ("embed", None), settings, self.dtype, self.param_dtype
        )
        return jnp.tanh(projection(hidden_states[:, 0]))


class BertModel(nn.Module):
    """The BERT encoder (torch ``BertModel``): embeddings, layers and, with ``add_pooling_layer``, the pooler.

    Returns an ``EncoderOutput`` (``last_hidden_state``, ``pooler_output``). Call arguments besides the token
    inputs: ``deterministic=False`` applies dropout (needs a ``'dropout'`` rng); ``prefix_key_values`` (prefix
    tuning) is None or ``(keys, values)``, each (num_layers, batch or 1, num_prefix, heads, head_dim), put in front
    of every layer's own keys and values and always attended; as torch does with a cache, default position ids then
    start at ``num_prefix``. ``inputs_embeds`` (batch, seq, hidden) replaces ``input_ids``; ``embed_input_ids``
    gives the embeddings it replaces.

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.bert import BertModel
        >>> config = transformers.BertConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        >>> model = BertModel(config=config)
        >>> input_ids = jnp.array([[2, 7, 8, 3, 0]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> output = model.apply(variables, input_ids, attention_mask=jnp.array([[1, 1, 1, 1, 0]]))
        >>> output.last_hidden_state.shape, output.pooler_output.shape
        ((1, 5, 32), (1, 32))
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend
    add_pooling_layer: bool = True

    @property
    def settings(self) -> EncoderSettings:
        return bert_settings(self.config)

    def setup(self):
        settings, dtypes = self.settings, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(
            settings, **dtypes, position_padding_idx=self.position_padding_idx(), name="embeddings"
        )
        self.encoder = encoder_layers.LayerStack(
            BertLayer, settings, **dtypes, scan_layers=self.scan_layers, remat_policy=self.remat_policy, name="encoder"
        )
        if self.add_pooling_layer:
            self.pooler = BertPooler(settings, **dtypes, name="pooler")

    def position_padding_idx(self) -> int | None:
        """Row of the position table that is zero at initialisation (None for BERT)."""
        return None

    def first_default_position(self, from_input_ids: bool, past_length: int) -> int:
        """The position ``default_position_ids`` gives the first token (the largest is this plus the length - 1)."""
        del from_input_ids
        return past_length

    def default_position_ids(self, input_ids, batch_size: int, seq_length: int, past_length: int):
        """Position ids when none are given: ``past_length, past_length + 1, ...`` for every row."""
        del input_ids
        positions = jnp.arange(past_length, past_length + seq_length, dtype=jnp.int32)
        return jnp.broadcast_to(positions, (batch_size, seq_length))

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
        batch_size, seq_length = encoder_layers.embedding_inputs(input_ids, inputs_embeds)
        prefix_key_values, num_prefix = encoder_layers.check_prefix_key_values(
            prefix_key_values, self.settings, batch_size
        )
        if position_ids is None:
            first = self.first_default_position(input_ids is not None, num_prefix)
            attention.check_sequence_length(seq_length, self.settings.max_position_embeddings,
                                            "max_position_embeddings", first)
            position_ids = self.default_position_ids(input_ids, batch_size, seq_length, num_prefix)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch_size, seq_length), dtype=jnp.int32)
        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, deterministic)
        mask = encoder_layers.encoder_attention_mask(
            attention_mask, batch_size, seq_length, num_prefix, self.attention_implementation
        )
        hidden_states = self.encoder(hidden_states, mask, prefix_key_values, deterministic)
        pooled = self.pooler(hidden_states) if self.add_pooling_layer else None
        return EncoderOutput(last_hidden_state=hidden_states, pooler_output=pooled)


class BertForSequenceClassification(heads.EncoderHead):
    """BERT with ``classifier`` on the dropped-out pooler output (torch ``BertForSequenceClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.bert import BertForSequenceClassification
        >>> config = transformers.BertConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        ...     num_labels=3)
        >>> model = BertForSequenceClassification(config=config, scan_layers=True)
        >>> input_ids = jnp.array([[2, 7, 8, 3]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 3)
    """

    base_model_cls: ClassVar[type] = BertModel
    backbone_name: ClassVar[str] = "bert"
    settings_of = staticmethod(bert_settings)

    def setup(self):
        super().setup()
        self.dropout = nn.Dropout(self.settings.classifier_dropout)
        self.classifier = self.dense(self.settings.num_labels, "classifier")

    def head_logits(self, outputs, deterministic: bool):
        return self.classifier(self.dropout(outputs.pooler_output, deterministic=deterministic))


class BertForTokenClassification(heads.EncoderForTokenClassification):
    """BERT without pooler, ``classifier`` on every token (torch ``BertForTokenClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.bert import BertForTokenClassification
        >>> config = transformers.BertConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        ...     num_labels=5)
        >>> model = BertForTokenClassification(config=config)
        >>> input_ids = jnp.array([[2, 7, 8, 3]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 4, 5)
    """

    base_model_cls: ClassVar[type] = BertModel
    backbone_name: ClassVar[str] = "bert"
    backbone_options: ClassVar[Mapping[str, Any]] = {"add_pooling_layer": False}
    settings_of = staticmethod(bert_settings)


CHECKPOINT_LAYOUT = encoder_layers.CheckpointLayout(
    prefix="bert",
    backbone_modules=("embeddings", "encoder", "pooler"),
    layer_stack=("encoder", "layer"),
    head_modules={"base": (), "seq_cls": ("classifier",), "token_cls": ("classifier",)},
    head_drops={"token_cls": ("pooler",)},
)


def params_from_hf(tensors, config, head: str, scan_layers: bool):
    """Hugging Face BERT tensors (``bert.``-prefixed or not) -> ``({"params": ...}, unused_tensor_names)``."""
    return encoder_layers.params_from_hf(CHECKPOINT_LAYOUT, tensors, config.num_hidden_layers, head, scan_layers)


def params_to_hf(variables, config, head: str, scan_layers: bool):
    """``{"params": ...}`` -> tensors named as torch ``BertModel`` / ``BertFor...`` of ``head`` loads them."""
    del config
    return encoder_layers.params_to_hf(CHECKPOINT_LAYOUT, variables, head, scan_layers)


FAMILY = ModelFamily(
    model_types=("bert",),
    modules={"base": BertModel, "seq_cls": BertForSequenceClassification, "token_cls": BertForTokenClassification},
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("query", "value"),
    position_table="max_position_embeddings",
    # Other heads' weights in a checkpoint (pre-training, classifier, question answering) are left out quietly.
    ignore_unexpected=(r"^cls\.", r"^(bert\.)?pooler\.", r"^classifier\.", r"^qa_outputs\."),
    optional_params=("bert/pooler",),
)
