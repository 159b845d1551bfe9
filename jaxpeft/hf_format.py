"""Adapters as Hugging Face PEFT adapter folders, both ways, for every jaxpeft method.

A folder holds ``adapter_config.json`` (the config as HF PEFT writes it, ``peft_type`` naming the method) and
``adapter_model.safetensors``. An adapter not named ``"default"`` goes to ``<folder>/<adapter name>``. For the
methods torch PEFT has, names and layouts are torch PEFT's, so each side loads what the other writes:

- LoRA (``"LORA"``, with rsLoRA and DoRA): ``base_model.model.<HF module path>.lora_A.weight`` ``[r, in]`` and
  ``.lora_B.weight`` ``[out, r]`` (jaxpeft keeps the transposes, ``(*input axes, r)`` and ``(r, *output axes)``;
  DenseGeneral and Einsum axes are flattened, Conv factors take torch's ``[r, in, *window]`` and
  ``[out, r, 1, ...]``); ``.lora_embedding_A`` ``[r, vocab]`` and ``.lora_embedding_B`` ``[dim, r]`` for
  embeddings; with DoRA ``.lora_magnitude_vector`` ``[out]`` (``[1, out, 1, ...]`` for Conv); with
  ``bias="all"``/``"lora_only"`` the trained biases (``...q_proj.base_layer.bias`` for an adapted layer).
  ``lora_scaling`` is not saved: it is recomputed from the config (``lora_alpha``, ``r``, patterns, rsLoRA).
- (IA)^3 (``"IA3"``): ``base_model.model.<HF module path>.ia3_l``, ``[out, 1]``, or ``[1, in]`` for a module in
  ``feedforward_modules`` (GPT-2's Conv1D layers alike), ``[1, channels, 1, ...]`` for Conv (jaxpeft's ``ia3_l``
  is the same vector shaped like the kernel).
- Prompt and prefix tuning, p-tuning (``"PROMPT_TUNING"``, ``"PREFIX_TUNING"``, ``"P_TUNING"``):
  ``prompt_embeddings``, written and read by the method's own hooks (``hf_tensors`` and ``leaves_from_hf``).
- LoHa, LoKr, VeRA, OFT, BOFT, LN tuning, trainable tokens: the method keeps its leaves in torch's layout under
  HF PEFT's names, so each is ``base_model.model.<HF module path>.<leaf key>`` (``hada_w1_a``, ``lokr_w1``,
  ``vera_lambda_b``, ``oft_R.weight``, ``ln_tuning_layers.weight``, ...); VeRA's shared projections are
  ``base_model.vera_A``/``vera_B``. Each method file's docstring lists its tensors; a method names them through
  its ``torch_tensors`` hook where the leaf key and the torch name differ.
- Every method: the trained copies of ``modules_to_save`` under the module's own names and torch layout (a Linear
  weight is the Dense kernel transposed, GPT-2's Conv1D weight is not): ``base_model.model.score.weight``, or
  ``base_model.score.weight`` for prompt and prefix tuning, whose torch model holds the transformers model one
  level up.

Methods that HF PEFT lacks (BitFit ``"BITFIT"``, bottleneck adapters ``"BOTTLENECK"``, any method whose leaves
live in the layers) are saved in the same two files in jaxpeft's own layout: one tensor per layer and leaf, named
``base_model.model.<HF module path>.<leaf key>`` (``.<sub key>...`` added for leaves that are dicts) and shaped
as jaxpeft keeps the leaf for one layer, e.g. ``base_model.model.transformer.h.0.attn.c_attn.bitfit_bias``
``[3 * hidden]``. Constant leaves (``bitfit_active``, ...) are not written: loading rebuilds them from the config.
torch PEFT cannot read these folders.

The layers of a scanned (``nn.scan``) stack are written one by one under their per-layer names and stacked again
on load, so a folder saved from a scanned model loads into the unscanned one and back. Layers of a stack that the
adapter leaves alone are not written: methods mark the layers they cover with a constant ``(*stack,)`` leaf
(``lora_scaling``, ``ia3_active``, ``bitfit_active``), 0 where a layer is left alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxpeft import _layouts, _targets, outputs
from jaxpeft._tracing import PARAM_SLOTS, Trace, trace_layers
from jaxpeft.config import CONFIG_CLASSES, ConfigError, PeftConfig, config_class
from jaxpeft.core import AdapterError, check_adapter_name, init_adapters, parameter_layer
from jaxpeft.method import Method, method_for
from jaxpeft.methods.lora import kernel_axes
from jaxpeft.tree import (
    ADAPTER_KEYS,
    CONSTANT_KEYS,
    SAVED_MODULES_KEY,
    adapter_names,
    flatten,
    shape_of,
    strip_adapters,
    unflatten_like,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"  # saved in the folder itself; any other adapter in ``<folder>/<name>``
# The default adapter's files at the top of a folder (torch PEFT's pickled weights too): never a sub-folder's name.
_TOP_LEVEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")
KEY_PREFIX = "base_model.model."
PROMPT_KEY_PREFIX = "base_model."  # torch PEFT's prompt-learning models hold the transformers model directly

Path = tuple[str, ...]

# Keys HF PEFT writes that do not change what a saved adapter computes (bookkeeping, or how the weights were
# initialised before training): accepted whatever their value.
_IGNORED_HF_KEYS = frozenset({
    "auto_mapping", "peft_version", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
})
# Values that mean "feature off" for keys jaxpeft does not know: such keys are accepted, any other value is an error.
_OFF_VALUES = (None, False, {}, [], "")
# init_lora_weights values that only say how training started; the saved weights are what counts.
_SUPPORTED_INIT = (True, False, "gaussian")
# Options that torch PEFT keeps as sets (written in any order): sorted on reading.
_SET_OPTIONS = ("target_modules", "exclude_modules", "feedforward_modules")


def supported_peft_types() -> list[str]:
    """The ``peft_type`` values jaxpeft reads and writes.

    Example:
        >>> from jaxpeft.hf_format import supported_peft_types
        >>> {"LORA", "IA3", "BITFIT"} <= set(supported_peft_types())
        True
    """
    return sorted(CONFIG_CLASSES)


# ----- config <-> adapter_config.json -----

def config_to_hf_dict(config: PeftConfig) -> dict[str, Any]:
    """The config as the JSON-ready dict of HF PEFT's ``adapter_config.json``.

    Example:
        >>> import jaxpeft
        >>> from jaxpeft.hf_format import config_to_hf_dict
        >>> d = config_to_hf_dict(jaxpeft.LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
        >>> d["peft_type"], d["r"], d["target_modules"]
        ('LORA', 4, ['q_proj', 'v_proj'])
        >>> config_to_hf_dict(jaxpeft.IA3Config(target_modules=["k_proj"]))["peft_type"]
        'IA3'
    """
    if not isinstance(config, PeftConfig):
        raise TypeError(f"expected a jaxpeft config such as LoraConfig, got {type(config).__name__}")
    config_class(config.peft_type)
    return json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the JSON file


def config_from_hf_dict(hf_dict: dict[str, Any]) -> PeftConfig:
    """A jaxpeft config from the dict of an ``adapter_config.json`` written by HF PEFT (or by ``save_adapter``).

    ``peft_type`` picks the config class (``LoraConfig``, ``IA3Config``, ...). Bookkeeping keys (``peft_version``,
    ``auto_mapping``, ``megatron_*``, ...) and init-only options are ignored; other unknown keys are accepted when
    they leave their feature off (``None``, ``False``, empty). Options that would change what the adapter computes
    and that jaxpeft does not support, and unknown ``peft_type`` values, are a ``ConfigError``.

    Example:
        >>> from jaxpeft.hf_format import config_from_hf_dict
        >>> config = config_from_hf_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        ...                               "peft_version": "0.21.0", "use_qalora": False, "init_lora_weights": "pissa"})
        >>> config.r, config.target_modules, config.init_lora_weights
        (4, ['q_proj'], True)
        >>> config_from_hf_dict({"peft_type": "IA3", "target_modules": ["v_proj", "k_proj"]}).target_modules
        ['k_proj', 'v_proj']
    """
    if not isinstance(hf_dict, dict):
        raise ConfigError(f"an adapter config is a JSON object, got {type(hf_dict).__name__}")
    cls = config_class(hf_dict.get("peft_type"))
    known = {field.name for field in dataclasses.fields(cls)}
    options = {}
    for key, value in hf_dict.items():
        if key == "peft_type" or key in _IGNORED_HF_KEYS:
            continue
        if key in known:
            options[key] = value
        elif not any(value == off and type(value) is type(off) for off in _OFF_VALUES):
            raise ConfigError(f"the {cls.peft_type} adapter config sets {key}={value!r}, which jaxpeft does not "
                              "support")
    if "init_lora_weights" in options and options["init_lora_weights"] not in _SUPPORTED_INIT:
        options["init_lora_weights"] = True  # e.g. "pissa", "olora", "eva": only the initialisation differed
    for key in _SET_OPTIONS:
        if isinstance(options.get(key), list):
            options[key] = sorted(options[key])  # a set in torch PEFT: order means nothing
    return cls(**options)


# ----- tensor layouts: jaxpeft leaf (one layer of a stack) <-> torch tensor -----

@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one tensor of the file lives in the params: a leaf, a stack index in it, and the layout change."""

    leaf_path: Path
    index: tuple[int, ...]
    jax_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _own_tensors(shapes: dict[Path, tuple[int, ...]]) -> dict:
    return {".".join(key): (key, _layouts.plain_layout(shape, flat=False)) for key, shape in shapes.items()
            if key[0] not in CONSTANT_KEYS}


