"""jaxpeft: parameter-efficient fine-tuning for JAX and Flax."""

from jaxpeft import eva, evaluation, method, methods, optimizers, quantization, sharding
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
from jaxpeft.method import Method
from jaxpeft.method import register as register_method
from jaxpeft.methods import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    BOFTConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoRAConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TrainableTokensConfig,
    VeraConfig,
)
from jaxpeft.methods.prompt_tuning import extend_labels
from jaxpeft.peft_model import PeftModel, get_peft_model
from jaxpeft.pipelines import Pipeline, PipelineError, pipeline
from jaxpeft.quantization import QuantizationConfig, QuantizedArray, quantize
from jaxpeft.trainer import Trainer, TrainingArguments
from jaxpeft.tree import ParameterCount, adapter_names, combine, count_parameters, partition, strip_adapters

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterError",
    "AdapterMix",
    "BOFTConfig",
    "BitFitConfig",
    "ConfigError",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "LoraConfig",
    "Method",
    "OFTConfig",
    "ParameterCount",
    "PeftConfig",
    "PeftModel",
    "Pipeline",
    "PipelineError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "QuantizationConfig",
    "QuantizedArray",
    "TrainableTokensConfig",
    "Trainer",
    "TrainingArguments",
    "VeraConfig",
    "adapter_names",
    "check_adapter_name",
    "combine",
    "config_from_hf_dict",
    "config_to_hf_dict",
    "count_parameters",
    "eva",
    "evaluation",
    "extend_labels",
    "freeze",
    "get_peft_model",
    "init_adapters",
    "load_adapter",
    "merge",
    "method",
    "methods",
    "optimizers",
    "partition",
    "pipeline",
    "quantization",
    "quantize",
    "register_method",
    "rewrite",
    "save_adapter",
    "sharding",
    "strip_adapters",
    "trainable_mask",
    "unmerge",
]
