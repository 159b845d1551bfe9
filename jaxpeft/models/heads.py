"""The task heads shared by the model families: causal LM, sequence and token classification.

A family's head class subclasses one of these and names its backbone: the class (``base_model_cls``) and the name
its parameters sit under (``backbone_name``: ``"model"``, ``"transformer"``, ``"bert"``, ...). The head's own
layers keep transformers' names (``lm_head``, ``score``, ``classifier``, ``pre_classifier``), so parameter paths
and checkpoint tensor names read as the torch classes'.

Example:
    >>> import jax, jax.numpy as jnp, transformers
    >>> from jaxpeft.models.llama import LlamaForSequenceClassification
    >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=4, vocab_size=100, num_labels=3, pad_token_id=0)
    >>> model = LlamaForSequenceClassification(config=config)
    >>> ids, mask = jnp.array([[5, 6, 7, 0]]), jnp.array([[1, 1, 1, 0]])
    >>> variables = model.init(jax.random.key(0), ids)
    >>> sorted(variables["params"]), model.apply(variables, ids, attention_mask=mask).logits.shape
    (['model', 'score'], (1, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.models import attention, encoder_layers
from jaxpeft.models.family import ModelOutput


class BackboneHead(nn.Module):
    """A head on a backbone built as ``base_model_cls(config=..., dtype=..., ...)`` under ``backbone_name``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_implementation: str | None = None  # see attention_kernels; None: chosen by backend
    base_model_cls: ClassVar[type]
    backbone_name: ClassVar[str] = "model"
    backbone_options: ClassVar[Mapping[str, Any]] = {}  # further fields, e.g. {"add_pooling_layer": False}

    def setup(self):
        self.backbone = self.base_model_cls(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_implementation=self.attention_implementation,
            name=self.backbone_name,
            **self.backbone_options,
        )

    def embed_input_ids(self, input_ids):
        """The token embeddings of ``input_ids`` (what ``inputs_embeds`` replaces), e.g. for prompt tuning."""
        return self.backbone.embed_input_ids(input_ids)


# ---------------------------------------------------------------------------------------------- decoders


def classifier_dropout_of(config) -> float:
    """A decoder token classifier's dropout: ``classifier_dropout``, else ``hidden_dropout``, else 0.1
    (transformers)."""
    for name in ("classifier_dropout", "hidden_dropout"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return 0.1


class DecoderForCausalLM(BackboneHead):
    """The decoder with ``lm_head`` (or the tied input embedding when ``tie_word_embeddings``); the output keeps
    the decoder's other fields (``cache``, ``router_logits``). Subclasses may change ``lm_logits``."""

    cache_spec_of: ClassVar[Callable[..., attention.CacheSpec]]  # (config, scan_layers, dtype) -> CacheSpec

    def setup(self):
        super().setup()
        if not self.config.tie_word_embeddings:
            self.lm_head = attention.dense(
                self.config, self.config.vocab_size, ("embed", "vocab"), "lm_head", self.dtype, self.param_dtype,
                use_bias=False,
            )

    def cache_spec(self) -> attention.CacheSpec:
        return self.cache_spec_of(self.config, self.scan_layers, self.dtype)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        prefix_key_values=None,
        deterministic=True,
        inputs_embeds=None,
    ) -> ModelOutput:
        out = self.backbone(
            input_ids, attention_mask, position_ids, cache, prefix_key_values, deterministic, inputs_embeds
        )
        return out.replace(logits=self.lm_logits(out.last_hidden_state))

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                      prefix_key_values=None, deterministic=True, inputs_embeds=None):
        """The final hidden states (``__call__``'s arguments), before ``lm_logits``: for losses that run the head a
        chunk at a time."""
        return self.backbone(input_ids, attention_mask, position_ids, cache, prefix_key_values, deterministic,
                             inputs_embeds).last_hidden_state

    def lm_logits(self, hidden):
        """The vocabulary logits of the final hidden states (tied embedding or ``lm_head``)."""
        return self.backbone.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)


class DecoderForSequenceClassification(BackboneHead):
    """The decoder with a ``score`` layer on each row's last token: the last one ``attention_mask`` keeps (right
    or left padding) when a mask is given, else the last that is not ``config.pad_token_id`` (transformers' rule;
    the last position with ``inputs_embeds``). The output keeps the decoder's other fields."""

    def setup(self):
        super().setup()
        self.score = attention.dense(
            self.config, self.config.num_labels, ("embed", None), "score", self.dtype, self.param_dtype, use_bias=False
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        prefix_key_values=None,
        deterministic=True,
        inputs_embeds=None,
    ) -> ModelOutput:
        out = self.backbone(
            input_ids, attention_mask, position_ids, None, prefix_key_values, deterministic, inputs_embeds
        )
        pooled = attention.pool_last_token(out.last_hidden_state, input_ids, attention_mask, self.config.pad_token_id)
        return out.replace(logits=self.score(pooled))


class DecoderForTokenClassification(BackboneHead):
    """The decoder with dropout and a ``score`` layer (bias unless ``token_classification_bias=False``) on every
    token (transformers' ``...ForTokenClassification`` of the decoder families)."""

    def setup(self):
        super().setup()
        config = self.config
        self.dropout = nn.Dropout(classifier_dropout_of(config))
        use_bias = getattr(config, "token_classification_bias", True)
        self.score = attention.dense(
            config, config.num_labels, ("embed", None), "score", self.dtype, self.param_dtype, use_bias=use_bias
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        prefix_key_values=None,
        deterministic=True,
        inputs_embeds=None,
    ) -> ModelOutput:
        hidden = self.backbone(
            input_ids, attention_mask, position_ids, None, prefix_key_values, deterministic, inputs_embeds
        ).last_hidden_state
        logits = self.score(self.dropout(hidden, deterministic=deterministic))
        return ModelOutput(logits=logits, last_hidden_state=hidden)


# ---------------------------------------------------------------------------------------------- encoders


class EncoderHead(BackboneHead):
    """An encoder head: ``head_logits(backbone_output, deterministic)`` of the backbone's output."""

    settings_of: ClassVar[Callable[[Any], encoder_layers.EncoderSettings]]  # the family's config reader

    def setup(self):
        super().setup()
        self.settings = self.settings_of(self.config)

    def dense(self, features: int, name: str) -> nn.Dense:
        """A head layer initialised like the torch ``nn.Linear``."""
        return encoder_layers.dense(features, name, ("embed", None), self.settings, self.dtype, self.param_dtype)

    def head_logits(self, outputs, deterministic: bool):
        raise NotImplementedError

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
        outputs = self.backbone(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, prefix_key_values, inputs_embeds
        )
        return ModelOutput(
            logits=self.head_logits(outputs, deterministic), last_hidden_state=outputs.last_hidden_state
        )


class EncoderForTokenClassification(EncoderHead):
    """Dropout (``classifier_dropout``, or the field ``dropout_setting`` names) and ``classifier`` on every token."""

    dropout_setting: ClassVar[str] = "classifier_dropout"

    def setup(self):
        super().setup()
        self.dropout = nn.Dropout(getattr(self.settings, self.dropout_setting))
        self.classifier = self.dense(self.settings.num_labels, "classifier")

    def head_logits(self, outputs, deterministic: bool):
        return self.classifier(self.dropout(outputs.last_hidden_state, deterministic=deterministic))
