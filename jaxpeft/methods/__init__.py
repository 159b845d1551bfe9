"""PEFT methods: one file each, each a config plus the pure functions the core calls."""

from jaxpeft.methods.lora import LoRAConfig, LoraConfig

__all__ = ["LoraConfig", "LoRAConfig"]
