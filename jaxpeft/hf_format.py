"""LoRA adapters as Hugging Face PEFT adapter folders, both ways.

A folder holds ``adapter_config.json`` (the config, as HF PEFT writes it) and ``adapter_model.safetensors``, with
torch PEFT's tensor names and layouts:

- ``base_model.model.<HF module path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (jaxpeft keeps
  the transposes, ``(*input axes, r)`` and ``(r, *output axes)``; DenseGeneral and Einsum axes are flattened, Conv
  factors take torch's ``[r, in, *window]`` and ``[out, r, 1, ...]``);
- ``.lora_embedding_A`` ``[r, vocab]`` and ``.lora_embedding_B`` ``[dim, r]`` for embeddings;
- with DoRA, ``.lora_magnitude_vector`` ``[out]`` (``[1, out, 1, ...]`` for Conv; DenseGeneral output axes
  flattened);
- the trained copies of ``modules_to_save`` under the module's own names (``base_model.model.score.weight``, torch
  layout: a Linear weight is the Dense kernel transposed), and with ``bias="all"``/``"lora_only"`` the trained
  biases (``...q_proj.base_layer.bias`` for an adapted layer).

The layers of a scanned (``nn.scan``) stack are written one by one under their per-layer names and stacked again
on load; layers of a stack that the adapter leaves alone are not written. ``lora_scaling`` is not saved: it is
recomputed from the config (``lora_alpha``, ``r``, ``rank_pattern``, ``alpha_pattern``, rsLoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxpeft import _targets
from jaxpeft._tracing import Trace, trace_layers
from jaxpeft.config import ConfigError, PeftConfig
from jaxpeft.core import AdapterError, init_adapters
from jaxpeft.methods.lora import MAGNITUDE, LoraConfig, kernel_axes
from jaxpeft.tree import ADAPTER_KEYS, SAVED_MODULES_KEY, adapter_names, flatten, strip_adapters, unflatten_like

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA",)

Path = tuple[str, ...]

# Keys HF PEFT writes that do not change what a saved LoRA adapter computes (bookkeeping, or how the weights were
# initialised before training): accepted whatever their value.
_IGNORED_HF_KEYS = frozenset({
    "auto_mapping", "peft_version", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
})
# Values that mean "feature off" for keys jaxpeft does not know: such keys are accepted, any other value is an error.
_OFF_VALUES = (None, False, {}, [], "")
# init_lora_weights values that only say how training started; the saved weights are what counts.
_SUPPORTED_INIT = (True, False, "gaussian")
# GPT-2's Conv1D layers are Dense layers whose torch weight is [in, out] (jaxpeft's kernel layout).
_CONV1D_LAYERS = {"gpt2": ("c_attn", "c_proj", "c_fc")}


# ----- config <-> adapter_config.json -----

def config_to_hf_dict(config: PeftConfig) -> dict[str, Any]:
    """The config as the JSON-ready dict of HF PEFT's ``adapter_config.json``.

    Example:
        >>> import jaxpeft
        >>> from jaxpeft.hf_format import config_to_hf_dict
        >>> d = config_to_hf_dict(jaxpeft.LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
        >>> d["peft_type"], d["r"], d["target_modules"]
        ('LORA', 4, ['q_proj', 'v_proj'])
    """
    if not isinstance(config, PeftConfig):
        raise TypeError(f"expected a jaxpeft config such as LoraConfig, got {type(config).__name__}")
    if config.peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(f"cannot write {config.peft_type} adapters in the HF PEFT format; supported: "
                           f"{', '.join(SUPPORTED_PEFT_TYPES)}")
    return json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the JSON file


def config_from_hf_dict(hf_dict: dict[str, Any]) -> LoraConfig:
    """A jaxpeft config from the dict of an ``adapter_config.json`` written by HF PEFT (or by ``save_adapter``).

    Bookkeeping keys (``peft_version``, ``auto_mapping``, ``megatron_*``, ...) and init-only options are ignored;
    other unknown keys are accepted when they leave their feature off (``None``, ``False``, empty). Options that
    would change what the adapter computes and that jaxpeft does not support are a ``ConfigError``.

    Example:
        >>> from jaxpeft.hf_format import config_from_hf_dict
        >>> config = config_from_hf_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        ...                               "peft_version": "0.21.0", "use_qalora": False, "init_lora_weights": "pissa"})
        >>> config.r, config.target_modules, config.init_lora_weights
        (4, ['q_proj'], True)
    """
    peft_type = hf_dict.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ConfigError(f"peft_type={peft_type!r} is not supported by jaxpeft's HF format; supported: "
                          f"{', '.join(SUPPORTED_PEFT_TYPES)}")
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    options = {}
    for key, value in hf_dict.items():
        if key == "peft_type" or key in _IGNORED_HF_KEYS:
            continue
        if key in known:
            options[key] = value
        elif not any(value == off and type(value) is type(off) for off in _OFF_VALUES):
            raise ConfigError(f"the adapter config sets {key}={value!r}, which jaxpeft does not support")
    if options.get("init_lora_weights", True) not in _SUPPORTED_INIT:
        options["init_lora_weights"] = True  # e.g. "pissa", "olora", "eva": only the initialisation differed
    if options.get("target_modules") is not None and not isinstance(options["target_modules"], str):
        options["target_modules"] = sorted(options["target_modules"])  # a set in torch PEFT: order means nothing
    return LoraConfig(**options)


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


def _transpose_layout(jax_shape, perm):
    inverse = tuple(np.argsort(perm))
    return (tuple(jax_shape[p] for p in perm), lambda x: np.transpose(x, perm), lambda t: np.transpose(t, inverse))


def _matrix_layout(jax_shape, rows: int, transpose: bool):
    """jax ``(*row axes, *col axes)`` -> torch ``[cols, rows]`` (transpose) or ``[rows, cols]``."""
    n_rows = math.prod(jax_shape[:rows])
    n_cols = math.prod(jax_shape[rows:])
    if transpose:
        return ((n_cols, n_rows), lambda x: x.reshape(n_rows, n_cols).T,
                lambda t: t.T.reshape(jax_shape))
    return (n_rows, n_cols), lambda x: x.reshape(n_rows, n_cols), lambda t: t.reshape(jax_shape)


def _lora_layout(kind: str, factor: str, jax_shape: tuple[int, ...], window_ndim: int = 0):
    """(torch shape, to_hf, from_hf) of one layer's ``lora_A`` or ``lora_B``."""
    if kind == "conv" and factor == "lora_A":  # (*window, in, r) -> [r, in, *window]
        n = len(jax_shape)
        return _transpose_layout(jax_shape, (n - 1, n - 2, *range(n - 2)))
    if kind == "conv":  # (r, out) -> [out, r, 1, ...]: a 1x...x1 convolution
        rank, out = jax_shape
        ones = (1,) * window_ndim
        return (out, rank) + ones, lambda x: x.T.reshape((out, rank) + ones), lambda t: t.reshape(out, rank).T
    if factor == "lora_A":
        return _matrix_layout(jax_shape, len(jax_shape) - 1, transpose=True)
    return _matrix_layout(jax_shape, 1, transpose=True)


