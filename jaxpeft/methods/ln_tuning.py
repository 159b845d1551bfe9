"""LN tuning: train a copy of each selected normalisation layer's parameters (Zhao et al., 2023), as HF PEFT's
``LN_TUNING`` does; the base parameters stay as they are.

Leaves kept in a selected norm's parameters (flax ``nn.LayerNorm``/``nn.RMSNorm``, jaxpeft's Llama ``RMSNorm`` and
Gemma ``GemmaRMSNorm``: any module whose own parameters are ``scale`` and optionally ``bias``), for adapter
``name``:

- ``ln_tuning_scale/<name>``: float32, a copy of the norm's ``scale`` at creation, same shape (stacked
  ``(*stack, ...)`` under ``nn.scan``). HF PEFT's tensor ``<module>.ln_tuning_layers.weight``.
- ``ln_tuning_bias/<name>``: the same for the norm's ``bias``, where it has one (``...ln_tuning_layers.bias``).
- ``ln_tuning_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects
  and 0 for the others (which keep running with the base parameters). A constant, never trained.

The adapted norm runs with the copies in place of its parameters (cast to their dtype); merge writes the copies into
the base parameters and unmerge puts the originals back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _layouts, _targets
from jaxpeft._tracing import Trace
from jaxpeft.config import PeftConfig, check, strict_options
from jaxpeft.core import AdapterError
from jaxpeft.method import Method, register
from jaxpeft.methods._reweight import run_with

Path = tuple[str, ...]
# leaf key -> the norm parameter it copies, and its name in torch
COPIES = {"ln_tuning_scale": ("scale", "weight"), "ln_tuning_bias": ("bias", "bias")}
ACTIVE = "ln_tuning_active"

# HF PEFT's per-architecture targets (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING), for the norms.
DEFAULT_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@strict_options
@dataclasses.dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning options, with HF PEFT's names and defaults.

    Attributes:
        target_modules: the normalisation layers to tune: module names or dotted path suffixes (list) or a
            full-match regex on the dotted path (string). None: HF PEFT's layers for the model's architecture
            (``get_peft_model``; e.g. ``ln_1``, ``ln_2``, ``ln_f`` for GPT-2), required otherwise.
        exclude_modules: the same forms, for norms to leave alone.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.ln_tuning import LNTuningConfig
        >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(2)])  # layers_0, layers_1, layers_2
        >>> x = jnp.ones((1, 4))
        >>> config = LNTuningConfig(target_modules=["layers_1"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> sorted(key for key in variables["params"]["layers_1"] if key.startswith("ln_tuning"))
        ['ln_tuning_active', 'ln_tuning_bias', 'ln_tuning_scale']
        >>> adapted = jaxpeft.rewrite(model.apply, config)
        >>> bool(jnp.array_equal(adapted(variables, x), model.apply(variables, x)))  # copies: unchanged at first
        True
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                value = list(value)
                check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
                setattr(self, name, value)


def task_defaults(config: LNTuningConfig, model) -> dict[str, Any]:
    """HF PEFT's norms for the model's architecture when the config names none."""
    model_type = model.config.model_type
    if config.target_modules is not None or model_type not in DEFAULT_TARGETS:
        return {}
    return {"target_modules": list(DEFAULT_TARGETS[model_type])}


# ----- create -----

def _targeted(config: LNTuningConfig, name: str) -> bool:
    if _targets.matches(name, config.exclude_modules) or _targets.is_saved_module(name, config.modules_to_save):
        return False
    return _targets.matches(name, config.target_modules)


def _own_params(trace: Trace, path: Path) -> dict[str, tuple[int, ...]]:
    """``{name: stacked shape}`` of the parameters the module at ``path`` holds itself (not its submodules')."""
    return {key[-1]: shape for key, shape in trace.param_shapes.items() if key[:-1] == path}


def _norm_params(trace: Trace, path: Path, name: str) -> dict[str, tuple[int, ...]]:
    """The norm's ``scale`` (and ``bias``) shapes; a one-line error for a module that is not a norm."""
    own = _own_params(trace, path)
    if "scale" not in own or set(own) - {"scale", "bias"}:
        kind = trace.module_types.get(path, "module")
        held = ", ".join(sorted(own)) or "no parameters of its own"
        raise AdapterError(f"LN tuning trains normalisation layers (parameters 'scale' and optionally 'bias'); "
                           f"{name!r} is a {kind} holding {held}: leave it out of target_modules")
    return own


def create(key: jax.Array, config: LNTuningConfig, trace: Trace, dtype: Any) -> dict[tuple[Path, str], Any]:
    """Placeholders shaped like each selected norm's parameters (``finish`` copies the values in)."""
    del key
    if config.target_modules is None:
        raise AdapterError("LN tuning needs target_modules for this model (HF PEFT's defaults are known only for "
                           f"model types {', '.join(sorted(DEFAULT_TARGETS))}); name its norm layers")
    leaves = {}
    for path, virtual in sorted(trace.module_virtual_paths.items()):
        hits = [index for index, name in virtual.items() if path and _targeted(config, name)]
        if not hits:
            continue
        own = _norm_params(trace, path, virtual[hits[0]])
        active = np.zeros(own["scale"][:len(hits[0])], np.float32)
        for index in hits:
            active[index] = 1.0
        for leaf_key, (param, _) in COPIES.items():
            if param in own:
                leaves[(path, leaf_key)] = jnp.zeros(own[param], dtype)
        leaves[(path, ACTIVE)] = jnp.asarray(active)
    if not leaves:
        raise AdapterError(f"target_modules {config.target_modules!r} matched no module; modules that exist: "
                           f"{trace.existing_paths()}")
    if isinstance(config.target_modules, list):
        selected = [name for path, leaf_key in leaves if leaf_key == ACTIVE
                    for name in trace.module_virtual_paths[path].values()]
        unmatched = [t for t in config.target_modules if not any(_targets.matches(n, [t]) for n in selected)]
        if len(unmatched) == len(config.target_modules):
            raise AdapterError(f"target_modules {unmatched!r} matched no module; modules that exist: "
                               f"{trace.existing_paths()}")
    return leaves


def finish(key: jax.Array, config: LNTuningConfig, trace: Trace, new_leaves: dict, flat_params: dict):
    """Fills each copy with the norm parameter's value."""
    del key, config, trace
    filled = {}
    for (path, leaf_key), value in new_leaves.items():
        if leaf_key in COPIES:
            base = nn.meta.unbox(flat_params[path + (COPIES[leaf_key][0],)])
            value = jnp.array(base, dtype=value.dtype)
        filled[(path, leaf_key)] = value
    return filled, flat_params


# ----- forward -----

def _selected(copy: jax.Array, base: jax.Array, active: jax.Array) -> jax.Array:
    """The copy on the selected layers of a stack, the base parameter elsewhere, in the base's dtype."""
    active = active.reshape(active.shape + (1,) * (copy.ndim - active.ndim))
    return jnp.where(active > 0, copy.astype(jnp.float32), base.astype(jnp.float32)).astype(base.dtype)


def _replacements(module_params: Any, leaves: dict[str, Any]) -> dict[str, jax.Array]:
    """``{norm parameter: value to run with}`` from one adapter's leaves."""
    active = jnp.asarray(nn.meta.unbox(leaves[ACTIVE]))
    replaced = {}
    for leaf_key, (param, _) in COPIES.items():
        if leaf_key not in leaves:
            continue
        base = nn.meta.unbox(module_params[param])
        copy = jnp.asarray(nn.meta.unbox(leaves[leaf_key]))
        if copy.shape != base.shape:
            raise AdapterError(f"{leaf_key} {copy.shape} does not fit the norm's {param} {base.shape}: the adapter "
                               "was made for another model")
        replaced[param] = _selected(copy, base, active)
    return replaced


def interceptor(config: LNTuningConfig, adapter_name: str, dropout: bool):
    """Runs each selected norm with the named adapter's copies of its parameters."""
    del config, dropout

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        params = module.variables.get("params", {})
        if adapter_name not in params.get("ln_tuning_scale", {}):
            return next_fun(*args, **kwargs)
        leaves = {key: params[key][adapter_name] for key in (*COPIES, ACTIVE) if adapter_name in params.get(key, {})}
        return run_with(module, "__call__", args, kwargs, **_replacements(params, leaves))

    return adapt


# ----- merge -----

def merge_layer(config: LNTuningConfig, layer_params: dict, leaves: dict, sign: float) -> dict:
    """The norm's parameters replaced by the copies (``sign`` 1); unmerging goes through ``unmerge_layer``."""
    del config
    if sign < 0:
        raise AdapterError("LN tuning cannot be taken out of merged weights without the originals; pass them")
    return {param: _reboxed(layer_params[param], value)
            for param, value in _replacements(layer_params, leaves).items()}


def unmerge_layer(config: LNTuningConfig, layer_params: dict, leaves: dict, original_params: dict) -> dict:
    """The norm's original parameters back."""
    del config, leaves
    return {param: original_params[param] for param in layer_params if param in ("scale", "bias")}


def _reboxed(original: Any, value: jax.Array) -> Any:
    return original.replace_boxed(value) if isinstance(original, nn.meta.AxisMetadata) else value


# ----- files -----

def torch_tensors(config: LNTuningConfig, layer: Any, name: str, shapes: dict[Path, tuple[int, ...]]) -> dict:
    """HF PEFT's names: ``<norm>.ln_tuning_layers.weight`` (the scale) and ``.bias``, same shapes."""
    del config, layer, name
    return {f"ln_tuning_layers.{torch_name}": ((leaf_key,), _layouts.plain_layout(shapes[(leaf_key,)], flat=False))
            for leaf_key, (_, torch_name) in COPIES.items() if (leaf_key,) in shapes}


METHOD = register(Method(
    config_class=LNTuningConfig, leaf_keys=("ln_tuning_scale", ACTIVE), optional_leaf_keys=("ln_tuning_bias",),
    constant_keys=(ACTIVE,), create=create, finish=finish, interceptor=interceptor, merge_layer=merge_layer,
    unmerge_layer=unmerge_layer, task_defaults=task_defaults, torch_tensors=torch_tensors,
    leaf_layouts={"ln_tuning_scale": ("kernel",), "ln_tuning_bias": ("bias",), ACTIVE: ("stack",)}))