# ----- which tensors an adapter has, under which names -----

def _conv1d_names(apply_fn: Callable) -> tuple[str, ...]:
    """The layers a ``jaxpeft.models`` model's torch twin holds as ``Conv1D`` (none for other models)."""
    from jaxpeft.models.auto import family_for

    module = getattr(apply_fn, "__self__", None)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return ()
    try:
        return family_for(model_type).conv1d_layers
    except ValueError:  # a model type jaxpeft.models does not serve
        return ()


def _key_prefix(method: Method) -> str:
    return PROMPT_KEY_PREFIX if method.call is not None else KEY_PREFIX


def _stack_shape(virtual: dict[tuple[int, ...], str]) -> tuple[int, ...]:
    indices = list(virtual)
    return tuple(max(index[i] for index in indices) + 1 for i in range(len(indices[0]))) if indices else ()


def _unboxed(leaf: Any) -> np.ndarray:
    return np.asarray(jax.device_get(nn.meta.unbox(leaf)))


def _adapter_leaves(flat: dict[Path, Any], adapter_name: str) -> dict[Path, dict[Path, Path]]:
    """The named adapter's leaves by the module holding them, ``{module path: {(leaf key, *sub keys): leaf path}}``
    (module path ``()`` for methods that keep their leaves at the top); modules_to_save copies are left out."""
    groups: dict[Path, dict[Path, Path]] = {}
    for path in flat:
        for i, key in enumerate(path[:-1]):
            if key in ADAPTER_KEYS:
                if key != SAVED_MODULES_KEY and path[i + 1] == adapter_name:
                    groups.setdefault(path[:i], {})[(key,) + path[i + 2:]] = path
                break
    return groups


