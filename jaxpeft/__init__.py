"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax."""

from jaxpeft.config import ConfigError, PeftConfig
from jaxpeft.core import AdapterError, freeze, init_adapters, merge, rewrite, trainable_mask, unmerge
from jaxpeft.methods.lora import LoRAConfig, LoraConfig
from jaxpeft.tree import ParameterCount, adapter_names, combine, count_parameters, partition, strip_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "LoRAConfig",
    "LoraConfig",
    "ParameterCount",
    "PeftConfig",
    "adapter_names",
    "combine",
    "count_parameters",
    "freeze",
    "init_adapters",
    "merge",
    "partition",
    "rewrite",
    "strip_adapters",
    "trainable_mask",
    "unmerge",
]
