"""RoBERTa in Flax linen, parameter for parameter like ``transformers``' torch ``RobertaModel`` and its heads.

It also serves XLM-RoBERTa and CamemBERT, whose torch models are RoBERTa's under other class names.

The encoder is BERT's (same module and parameter names under ``roberta``); what differs is the default position
ids, which count non-padding tokens from ``pad_token_id + 1`` (torch ``create_position_ids_from_input_ids``), and the
sequence classification head (``classifier.dense`` and ``classifier.out_proj`` on the first token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import encoder_layers, heads
from jaxpeft.models.bert import BertModel, bert_settings
from jaxpeft.models.encoder_layers import Dtype, EncoderSettings
from jaxpeft.models.family import ModelFamily


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


class RobertaForSequenceClassification(heads.EncoderHead):
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

    base_model_cls: ClassVar[type] = RobertaModel
    backbone_name: ClassVar[str] = "roberta"
    backbone_options: ClassVar[Mapping[str, Any]] = {"add_pooling_layer": False}
    settings_of = staticmethod(bert_settings)

    def setup(self):
        super().setup()
        self.classifier = RobertaClassificationHead(self.settings, self.dtype, self.param_dtype, name="classifier")

    def head_logits(self, outputs, deterministic: bool):
        return self.classifier(outputs.last_hidden_state, deterministic)


class RobertaForTokenClassification(heads.EncoderForTokenClassification):
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

    base_model_cls: ClassVar[type] = RobertaModel
    backbone_name: ClassVar[str] = "roberta"
    backbone_options: ClassVar[Mapping[str, Any]] = {"add_pooling_layer": False}
    settings_of = staticmethod(bert_settings)


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
