"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax."""

from jaxpeft import evaluation, quantization, sharding
from jaxpeft.config import ConfigError, PeftConfig
from jaxpeft.core import (
    AdapterError,
    AdapterMix,
    check_adapter_name,
    freeze,
    init_adapters,
    merge,
    rewrite,
    trainable_mask,
    unmerge,
)
from jaxpeft.hf_format import config_from_hf_dict, config_to_hf_dict, load_adapter, save_adapter
from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.bottleneck import AdapterConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoRAConfig, LoraConfig
from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
from jaxpeft.methods.prompt_tuning import PromptTuningConfig, extend_labels
from jaxpeft.peft_model import PeftModel, get_peft_model
from jaxpeft.pipelines import Pipeline, PipelineError, pipeline
from jaxpeft.quantization import QuantizationConfig, QuantizedArray, quantize
from jaxpeft.trainer import Trainer, TrainingArguments
from jaxpeft.tree import ParameterCount, adapter_names, combine, count_parameters, partition, strip_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterMix",
    "BitFitConfig",
    "ConfigError",
    "IA3Config",
    "LoRAConfig",
    "LoraConfig",
    "ParameterCount",
    "PeftConfig",
    "PeftModel",
    "Pipeline",
    "PipelineError",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantizationConfig",
    "QuantizedArray",
    "Trainer",
    "TrainingArguments",
    "adapter_names",
    "check_adapter_name",
    "combine",
    "config_from_hf_dict",
    "config_to_hf_dict",
    "count_parameters",
    "evaluation",
    "extend_labels",
    "freeze",
    "get_peft_model",
    "init_adapters",
    "load_adapter",
    "merge",
    "partition",
    "pipeline",
    "quantization",
    "quantize",
    "rewrite",
    "save_adapter",
    "sharding",
    "strip_adapters",
    "trainable_mask",
    "unmerge",
]
