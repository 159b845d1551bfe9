"""PEFT methods: one file each, holding the method's config and the pure functions of its ``jaxpeft.method.Method``.

This is the one list of jaxpeft's methods: importing a method file registers it (``jaxpeft.method.register``), and
``METHODS`` holds them in the order ``jaxpeft train --method`` offers them. A method of your own registers the same
way from any file (see "Writing a method" in the README).
"""

from jaxpeft.methods import (
    adalora,
    bitfit,
    boft,
    bottleneck,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    trainable_tokens,
    vera,
)
from jaxpeft.methods.adalora import AdaLoraConfig
from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.boft import BOFTConfig
from jaxpeft.methods.bottleneck import AdapterConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.ln_tuning import LNTuningConfig
from jaxpeft.methods.loha import LoHaConfig
from jaxpeft.methods.lokr import LoKrConfig
from jaxpeft.methods.lora import LoRAConfig, LoraConfig
from jaxpeft.methods.oft import OFTConfig
from jaxpeft.methods.p_tuning import PromptEncoderConfig
from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
from jaxpeft.methods.prompt_tuning import PromptTuningConfig
from jaxpeft.methods.trainable_tokens import TrainableTokensConfig
from jaxpeft.methods.vera import VeraConfig

METHODS = (
    lora.METHOD, adalora.METHOD, loha.METHOD, lokr.METHOD, vera.METHOD, oft.METHOD, boft.METHOD, ia3.METHOD,
    bottleneck.METHOD, ln_tuning.METHOD, bitfit.METHOD, trainable_tokens.METHOD, prefix_tuning.METHOD,
    prompt_tuning.METHOD, p_tuning.METHOD,
)

__all__ = [
    "METHODS", "LoraConfig", "LoRAConfig", "AdaLoraConfig", "LoHaConfig", "LoKrConfig", "VeraConfig", "OFTConfig",
    "BOFTConfig", "IA3Config", "AdapterConfig", "LNTuningConfig", "BitFitConfig", "TrainableTokensConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig",
]