def _magnitude_layout(kind: str, jax_shape: tuple[int, ...], window_ndim: int):
    """(torch shape, to_hf, from_hf) of one layer's DoRA magnitude ``(*output axes)``."""
    if kind == "conv":  # (out,) -> [1, out, 1, ...]
        hf_shape = (1,) + tuple(jax_shape) + (1,) * window_ndim
        return hf_shape, lambda x: x.reshape(hf_shape), lambda t: t.reshape(jax_shape)
    return _plain_layout(jax_shape, flat=True)


def _kernel_layout(kind: str, jax_shape: tuple[int, ...], n_in: int, conv1d: bool):
    """(torch shape, to_hf, from_hf) of one layer's kernel (``weight`` in torch)."""
    if kind == "embed":
        return tuple(jax_shape), lambda x: x, lambda t: t
    if kind == "conv":  # (*window, in, out) -> [out, in, *window]
        n = len(jax_shape)
        return _transpose_layout(jax_shape, (n - 1, n - 2, *range(n - 2)))
    return _matrix_layout(jax_shape, n_in, transpose=not conv1d)


def _plain_layout(jax_shape: tuple[int, ...], flat: bool):
    if flat:  # a bias of DenseGeneral with several output axes is one vector in torch
        size = math.prod(jax_shape)
        return (size,), lambda x: x.reshape(size), lambda t: t.reshape(jax_shape)
    return tuple(jax_shape), lambda x: x, lambda t: t


