"""PEFT methods: one file each, each a config plus the pure functions the core calls."""

from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoRAConfig, LoraConfig

__all__ = ["LoraConfig", "LoRAConfig", "IA3Config", "BitFitConfig"]
