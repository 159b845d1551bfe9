"""PEFT methods: one file each, each a config plus the pure functions the core calls."""

from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.bottleneck import AdapterConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoRAConfig, LoraConfig
from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
from jaxpeft.methods.prompt_tuning import PromptTuningConfig

__all__ = [
    "LoraConfig", "LoRAConfig", "IA3Config", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig",
    "BitFitConfig",
]