# ----- which tensors an adapter has, under which names -----

def _conv1d_names(apply_fn: Callable) -> tuple[str, ...]:
    module = getattr(apply_fn, "__self__", None)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return _CONV1D_LAYERS.get(model_type, ())


def _stack_shape(virtual: dict[tuple[int, ...], str]) -> tuple[int, ...]:
    indices = list(virtual)
    return tuple(max(index[i] for index in indices) + 1 for i in range(len(indices[0]))) if indices else ()


def _base_leaf_layout(trace: Trace, owner: Path, leaf_name: str, shape: tuple[int, ...], conv1d: tuple[str, ...]):
    """(torch name, layout) of a base parameter of module ``owner`` (shape without stack axes), or None."""
    layer = trace.layers.get(owner)
    if layer is not None and leaf_name in ("kernel", "embedding"):
        try:
            n_in = len(kernel_axes(layer)[0])
        except AdapterError:  # a layer LoRA cannot adapt (e.g. an Einsum with batch axes): no torch name for it
            return None
        is_conv1d = layer.kind == "dense" and owner[-1] in conv1d
        return "weight", _kernel_layout(layer.kind, shape, n_in, is_conv1d)
    if leaf_name == "bias":
        return "bias", _plain_layout(shape, flat=layer is not None)
    if leaf_name == "scale":
        return "weight", _plain_layout(shape, flat=False)
    return None


def _adapted_indices(flat: dict[Path, Any], path: Path, adapter_name: str, virtual: dict) -> dict:
    """``{stack index: HF name}`` of the layers of ``path`` that the adapter covers (non-zero scaling)."""
    scaling = np.asarray(nn.meta.unbox(flat[path + ("lora_scaling", adapter_name)]))
    return {index: name for index, name in virtual.items() if scaling[index] != 0}


def _slots(trace: Trace, flat: dict[Path, Any], adapter_name: str, conv1d: tuple[str, ...]):
    """The adapter's tensors ``{name: slot}`` (all in the file) and the base ones the file may hold."""
    adapter_slots: dict[str, _Slot] = {}
    adapted: dict[Path, dict] = {}
    for path, leaf in flat.items():
        if path[-2:] != ("lora_A", adapter_name):
            continue
        layer_path = path[:-2]
        layer = trace.layers.get(layer_path)
        if layer is None:
            raise AdapterError(f"adapter {adapter_name!r} has leaves at {'.'.join(layer_path)}, a layer the sample "
                               "call does not run; pass the model's apply function and inputs it adapts")
        covered = _adapted_indices(flat, layer_path, adapter_name, layer.virtual_paths)
        adapted[layer_path] = covered
        stack_ndim = len(layer.stack_shape)
        a_shape = tuple(np.shape(nn.meta.unbox(leaf)))[stack_ndim:]
        b_shape = tuple(np.shape(nn.meta.unbox(flat[layer_path + ("lora_B", adapter_name)])))[stack_ndim:]
        a_layout = _lora_layout(layer.kind, "lora_A", a_shape)
        b_layout = _lora_layout(layer.kind, "lora_B", b_shape, window_ndim=len(a_shape) - 2)
        suffix_a, suffix_b = (("lora_embedding_A", "lora_embedding_B") if layer.kind == "embed"
                              else ("lora_A.weight", "lora_B.weight"))
        magnitude_path = layer_path + (MAGNITUDE, adapter_name)
        if magnitude_path in flat:
            m_shape = tuple(np.shape(nn.meta.unbox(flat[magnitude_path])))[stack_ndim:]
            m_layout = _magnitude_layout(layer.kind, m_shape, window_ndim=len(a_shape) - 2)
        for index, name in covered.items():
            adapter_slots[f"{name}.{suffix_a}"] = _Slot(layer_path + ("lora_A", adapter_name), index, a_shape,
                                                        *a_layout)
            adapter_slots[f"{name}.{suffix_b}"] = _Slot(layer_path + ("lora_B", adapter_name), index, b_shape,
                                                        *b_layout)
            if magnitude_path in flat:
                adapter_slots[f"{name}.{MAGNITUDE}"] = _Slot(magnitude_path, index, m_shape, *m_layout)

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
    shape = tuple(np.shape(nn.meta.unbox(leaf)))[len(stack):]
    found = _base_leaf_layout(trace, owner, module_leaf_path[-1], shape, conv1d)
    if found is None:
        if leaf_path != module_leaf_path:
            raise AdapterError(f"cannot name {'.'.join(module_leaf_path)} (in modules_to_save) the torch way")
        return
    torch_name, layout = found
    for index, name in virtual.items():
        base = f"{name}.base_layer" if index in adapted else name
        slots[f"{base}.{torch_name}"] = _Slot(leaf_path, index, shape, *layout)


