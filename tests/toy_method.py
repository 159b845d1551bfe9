"""A PEFT method written outside jaxpeft, in this one file: a learned gain on each targeted Dense layer's output,
``y = (x W + b) * (1 + g)``, with ``g`` (one value per output feature) starting at zero.

Importing this file registers it; nothing else in jaxpeft names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxpeft.config import PeftConfig, strict_options
from jaxpeft.core import resolve_layers
from jaxpeft.method import Method, register

LEAF = "toy_gain"


@strict_options
@dataclasses.dataclass
class GainConfig(PeftConfig):
    """Options of the toy gain method.

    Attributes:
        target_modules: Dense layers to scale: names or dotted path suffixes (list), or a full-match regex.
        modules_to_save: modules trained in full, as adapter-owned copies.
    """

    peft_type: ClassVar[str] = "TOY_GAIN"

    target_modules: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None


def create(key, config: GainConfig, trace, dtype) -> dict:
    del key
    layers = resolve_layers(config, trace, ("dense",), method_name="the toy gain")
    return {(path, LEAF): jnp.zeros(layer.stack_shape + layer.kernel_shape[-1:], dtype)
            for path, layer in layers.items()}


def interceptor(config: GainConfig, adapter_name: str, dropout: bool):
    del config, dropout

    def adapt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not module.has_variable("params", LEAF):
            return out
        gains = module.get_variable("params", LEAF)
        if adapter_name not in gains:
            return out
        return out * (1 + nn.meta.unbox(gains[adapter_name])).astype(out.dtype)

    return adapt


def merge_layer(config: GainConfig, layer_params: dict, leaves: dict, sign: float) -> dict:
    del config
    factor = 1 + jnp.asarray(nn.meta.unbox(leaves[LEAF]), jnp.float32)
    factor = factor if sign > 0 else 1 / factor
    merged = {"kernel": layer_params["kernel"] * factor[..., None, :]}
    if "bias" in layer_params:
        merged["bias"] = layer_params["bias"] * factor
    return {name: value.astype(layer_params[name].dtype) for name, value in merged.items()}


def task_defaults(config: GainConfig, model: Any) -> dict:
    """GPT-2's attention input projection when the config names no target."""
    if config.target_modules is None and model.config.model_type == "gpt2":
        return {"target_modules": ["c_attn"]}
    return {}


METHOD = register(Method(config_class=GainConfig, leaf_keys=(LEAF,), create=create, interceptor=interceptor,
                         merge_layer=merge_layer, task_defaults=task_defaults, cli_name="toy-gain",
                         leaf_layouts={LEAF: ("stack", "out")}))
