"""RoBERTa in Flax linen, parameter for parameter like ``transformers``' torch ``RobertaModel`` and its heads.

It also serves XLM-RoBERTa and CamemBERT, whose torch models are RoBERTa's under other class names.

The encoder is BERT's (same module and parameter names under ``roberta``); what differs is the default position
ids, which count non-padding tokens from ``pad_token_id + 1`` (torch ``create_position_ids_from_input_ids``), and the
sequence classification head (``classifier.dense`` and ``classifier.out_proj`` on the first token).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import encoder_layers
from jaxpeft.models.bert import BertModel, bert_settings
from jaxpeft.models.encoder_layers import Dtype, EncoderSettings
from jaxpeft.models.family import ModelFamily, ModelOutput


def create_position_ids_from_input_ids(input_ids, padding_idx: int, past_length: int = 0):
    """Positions ``padding_idx + 1, padding_idx + 2, ...`` over non-padding tokens (shifted by ``past_length``),
    ``padding_idx`` on padding tokens, as torch RoBERTa computes them."""
    is_token = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(is_token, axis=1) + past_length) * is_token + padding_idx


class RobertaModel(BertModel):
    """The RoBERTa encoder (torch ``RobertaModel``); see ``BertModel`` for the arguments.

    With ``inputs_embeds`` the default positions are sequential from ``pad_token_id + 1`` (padding cannot be seen),
    as in torch.

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.roberta import RobertaModel
        >>> config = transformers.RobertaConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        >>> model = RobertaModel(config=config)
        >>> input_ids = jnp.array([[0, 7, 8, 2, 1]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> output = model.apply(variables, input_ids, attention_mask=jnp.array([[1, 1, 1, 1, 0]]))
        >>> output.last_hidden_state.shape
        (1, 5, 32)
    """

    def position_padding_idx(self) -> int | None:
        return self.config.pad_token_id

    def first_default_position(self, from_input_ids: bool, past_length: int) -> int:
        return self.config.pad_token_id + 1 + (past_length if from_input_ids else 0)

    def default_position_ids(self, input_ids, batch_size: int, seq_length: int, past_length: int):
        padding_idx = self.config.pad_token_id
        if input_ids is not None:
            return create_position_ids_from_input_ids(input_ids, padding_idx, past_length)
        positions = jnp.arange(padding_idx + 1, seq_length + padding_idx + 1, dtype=jnp.int32)
        return jnp.broadcast_to(positions, (batch_size, seq_length))


class RobertaClassificationHead(nn.Module):
    """First token -> dropout -> ``dense`` -> tanh -> dropout -> ``out_proj``."""

    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, deterministic: bool):
        settings = self.settings
        dropout = nn.Dropout(settings.classifier_dropout)
        features = dropout(hidden_states[:, 0], deterministic=deterministic)
        features = encoder_layers.dense(
            settings.hidden_size, "dense", ("embed", None), settings, self.dtype, self.param_dtype
        )(features)
        features = dropout(jnp.tanh(features), deterministic=deterministic)
        return encoder_layers.dense(
            settings.num_labels, "out_proj", ("embed", None), settings, self.dtype, self.param_dtype
        )(features)


class RobertaForSequenceClassification(nn.Module):
    """RoBERTa without pooler and the ``classifier`` head (torch ``RobertaForSequenceClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.roberta import RobertaForSequenceClassification
        >>> config = transformers.RobertaConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        ...     num_labels=3)
        >>> model = RobertaForSequenceClassification(config=config)
        >>> input_ids = jnp.array([[0, 7, 8, 2]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 3)
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self):
        self.roberta = RobertaModel(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            add_pooling_layer=False,
            name="roberta",
        )
        self.classifier = RobertaClassificationHead(
            bert_settings(self.config), self.dtype, self.param_dtype, name="classifier"
        )

    def embed_input_ids(self, input_ids):
        """The word embeddings of ``input_ids`` (what ``inputs_embeds`` replaces)."""
        return self.roberta.embed_input_ids(input_ids)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic: bool = True,
        prefix_key_values=None,
        inputs_embeds=None,
    ) -> ModelOutput:
        outputs = self.roberta(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, prefix_key_values, inputs_embeds
        )
        return ModelOutput(
            logits=self.classifier(outputs.last_hidden_state, deterministic),
            last_hidden_state=outputs.last_hidden_state,
        )


class RobertaForTokenClassification(nn.Module):
    """RoBERTa without pooler, ``classifier`` on every token (torch ``RobertaForTokenClassification``).

    Example:
        >>> import jax, jax.numpy as jnp, transformers
        >>> from jaxpeft.models.roberta import RobertaForTokenClassification
        >>> config = transformers.RobertaConfig(
        ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        ...     num_labels=5)
        >>> model = RobertaForTokenClassification(config=config)
        >>> input_ids = jnp.array([[0, 7, 8, 2]])
        >>> variables = model.init(jax.random.key(0), input_ids)
        >>> model.apply(variables, input_ids).logits.shape
        (1, 4, 5)
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self):
        settings = bert_settings(self.config)
        self.roberta = RobertaModel(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            add_pooling_layer=False,
            name="roberta",
        )
        self.dropout = nn.Dropout(settings.classifier_dropout)
        self.classifier = encoder_layers.dense(
            settings.num_labels, "classifier", ("embed", None), settings, self.dtype, self.param_dtype
        )

    def embed_input_ids(self, input_ids):
        """The word embeddings of ``input_ids`` (what ``inputs_embeds`` replaces)."""
        return self.roberta.embed_input_ids(input_ids)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic: bool = True,
        prefix_key_values=None,
        inputs_embeds=None,
    ) -> ModelOutput:
        outputs = self.roberta(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, prefix_key_values, inputs_embeds
        )
        hidden_states = self.dropout(outputs.last_hidden_state, deterministic=deterministic)
        return ModelOutput(logits=self.classifier(hidden_states), last_hidden_state=outputs.last_hidden_state)


CHECKPOINT_LAYOUT = encoder_layers.CheckpointLayout(
    prefix="roberta",
    backbone_modules=("embeddings", "encoder", "pooler"),
    layer_stack=("encoder", "layer"),
    head_modules={"base": (), "seq_cls": ("classifier",), "token_cls": ("classifier",)},
    head_drops={"seq_cls": ("pooler",), "token_cls": ("pooler",)},
)


def params_from_hf(tensors, config, head: str, scan_layers: bool):
    """Hugging Face RoBERTa tensors (``roberta.``-prefixed or not) -> ``({"params": ...}, unused_tensor_names)``."""
    return encoder_layers.params_from_hf(CHECKPOINT_LAYOUT, tensors, config.num_hidden_layers, head, scan_layers)


def params_to_hf(variables, config, head: str, scan_layers: bool):
    """``{"params": ...}`` -> tensors named as torch ``RobertaModel`` / ``RobertaFor...`` of ``head`` loads them."""
    del config
    return encoder_layers.params_to_hf(CHECKPOINT_LAYOUT, variables, head, scan_layers)


FAMILY = ModelFamily(
    # XLM-RoBERTa and CamemBERT are RoBERTa with another vocabulary: same modules, names and position ids.
    model_types=("roberta", "xlm-roberta", "camembert"),
    modules={
        "base": RobertaModel,
        "seq_cls": RobertaForSequenceClassification,
        "token_cls": RobertaForTokenClassification,
    },
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("query", "value"),
    position_table="max_position_embeddings",
    # Other heads' weights in a checkpoint (masked LM, classifier, question answering) are left out quietly.
    ignore_unexpected=(r"^lm_head\.", r"^(roberta\.)?pooler\.", r"^classifier\.", r"^qa_outputs\."),
)
