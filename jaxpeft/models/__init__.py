"""Flax linen model families that load Hugging Face checkpoints and match the torch reference numerically.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    >>> model = AutoModelForCausalLM.from_config(config, scan_layers=True)
    >>> model.generate([[1, 2, 3]], max_new_tokens=4).shape
    (1, 7)
"""

from jaxpeft.models.attention import CacheSpec, KVCache, init_cache
from jaxpeft.models.auto import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedModel,
    family_for,
    register_family,
    supported_model_types,
)
from jaxpeft.models.family import HEADS, ModelFamily, ModelOutput
from jaxpeft.models.generation import generate
from jaxpeft.models.gguf import load_gguf_tokenizer, read_gguf_checkpoint

__all__ = [
    "HEADS",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "CacheSpec",
    "KVCache",
    "ModelFamily",
    "ModelOutput",
    "PretrainedModel",
    "family_for",
    "generate",
    "init_cache",
    "load_gguf_tokenizer",
    "read_gguf_checkpoint",
    "register_family",
    "supported_model_types",
]