def _covered(flat: dict[Path, Any], leaves: dict[Path, Path], virtual: dict) -> dict:
    """``{stack index: HF name}`` of the layers the adapter covers: where its ``(*stack,)`` constants are not 0."""
    stack_ndim = len(next(iter(virtual)))
    masks = [_unboxed(flat[path]) for key, path in leaves.items()
             if key[0] in CONSTANT_KEYS and len(key) == 1 and len(shape_of(flat[path])) == stack_ndim]
    return {index: name for index, name in virtual.items() if all(mask[index] != 0 for mask in masks)}


def _base_leaf_layout(trace: Trace, owner: Path, leaf_name: str, shape: tuple[int, ...], conv1d: tuple[str, ...]):
    """(torch name, layout) of a base parameter of module ``owner`` (shape without stack axes), or None."""
    layer = trace.layers.get(owner)
    if layer is not None and leaf_name in ("kernel", "embedding"):
        try:
            n_in = len(kernel_axes(layer)[0])
        except AdapterError:  # a layer LoRA cannot adapt (e.g. an Einsum with batch axes): no torch name for it
            return None
        is_conv1d = layer.kind == "dense" and owner[-1] in conv1d
        return "weight", _layouts.kernel_layout(layer.kind, shape, n_in, is_conv1d)
    if leaf_name == "bias":
        return "bias", _layouts.plain_layout(shape, flat=layer is not None)
    if leaf_name == "scale":
        return "weight", _layouts.plain_layout(shape, flat=False)
    return None


def renamed(name: str, key_mapping: Mapping[str, str] | None) -> str:
    """``name`` (a module path, or a tensor name without prefix) after each ``{regex: replacement}`` of
    ``key_mapping`` in turn (``re.sub``), as transformers' ``key_mapping`` renames checkpoint keys."""
    for pattern, replacement in (key_mapping or {}).items():
        name = re.sub(pattern, replacement, name)
    return name


def _renamed_slots(slots: dict[str, Any], key_mapping: Mapping[str, str] | None) -> dict[str, Any]:
    if not key_mapping:
        return slots
    out = {}
    for name, slot in slots.items():
        new = renamed(name, key_mapping)
        if new in out:
            raise AdapterError(f"key_mapping gives two tensors the name {new!r}; make its patterns tell them apart")
        out[new] = slot
    return out


def _mapped_options(hf_dict: dict[str, Any], trace: Trace, flat: dict[Path, Any], adapter_name: str,
                    key_mapping: Mapping[str, str]) -> dict[str, Any]:
    """``hf_dict`` whose ``target_modules`` and ``modules_to_save`` list, renamed by ``key_mapping``, the modules
    the adapter covers, so that the model the names were mapped to finds exactly those."""
    def names(paths) -> list[str]:
        return sorted({renamed(name, key_mapping) for path in paths
                       for name in trace.module_virtual_paths.get(path, {}).values() if name})

    layers = [path for path in _adapter_leaves(flat, adapter_name)
              if path and not (len(path) >= 2 and path[-2] in PARAM_SLOTS)]
    saved = {path[:i] for path in flat for i in range(len(path) - 1)
             if path[i:i + 2] == (SAVED_MODULES_KEY, adapter_name)}
    mapped = dict(hf_dict)
    if isinstance(mapped.get("target_modules"), list) and layers:
        mapped["target_modules"] = names(layers)
    if mapped.get("modules_to_save") and saved:
        mapped["modules_to_save"] = names(saved)
    return mapped