def _bias_keys(config: LoraConfig, base_slots: dict[str, _Slot]) -> list[str]:
    """The base tensors HF PEFT saves with the adapter: trained biases."""
    if config.bias == "all":
        return [k for k in base_slots if k.endswith(".bias")]
    if config.bias == "lora_only":
        return [k for k in base_slots if k.endswith(".base_layer.bias")]
    return []


# ----- save -----

def _check_lora(config: Any) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"the HF PEFT format is written for LoraConfig adapters, got {type(config).__name__}")


def save_adapter(folder: str | os.PathLike, variables: Any, config: LoraConfig, apply_fn: Callable, *sample_args,
                 adapter_name: str = "default", **sample_kwargs) -> str:
    """Writes the named adapter as a Hugging Face PEFT adapter folder that torch ``PeftModel.from_pretrained`` loads.

    ``apply_fn(variables, *sample_args, **sample_kwargs)`` is traced once (``jax.eval_shape``, nothing is
    computed) to name the adapted layers the Hugging Face way. The folder gets ``adapter_config.json`` and
    ``adapter_model.safetensors``; an adapter not named ``"default"`` goes to ``<folder>/<adapter_name>`` as in HF
    PEFT. Both files are written to a temporary folder first and moved in place, so an error leaves nothing
    half-written. Returns the folder written.

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
    """
    _check_lora(config)
    present = adapter_names(variables)
    flat = flatten(variables.get("params", {}))
    if adapter_name not in present or not any(p[-2:] == ("lora_A", adapter_name) for p in flat):
        raise AdapterError(f"the variables hold no LoRA adapter {adapter_name!r} (adapters present: "
                           f"{present or 'none'})")
    trace = trace_layers(apply_fn, strip_adapters(variables), sample_args, sample_kwargs)
    adapter_slots, base_slots = _slots(trace, flat, adapter_name, _conv1d_names(apply_fn))
    slots = {**adapter_slots, **{k: base_slots[k] for k in _bias_keys(config, base_slots)}}
    tensors = {}
    for name, slot in slots.items():
        value = np.asarray(jax.device_get(nn.meta.unbox(flat[slot.leaf_path])))[slot.index]
        tensors[KEY_PREFIX + name] = np.ascontiguousarray(slot.to_hf(value))
    hf_dict = config_to_hf_dict(config)
    hf_dict["inference_mode"] = True  # as HF PEFT writes it

    folder = os.fspath(folder)
    if adapter_name != "default":
        folder = os.path.join(folder, adapter_name)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        with open(os.path.join(staging, CONFIG_NAME), "w") as file:
            json.dump(hf_dict, file, indent=2, sort_keys=True)
            file.write("\n")
        safetensors.numpy.save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        if not os.path.exists(folder):
            os.rename(staging, folder)
        else:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ----- load -----

def _adapter_files(folder: str, adapter_name: str) -> tuple[str, str]:
    candidates = [folder] + ([os.path.join(folder, adapter_name)] if adapter_name != "default" else [])
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


def _read_config(path: str) -> LoraConfig:
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


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error})") from error
    by_name: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        if name in by_name:
            raise AdapterError(f"{path}: tensor {name!r} appears both with and without the {KEY_PREFIX!r} prefix")
        by_name[name] = value
    return by_name