def _unmapped_targets(targets: list[str], trace: Trace, key_mapping: Mapping[str, str]) -> list[str]:
    """The module paths of this model whose names, renamed by ``key_mapping``, the file's ``target_modules`` (or
    ``modules_to_save``) match: an adapter saved with a ``key_mapping`` covers the same modules loaded with it."""
    names = {name for paths in trace.module_virtual_paths.values() for name in paths.values() if name}
    return sorted(name for name in names if _targets.matches(renamed(name, key_mapping), targets)) or targets


def _join(module_name: str, suffix: str) -> str:
    return f"{module_name}.{suffix}" if module_name else suffix


def _slots(config: PeftConfig, trace: Trace, flat: dict[Path, Any], adapter_name: str, conv1d: tuple[str, ...],
           top_level: bool):
    """The adapter's tensors ``{name: slot}`` (all in the file) and the base ones the file may hold.

    ``top_level``: whether leaves kept at the top of ``params`` are written here (they are not when the method's
    ``hf_tensors`` hook writes them).
    """
    adapter_slots: dict[str, _Slot] = {}
    adapted: dict[Path, dict] = {}
    torch_layout = method_for(config).torch_tensors
    groups = _adapter_leaves(flat, adapter_name)
    for module_path, leaves in groups.items():
        if not module_path and not top_level:
            continue
        if len(module_path) >= 2 and module_path[-2] in PARAM_SLOTS:
            adapter_slots.update(_param_slots(config, trace, flat, module_path, leaves, groups))
            continue
        virtual = trace.module_virtual_paths.get(module_path) if module_path else {(): ""}
        layer = trace.layers.get(module_path)
        if not virtual:
            raise AdapterError(f"adapter {adapter_name!r} has leaves at {'.'.join(module_path)}, a module the sample "
                               "call does not run; pass the model's apply function and inputs it adapts")
        stack_ndim = len(next(iter(virtual)))
        shapes = {key: shape_of(flat[path])[stack_ndim:] for key, path in leaves.items()}
        covered = _covered(flat, leaves, virtual)
        if not covered:
            continue
        if torch_layout is None or not module_path:
            tensors = _own_tensors(shapes)
        else:
            adapted[module_path] = covered
            tensors = torch_layout(config, layer, next(iter(covered.values())), shapes)
            unnamed = [key for key in shapes if key[0] not in CONSTANT_KEYS
                       and key not in {leaf_key for leaf_key, _ in tensors.values()}]
            if unnamed:
                raise AdapterError(f"{config.peft_type} adapter {adapter_name!r} has a leaf {'.'.join(unnamed[0])} "
                                   f"at {'.'.join(module_path)} that HF PEFT's format has no name for")
        for index, name in covered.items():  # a method may name each layer of a stack its own way
            per_layer = (tensors if torch_layout is None or not module_path
                         else torch_layout(config, layer, name, shapes))
            for suffix, (key, layout) in per_layer.items():
                adapter_slots[_join(name, suffix)] = _Slot(leaves[key], index, shapes[key], *layout)

    saved_modules: set[Path] = set()
    marker = (SAVED_MODULES_KEY, adapter_name)
    for path in flat:
        for i in range(len(path) - 1):
            if path[i:i + 2] == marker:
                saved_modules.add(path[:i])
                _add_base_slot(adapter_slots, trace, path, path[:i] + path[i + 2:], flat[path], conv1d, {})
                break

    base_slots: dict[str, _Slot] = {}
    for path, leaf in flat.items():
        if any(key in ADAPTER_KEYS for key in path) or any(path[:len(m)] == m for m in saved_modules):
            continue
        _add_base_slot(base_slots, trace, path, path, leaf, conv1d, adapted.get(path[:-1], {}))
    return adapter_slots, base_slots


def _param_slots(config: PeftConfig, trace: Trace, flat: dict[Path, Any], group: Path, leaves: dict[Path, Path],
                 groups: dict) -> dict[str, _Slot]:
    """The tensors of an adapter on one parameter (``<module>/<slot>/<parameter>``), named as HF PEFT names its
    ``ParamWrapper``: the module's path, then ``base_layer.`` once for every adapted parameter of the same module
    that comes after this one (HF PEFT wraps the first parameter innermost, the module's first use of it counting
    as its place), then the tensor's name."""
    module_path, param = group[:-2], group[-1]
    virtual = trace.module_virtual_paths.get(module_path)
    layer = parameter_layer(trace, module_path + (param,))
    if not virtual or layer is None:
        raise AdapterError(f"the adapter has leaves for parameter {param!r} of {'.'.join(module_path)}, which the "
                           "sample call does not use; pass the model's apply function and inputs it adapts")
    stack_ndim = len(next(iter(virtual)))
    shapes = {key: shape_of(flat[path])[stack_ndim:] for key, path in leaves.items()}
    param_tensors = method_for(config).torch_param_tensors
    tensors = param_tensors(layer, shapes) if param_tensors is not None else _own_tensors(shapes)
    # HF PEFT wraps a module's parameters in the order the module registers them: the order the call uses them
    order = list(dict.fromkeys([key[-1] for key in trace.param_uses if key[:-1] == module_path]
                               + [key[-1] for key in trace.param_shapes if key[:-1] == module_path]))
    adapted_here = {g[-1] for g in groups if g[:-2] == module_path and len(g) >= 2 and g[-2] == group[-2]}
    depth = sum(1 for name in order[order.index(param) + 1:] if name in adapted_here)
    slots = {}
    for index, name in _covered(flat, leaves, virtual).items():
        for suffix, (key, layout) in tensors.items():
            slots[_join(name, "base_layer." * depth + suffix)] = _Slot(leaves[key], index, shapes[key], *layout)
    return slots


def _add_base_slot(slots: dict[str, _Slot], trace: Trace, leaf_path: Path, module_leaf_path: Path, leaf: Any,
                   conv1d: tuple[str, ...], adapted: dict) -> None:
    """Adds the torch-named slots of one base-like leaf (one per stacked layer); unnameable leaves are skipped."""
    owner = module_leaf_path[:-1]
    virtual = trace.module_virtual_paths.get(owner)
    if not virtual:
        if leaf_path != module_leaf_path:
            raise AdapterError(f"modules_to_save holds {'.'.join(module_leaf_path)}, whose module the sample call "
                               "does not run")
        return
    stack = _stack_shape(virtual)
    shape = shape_of(leaf)[len(stack):]
    found = _base_leaf_layout(trace, owner, module_leaf_path[-1], shape, conv1d)
    if found is None:
        if leaf_path != module_leaf_path:
            raise AdapterError(f"cannot name {'.'.join(module_leaf_path)} (in modules_to_save) the torch way")
        return
    torch_name, layout = found
    for index, name in virtual.items():
        base = f"{name}.base_layer" if index in adapted else name
        slots[f"{base}.{torch_name}"] = _Slot(leaf_path, index, shape, *layout)


def _bias_keys(config: PeftConfig, base_slots: dict[str, _Slot]) -> list[str]:
    """The base tensors HF PEFT saves with a LoRA adapter: trained biases."""
    bias = getattr(config, "bias", "none")
    if bias == "all":
        return [k for k in base_slots if k.endswith(".bias")]
    if bias.endswith("_only"):  # "lora_only", "vera_only": the biases of adapted layers
        return [k for k in base_slots if k.endswith(".base_layer.bias")]
    return []


# ----- save -----

def _sub_folder_problem(folder: str, sub_folder: str) -> str | None:
    """What makes ``sub_folder`` unfit to hold a non-default adapter of ``folder``, or None: it must resolve (links
    followed) strictly inside ``folder``, off the default adapter's files, and not be a file already."""
    root = os.path.realpath(folder)
    resolved = os.path.realpath(sub_folder)
    if resolved == root or os.path.commonpath([root, resolved]) != root:
        return f"it resolves to {resolved}, which is not a folder inside {folder}"
    top = os.path.relpath(resolved, root).split(os.sep)[0]
    if top.casefold() in {name.casefold() for name in _TOP_LEVEL_FILES}:
        return f"it would replace the default adapter's {top}"
    if os.path.lexists(sub_folder) and not os.path.isdir(sub_folder):
        return "a file of that name is in the way"
    return None