def _present_saved_modules(config: LoraConfig, trace: Trace) -> list[str] | None:
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
                 **sample_kwargs) -> tuple[Any, LoraConfig]:
    """Reads a Hugging Face PEFT LoRA adapter folder into ``variables``: returns ``(new variables, config)``.

    The adapter is built with ``jaxpeft.init_adapters`` from the folder's config (so it targets the same layers)
    and filled from ``adapter_model.safetensors``; per-layer tensors go back into scanned stacks. Keys may have
    the ``base_model.model.`` prefix or not. Base tensors that torch PEFT saves along (trained biases with
    ``bias="all"``/``"lora_only"``, an adapted embedding's ``base_layer.weight``) replace the base weights in the
    result, as in torch. ``modules_to_save`` keeps the names this model has (a ``SEQ_CLS`` adapter lists both
    ``classifier`` and ``score``). ``variables`` is not changed. Anything that does not fit (files,
    options, tensor names or shapes) is a one-line error and nothing is loaded. Run the result with
    ``jaxpeft.rewrite(apply_fn, {adapter_name: config})``.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.hf_format import load_adapter, save_adapter
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 4))
        >>> base = model.init(jax.random.key(1), x)
        >>> config = jaxpeft.LoraConfig(r=2, target_modules=["layers_0"], init_lora_weights=False)
        >>> trained = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, x)
        >>> folder = save_adapter(tempfile.mkdtemp(), trained, config, model.apply, x)
        >>> loaded, loaded_config = load_adapter(folder, model.apply, base, x)
        >>> apply = jaxpeft.rewrite(model.apply, loaded_config)
        >>> bool(jnp.allclose(apply(loaded, x), jaxpeft.rewrite(model.apply, config)(trained, x)))
        True
    """
    config_path, weights_path = _adapter_files(os.fspath(folder), adapter_name)
    config = _read_config(config_path)
    tensors = _read_tensors(weights_path)
    if adapter_name in adapter_names(variables):
        raise AdapterError(f"an adapter named {adapter_name!r} already exists; pass another adapter_name=")
    trace = trace_layers(apply_fn, strip_adapters(variables), sample_args, sample_kwargs)
    config = dataclasses.replace(config, modules_to_save=_present_saved_modules(config, trace))
    try:
        built = init_adapters(jax.random.key(0), config, apply_fn, variables, *sample_args,
                              adapter_name=adapter_name, adapter_dtype=adapter_dtype, **sample_kwargs)
    except AdapterError as error:
        raise AdapterError(f"the adapter in {os.fspath(folder)} does not fit this model: {error}") from error
    flat = flatten(built["params"])
    adapter_slots, base_slots = _slots(trace, flat, adapter_name, _conv1d_names(apply_fn))

    unexpected = set(tensors) - set(adapter_slots) - set(base_slots)
    if unexpected:
        raise AdapterError(f"{weights_path}: {len(unexpected)} tensor(s) match no adapted module of this model, e.g. "
                           f"{_listing(unexpected)}; the adapter was made for another base model (this one adapts "
                           f"{_listing(adapter_slots, 2) or 'nothing'})")
    missing = set(adapter_slots) - set(tensors)
    if missing:
        raise AdapterError(f"{weights_path}: {len(missing)} tensor(s) of the adapter are missing, e.g. "
                           f"{_listing(missing)}")
    slots = {name: adapter_slots.get(name) or base_slots[name] for name in tensors}
    for name, slot in sorted(slots.items()):
        got = tuple(tensors[name].shape)
        if got != slot.hf_shape:
            raise AdapterError(f"{weights_path}: tensor {name!r} has shape {got}, expected {slot.hf_shape} for this "
                               "model; the adapter was made for another base model")

    filled: dict[Path, np.ndarray] = {}
    for name, slot in slots.items():
        if slot.leaf_path not in filled:
            filled[slot.leaf_path] = np.array(jax.device_get(nn.meta.unbox(flat[slot.leaf_path])))
        target = filled[slot.leaf_path]
        target[slot.index] = slot.from_hf(tensors[name]).astype(target.dtype)
    for path, value in filled.items():
        leaf = flat[path]
        array = jnp.asarray(value)
        flat[path] = leaf.replace_boxed(array) if isinstance(leaf, nn.meta.AxisMetadata) else array
    params = unflatten_like(flat, built["params"])
    new_variables = {**built, "params": params} if isinstance(built, dict) else built.copy({"params": params})
    return new_variables, config