def adapter_folder(folder: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> str:
    """Where ``save_adapter`` writes the named adapter: ``folder`` for ``"default"``, ``folder/<adapter_name>`` for
    any other (HF PEFT's layout), after checking the name (``jaxpeft.core.check_adapter_name``) and that the
    sub-folder stays inside ``folder`` and off the default adapter's files. A one-line ``AdapterError`` otherwise.

    Example:
        >>> from jaxpeft.hf_format import adapter_folder
        >>> adapter_folder("out"), adapter_folder("out", "b")
        ('out', 'out/b')
        >>> adapter_folder("out", "adapter_config.json")
        Traceback (most recent call last):
        ...
        jaxpeft.core.AdapterError: cannot save adapter 'adapter_config.json' in out/adapter_config.json: it would ...
    """
    folder = os.fspath(folder)
    check_adapter_name(adapter_name)
    if adapter_name == DEFAULT_ADAPTER:
        return folder
    sub_folder = os.path.join(folder, adapter_name)
    problem = _sub_folder_problem(folder, sub_folder)
    if problem is not None:
        raise AdapterError(f"cannot save adapter {adapter_name!r} in {sub_folder}: {problem}")
    return sub_folder


def _check_adapter_present(variables: Any, flat: dict[Path, Any], config: PeftConfig, method: Method,
                           adapter_name: str) -> None:
    own_keys = set(method.all_leaf_keys)
    found = {key[0] for leaves in _adapter_leaves(flat, adapter_name).values() for key in leaves}
    if not found & own_keys:
        raise AdapterError(f"the variables hold no {config.peft_type} adapter {adapter_name!r} (adapters present: "
                           f"{adapter_names(variables) or 'none'})")


def _write_folder(folder: str, hf_dict: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes both files to a temporary folder next to ``folder`` and moves them in place."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        with open(os.path.join(staging, CONFIG_NAME), "w") as file:
            json.dump(hf_dict, file, indent=2, sort_keys=True)
            file.write("\n")
        safetensors.numpy.save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        outputs.follow_umask(staging, folder=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            outputs.follow_umask(os.path.join(staging, name), folder=False)
        if not os.path.exists(folder):
            os.rename(staging, folder)
        else:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_adapter(folder: str | os.PathLike, variables: Any, config: PeftConfig, apply_fn: Callable, *sample_args,
                 adapter_name: str = "default", key_mapping: Mapping[str, str] | None = None,
                 **sample_kwargs) -> str:
    """Writes the named adapter as a Hugging Face PEFT adapter folder (that torch ``PeftModel.from_pretrained``
    loads, for the methods torch PEFT has; see the module docstring for every method's tensors).

    ``apply_fn(variables, *sample_args, **sample_kwargs)`` is traced once (``jax.eval_shape``, nothing is
    computed) to name the adapted layers the Hugging Face way; ``key_mapping`` (``{regex: replacement}``, applied
    with ``re.sub`` in order to each tensor name without the ``base_model.model.`` prefix) renames them for a model
    whose module paths differ from the transformers model's, and the saved ``target_modules`` and
    ``modules_to_save`` follow. The folder gets ``adapter_config.json`` and ``adapter_model.safetensors``; an
    adapter not named ``"default"`` goes to ``<folder>/<adapter_name>`` as in HF PEFT, checked to stay inside
    ``folder`` (``adapter_folder``) before anything is written. Both files are written to a temporary folder first
    and moved in place, so an error leaves nothing half-written. Returns the folder written.

    Example:
        >>> import json, os, tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.hf_format import save_adapter
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 4))
        >>> config = jaxpeft.LoraConfig(r=2, target_modules=["layers_0"])
        >>> base = model.init(jax.random.key(1), x)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, x)
        >>> folder = save_adapter(tempfile.mkdtemp(), variables, config, model.apply, x)
        >>> sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> from safetensors.numpy import load_file
        >>> {k: v.shape for k, v in sorted(load_file(os.path.join(folder, "adapter_model.safetensors")).items())}
        {'base_model.model.layers_0.lora_A.weight': (2, 4), 'base_model.model.layers_0.lora_B.weight': (8, 2)}
        >>> bitfit = jaxpeft.BitFitConfig(target_modules=["layers_2"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), bitfit, model.apply, base, x, adapter_name="bias")
        >>> folder = save_adapter(tempfile.mkdtemp(), variables, bitfit, model.apply, x, adapter_name="bias")
        >>> {k: v.shape for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}
        {'base_model.model.layers_2.bitfit_bias': (2,)}
    """
    target = adapter_folder(folder, adapter_name)
    hf_dict = config_to_hf_dict(config)
    hf_dict["inference_mode"] = True  # as HF PEFT writes it
    method = method_for(config)
    flat = flatten(variables.get("params", {}))
    _check_adapter_present(variables, flat, config, method, adapter_name)
    hooked = method.hf_tensors is not None
    trace = trace_layers(apply_fn, strip_adapters(variables), sample_args, sample_kwargs)
    adapter_slots, base_slots = _slots(config, trace, flat, adapter_name, _conv1d_names(apply_fn),
                                       top_level=not hooked)
    slots = {**adapter_slots, **{k: base_slots[k] for k in _bias_keys(config, base_slots)}}
    if key_mapping:
        slots = _renamed_slots(slots, key_mapping)
        hf_dict = _mapped_options(hf_dict, trace, flat, adapter_name, key_mapping)
    prefix = _key_prefix(method)
    tensors = {}
    for name, slot in slots.items():
        tensors[prefix + name] = np.ascontiguousarray(slot.to_hf(_unboxed(flat[slot.leaf_path])[slot.index]))
    if hooked:
        for name, value in method.hf_tensors(config, variables, adapter_name).items():
            if name.removeprefix(prefix) in {key.removeprefix(prefix) for key in tensors}:
                raise AdapterError(f"{config.peft_type}'s hf_tensors names {name!r}, which the adapter already uses")
            tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(value)))

    _write_folder(target, hf_dict, tensors)
    return target


# ----- load -----

def _adapter_files(folder: str, adapter_name: str) -> tuple[str, str]:
    candidates = [folder] + ([os.path.join(folder, adapter_name)] if adapter_name != DEFAULT_ADAPTER else [])
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            weights = os.path.join(candidate, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                other = ""
                if os.path.isfile(os.path.join(candidate, "adapter_model.bin")):
                    other = " (found adapter_model.bin: jaxpeft reads only safetensors; re-save it with " \
                            "safe_serialization=True)"
                raise FileNotFoundError(f"{weights} does not exist{other}")
            return os.path.join(candidate, CONFIG_NAME), weights
    raise FileNotFoundError(f"no {CONFIG_NAME} in {' or '.join(candidates)}: not an HF PEFT adapter folder")


def _read_config(path: str) -> PeftConfig:
    try:
        with open(path) as file:
            hf_dict = json.load(file)
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path}: cannot read the adapter config ({error})") from error
    if not isinstance(hf_dict, dict):
        raise AdapterError(f"{path}: the adapter config is not a JSON object")
    try:
        return config_from_hf_dict(hf_dict)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from error


def _load_safetensors(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """``{key: (safetensors dtype such as "F32", array)}`` of a file; bfloat16 tensors come as ml_dtypes arrays."""
    from jaxpeft.models import hub

    problem = hub.safetensors_problem(path)
    if problem is not None:
        raise AdapterError(f"{path}: {problem}")
    try:
        with safetensors.safe_open(path, framework="flax") as file:
            return {key: (file.get_slice(key).get_dtype(), np.asarray(file.get_tensor(key))) for key in file.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, TypeError, AttributeError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error})") from error


def _tensor_problem(dtype: str, value: np.ndarray) -> str | None:
    """What makes a tensor of an adapter file unfit to load, or None: adapter weights are finite floats."""
    if not (dtype.startswith("F") or dtype == "BF16"):
        return f"holds {dtype} values, not floating point ones"
    if not np.isfinite(value).all():
        return "holds NaN or infinite values"
    return None


def _read_tensors(path: str, prefix: str) -> dict[str, np.ndarray]:
    tensors = {}
    for key, (dtype, value) in _load_safetensors(path).items():
        problem = _tensor_problem(dtype, value)
        if problem is not None:
            raise AdapterError(f"{path}: tensor {key!r} {problem}; the adapter was not loaded")
        tensors[key] = value
    by_name: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key.removeprefix(prefix)
        if name in by_name:
            raise AdapterError(f"{path}: tensor {name!r} appears both with and without the {prefix!r} prefix")
        by_name[name] = value
    return by_name


def _present_saved_modules(config: PeftConfig, trace: Trace) -> list[str] | None:
    """``modules_to_save`` restricted to the names this model has, without repeats (torch PEFT ignores the rest:
    a ``SEQ_CLS`` adapter lists both ``classifier`` and ``score``)."""
    if not config.modules_to_save:
        return config.modules_to_save
    names = [name for vp in trace.module_virtual_paths.values() for name in vp.values() if name]
    kept = [m for m in dict.fromkeys(config.modules_to_save) if any(_targets.matches(n, [m]) for n in names)]
    return kept or None


def _listing(names, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_adapter(folder: str | os.PathLike, apply_fn: Callable, variables: Any, *sample_args,
                 adapter_name: str = "default", adapter_dtype: Any = "float32",
                 key_mapping: Mapping[str, str] | None = None, **sample_kwargs) -> tuple[Any, PeftConfig]:
    """Reads an adapter folder (written by HF PEFT or by ``save_adapter``) into ``variables``: returns
    ``(new variables, config)``.

    The adapter is built with ``jaxpeft.init_adapters`` from the folder's config (so it targets the same layers)
    and filled from ``adapter_model.safetensors``; per-layer tensors go back into scanned stacks. Keys may have
    the ``base_model.model.`` prefix (``base_model.`` for prompt and prefix tuning) or not. Base tensors that torch
    PEFT saves along (trained biases with ``bias="all"``/``"lora_only"``, an adapted embedding's
    ``base_layer.weight``) replace the base weights in the result, as in torch. ``modules_to_save`` keeps the names
    this model has (a ``SEQ_CLS`` adapter lists both ``classifier`` and ``score``). ``variables`` is not changed.
    Anything that does not fit (files, ``peft_type``, options, tensor names or shapes, tensors that are not floating
    point or hold NaN or infinite values) is a one-line error and nothing is loaded. ``key_mapping`` is
    ``save_adapter``'s: this model's tensor names, renamed by it, are looked for in the file. Run the result with
    ``jaxpeft.rewrite(apply_fn, {adapter_name: config})``.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.hf_format import load_adapter, save_adapter
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 4))
        >>> base = model.init(jax.random.key(1), x)
        >>> config = jaxpeft.IA3Config(target_modules=["layers_0"], init_ia3_weights=False)
        >>> trained = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, x)
        >>> folder = save_adapter(tempfile.mkdtemp(), trained, config, model.apply, x)
        >>> loaded, loaded_config = load_adapter(folder, model.apply, base, x)
        >>> type(loaded_config).__name__
        'IA3Config'
        >>> apply = jaxpeft.rewrite(model.apply, loaded_config)
        >>> bool(jnp.allclose(apply(loaded, x), jaxpeft.rewrite(model.apply, config)(trained, x)))
        True
    """
    check_adapter_name(adapter_name)
    config_path, weights_path = _adapter_files(os.fspath(folder), adapter_name)
    config = _read_config(config_path)
    method = method_for(config)
    prefix = _key_prefix(method)
    tensors = _read_tensors(weights_path, prefix)
    if adapter_name in adapter_names(variables):
        raise AdapterError(f"an adapter named {adapter_name!r} already exists; pass another adapter_name=")
    trace = trace_layers(apply_fn, strip_adapters(variables), sample_args, sample_kwargs)
    if key_mapping:
        config = dataclasses.replace(config, **{
            option: _unmapped_targets(getattr(config, option), trace, key_mapping)
            for option in ("target_modules", "modules_to_save") if isinstance(getattr(config, option, None), list)})
    if "modules_to_save" in {field.name for field in dataclasses.fields(config)}:
        config = dataclasses.replace(config, modules_to_save=_present_saved_modules(config, trace))
    # Built in inference mode, which skips initialisations that need more than the model (prompt tuning's TEXT
    # needs a tokenizer), as HF PEFT does when it loads: the file's tensors replace the initial values.
    try:
        built = init_adapters(jax.random.key(0), dataclasses.replace(config, inference_mode=True), apply_fn,
                              variables, *sample_args, adapter_name=adapter_name, adapter_dtype=adapter_dtype,
                              **sample_kwargs)
    except AdapterError as error:
        raise AdapterError(f"the adapter in {os.fspath(folder)} does not fit this model: {error}") from error
    flat = flatten(built["params"])
    hooked = method.leaves_from_hf is not None
    adapter_slots, base_slots = _slots(config, trace, flat, adapter_name, _conv1d_names(apply_fn),
                                       top_level=not hooked)
    adapter_slots, base_slots = _renamed_slots(adapter_slots, key_mapping), _renamed_slots(base_slots, key_mapping)
    hook_names = {}  # name in the file without prefix -> the hook's name, and the shape it expects
    if hooked:
        for name, value in method.hf_tensors(config, built, adapter_name).items():
            hook_names[name.removeprefix(prefix)] = (name, tuple(np.shape(value)))

    expected = set(adapter_slots) | set(hook_names)
    unexpected = set(tensors) - expected - set(base_slots)
    if unexpected:
        raise AdapterError(f"{weights_path}: {len(unexpected)} tensor(s) match no adapted module of this model, e.g. "
                           f"{_listing(unexpected)}; the adapter was made for another base model (this one adapts "
                           f"{_listing(expected, 2) or 'nothing'})")
    missing = expected - set(tensors)
    if missing:
        raise AdapterError(f"{weights_path}: {len(missing)} tensor(s) of the adapter are missing, e.g. "
                           f"{_listing(missing)}")
    slots = {name: adapter_slots.get(name) or base_slots[name] for name in tensors if name not in hook_names}
    wanted = {**{name: slot.hf_shape for name, slot in slots.items()},
              **{name: shape for name, (_, shape) in hook_names.items()}}
    for name, shape in sorted(wanted.items()):
        got = tuple(tensors[name].shape)
        if got != shape:
            raise AdapterError(f"{weights_path}: tensor {name!r} has shape {got}, expected {shape} for this "
                               "model; the adapter was made for another base model")

    filled: dict[Path, np.ndarray] = {}
    for name, slot in slots.items():
        if slot.leaf_path not in filled:
            filled[slot.leaf_path] = np.array(_unboxed(flat[slot.leaf_path]))
        target = filled[slot.leaf_path]
        target[slot.index] = slot.from_hf(tensors[name]).astype(target.dtype)
    for path, value in filled.items():
        leaf = flat[path]
        array = jnp.asarray(value)
        flat[path] = leaf.replace_boxed(array) if isinstance(leaf, nn.meta.AxisMetadata) else array
    params = unflatten_like(flat, built["params"])
    new_variables = {**built, "params": params} if isinstance(built, dict) else built.copy({"params": params})
    if hooked:
        hook_tensors = {hook_name: tensors[name] for name, (hook_name, _) in hook_names.items()}
        new_variables = method.leaves_from_hf(config, hook_tensors, new_variables, adapter_name)
    return new_variables, config
