"""Auto classes: load a Hugging Face checkpoint into the jaxpeft family that serves its ``model_type``.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    >>> model = AutoModelForCausalLM.from_config(config, seed=0)
    >>> model(input_ids=[[1, 2, 3]]).logits.shape
    (1, 3, 100)
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxpeft import quantization
from jaxpeft.models import attention_kernels, bnb, hub
from jaxpeft.models.family import HEADS, ModelFamily, ModelOutput

logger = logging.getLogger("jaxpeft")

# model_type -> family file, so that loading one family imports only its file.
_FAMILY_FILE_OF_TYPE = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "qwen3_moe": "moe",
    "mixtral": "moe",
    "bert": "bert",
    "roberta": "roberta",
    "distilbert": "distilbert",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}
_FAMILY_FILES = ("gpt2", "llama", "bert", "roberta", "distilbert", "gemma", "moe")
_REGISTERED: dict[str, ModelFamily] = {}

_TRANSFORMERS_HEAD_MAPPINGS = {
    "base": "MODEL_MAPPING_NAMES",
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq_cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_cls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def register_family(family: ModelFamily) -> None:
    """Serves ``family.model_types`` with ``family`` (for families defined outside jaxpeft.models)."""
    for model_type in family.model_types:
        _REGISTERED[model_type] = family


def _import_family(file_name: str) -> ModelFamily | None:
    module_name = f"jaxpeft.models.{file_name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:  # that family file is not written yet
            return None
        raise
    return getattr(module, "FAMILY", None)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values some available family serves."""
    types = set(_REGISTERED)
    for file_name in _FAMILY_FILES:
        family = _import_family(file_name)
        if family is not None:
            types.update(family.model_types)
    return sorted(types)


def family_for(model_type: str) -> ModelFamily:
    """The family serving ``model_type``; a one-line error listing the supported types otherwise."""
    if model_type in _REGISTERED:
        return _REGISTERED[model_type]
    candidates = [_FAMILY_FILE_OF_TYPE[model_type]] if model_type in _FAMILY_FILE_OF_TYPE else []
    for file_name in candidates + [f for f in _FAMILY_FILES if f not in candidates]:
        family = _import_family(file_name)
        if family is not None and model_type in family.model_types:
            return family
    raise ValueError(f"Unsupported model type {model_type!r}; jaxpeft supports: {', '.join(supported_model_types())}.")


def as_dtype(dtype: Any) -> jnp.dtype:
    """``jnp.dtype`` from a dtype or its name (``"bfloat16"``, ``"float32"``)."""
    try:
        return jnp.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or jnp.float16.") from error


def _call_parameters(module: nn.Module) -> set[str]:
    return set(inspect.signature(type(module).__call__).parameters) - {"self"}


def _as_output(output: Any, head: str) -> Any:
    """The module's output object as is when it has ``logits``/``last_hidden_state``, else a ``ModelOutput``."""
    if hasattr(output, "logits") or hasattr(output, "last_hidden_state"):
        return output
    if isinstance(output, Mapping):
        return ModelOutput(**output)
    if head == "base":
        return ModelOutput(last_hidden_state=output)
    return ModelOutput(logits=output)


def _init_inputs(module: nn.Module) -> dict:
    accepted = _call_parameters(module)
    inputs = {"input_ids": jnp.zeros((1, 4), jnp.int32)}
    if "attention_mask" in accepted:
        inputs["attention_mask"] = jnp.ones((1, 4), jnp.int32)
    if "deterministic" in accepted:
        inputs["deterministic"] = True
    return inputs


def _as_int_array(value: Any, name: str) -> jax.Array:
    array = np.asarray(value) if not isinstance(value, jax.Array) else value
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, sequence), got shape {tuple(array.shape)}; add a batch axis.")
    return jnp.asarray(array, dtype=jnp.int32)


def _from_config(value: Any) -> bool:
    return isinstance(value, str) and value == "config"


def _hf_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _build_module(
    config, head: str, dtype, param_dtype, scan_layers: bool, remat_policy: str | None,
    attention_implementation: str | None = None,
):
    family = family_for(config.model_type)
    attention_kernels.check_implementation(attention_implementation)
    if head not in family.modules:
        raise ValueError(
            f"The {config.model_type!r} family has no {head!r} head; it has {sorted(family.modules)} "
            f"(heads: {', '.join(HEADS)})."
        )
    module = family.modules[head](
        config=config,
        dtype=as_dtype(dtype),
        param_dtype=as_dtype(param_dtype),
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        attention_implementation=attention_implementation,
    )
    return family, module


def _init_selected(module: nn.Module, paths: list[tuple], seed: int) -> dict:
    """Initialises only the parameters at ``paths`` (XLA drops the rest of the init)."""
    inputs = _init_inputs(module)

    def init(rng):
        flat = flatten_dict(nn.unbox(module.init(rng, **inputs))["params"])
        return {path: flat[path] for path in paths}

    return jax.jit(init)(jax.random.key(seed))


def _is_optional(path: tuple, loaded_top_level: set, family: ModelFamily) -> bool:
    if path[0] not in loaded_top_level:
        return True
    joined = "/".join(str(part) for part in path)
    return any(joined == prefix or joined.startswith(prefix + "/") for prefix in family.optional_params)


def _hf_shapes(family, config, head: str, scan_layers: bool, shapes: dict) -> dict[str, tuple] | None:
    """Hugging Face tensor name -> shape for parameter paths of the given shapes (``None`` if not mappable)."""
    # Zero-stride placeholders give the names without allocating the weights.
    placeholders = {p: np.broadcast_to(np.zeros((), np.float32), shape) for p, shape in shapes.items()}
    try:
        tensors = family.params_to_hf({"params": unflatten_dict(placeholders)}, config, head, scan_layers)
    except Exception:  # noqa: BLE001 - a family's converter may need the full tree; parameter paths still help
        return None
    return {name: tuple(np.shape(array)) for name, array in tensors.items()}


def _find(tensors: Mapping, name: str) -> str | None:
    """``name`` as the checkpoint spells it: with or without the base model prefix (``transformer.``)."""
    if name in tensors:
        return name
    short = name.partition(".")[2]
    return short if short in tensors else None


def _describe_problems(family, config, head, scan_layers, tensors, missing, unexpected, misshaped) -> list[str]:
    """Messages naming the Hugging Face tensors behind problem parameters (parameter paths as a fallback)."""
    problems = []
    if missing:
        view = _hf_shapes(family, config, head, scan_layers, missing)
        names = sorted(n for n in view if _find(tensors, n) is None) if view else []
        problems.append(f"missing {names or sorted(_hf_name(p) for p in missing)}")
    if unexpected:
        problems.append(f"unexpected {sorted(unexpected)}")
    if misshaped:
        view = _hf_shapes(family, config, head, scan_layers, {p: shape for p, (_, shape) in misshaped.items()})
        found = [(n, _find(tensors, n), shape) for n, shape in (view or {}).items()]
        names = sorted(
            f"{actual}: got {tuple(tensors[actual].shape)}, expected {shape}"
            for _, actual, shape in found
            if actual is not None and tuple(tensors[actual].shape) != shape
        )
        fallback = sorted(f"{_hf_name(p)}: got {got}, expected {want}" for p, (got, want) in misshaped.items())
        problems.append(f"mis-shaped {names or fallback}")
    return problems


def assemble_params(
    module: nn.Module,
    family: ModelFamily,
    tensors: Mapping[str, np.ndarray],
    config: Any,
    head: str,
    scan_layers: bool,
    param_dtype,
    seed: int = 0,
    source: str = "the checkpoint",
) -> dict:
    """Builds the module's variables from Hugging Face ``tensors``, checking names and shapes.

    New head weights that the checkpoint lacks are initialised and reported (as transformers does); any other
    missing, unexpected or mis-shaped tensor raises a ``ValueError`` that lists them.
    """
    abstract = nn.unbox(jax.eval_shape(lambda rng: module.init(rng, **_init_inputs(module)), jax.random.key(0)))
    expected = flatten_dict(abstract["params"])
    loaded_params, unused = family.params_from_hf(tensors, config, head, scan_layers)
    loaded = flatten_dict(loaded_params.get("params", {}))

    ignore = [re.compile(pattern) for pattern in family.ignore_unexpected]
    ignored = [name for name in unused if any(p.search(name) for p in ignore)]
    unexpected = set(unused) - set(ignored)
    extra = {p: tuple(v.shape) for p, v in loaded.items() if p not in expected}
    if extra:
        view = _hf_shapes(family, config, head, scan_layers, extra)
        unexpected |= {_find(tensors, n) or n for n in view} if view else {_hf_name(p) for p in extra}
    top_level = {path[0] for path in loaded}
    missing = [p for p in expected if p not in loaded]
    new_paths = [p for p in missing if _is_optional(p, top_level, family)]
    misshaped = {
        p: (tuple(loaded[p].shape), tuple(expected[p].shape))
        for p in loaded
        if p in expected and tuple(loaded[p].shape) != tuple(expected[p].shape)
    }
    required = {p: tuple(expected[p].shape) for p in missing if p not in new_paths}
    problems = _describe_problems(family, config, head, scan_layers, tensors, required, unexpected, misshaped)
    if problems:
        raise ValueError(
            f"{source} does not fit {type(module).__name__} ({config.model_type}): {'; '.join(problems)}. "
            "Check that the checkpoint matches its config.json (and any config overrides)."
        )
    if ignored:
        logger.info("Ignored tensors of %s not used by %s: %s", source, type(module).__name__, sorted(ignored))

    params = {p: _as_param(loaded[p], param_dtype) for p in expected if p in loaded}
    if new_paths:
        logger.warning(
            "Some weights of %s were not initialized from %s and are newly initialized: %s. "
            "You should probably train this model on a down-stream task.",
            type(module).__name__,
            source,
            sorted(_hf_name(p) for p in new_paths),
        )
        params.update({p: v.astype(param_dtype) for p, v in _init_selected(module, new_paths, seed).items()})
    return {"params": unflatten_dict(params)}


def _as_param(value: Any, param_dtype) -> Any:
    if quantization.is_quantized(value):
        return jax.device_put(value)
    return jnp.asarray(value, dtype=param_dtype)


def _quantizing(qconfig: quantization.QuantizationConfig | None, param_dtype):
    """The leaf conversion that quantizes a loaded weight as ``qconfig`` selects it (None: no conversion)."""
    if qconfig is None:
        return None
    if qconfig.compute_dtype is None:
        qconfig = dataclasses.replace(qconfig, compute_dtype=jnp.dtype(param_dtype).name)
    def convert(path: tuple, value: Any) -> Any:
        if quantization.is_quantized(value):  # kept in a file's own format (GGUF): dequantized to the compute dtype
            return value.replace(dtype_name=qconfig.compute_dtype)
        if not quantization.selects(qconfig, path, np.shape(value)):
            return value
        return quantization.quantize_array_jit(jnp.asarray(value, dtype=param_dtype), qconfig)

    return convert


def _as_quantization_config(value: Any) -> quantization.QuantizationConfig | None:
    if value is None or isinstance(value, quantization.QuantizationConfig):
        return value
    if isinstance(value, str):
        return quantization.QuantizationConfig(value)
    if isinstance(value, Mapping):
        return quantization.QuantizationConfig(**value)
    raise ValueError(f"quantization_config must be a jaxpeft.QuantizationConfig, a dict of its fields or a quant "
                     f"type such as 'nf4', got {type(value).__name__}")


def load_pretrained(
    head: str,
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    scan_layers: bool = False,
    remat_policy: str | None = None,
    attention_implementation: str | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    quantization_config: Any = None,
    **config_overrides: Any,
) -> PretrainedModel:
    """Loads ``name_or_path`` (folder, hub id, or ``.gguf`` file) with the ``head`` module of its family.

    ``param_dtype`` (default float32) is the dtype of the float parameters. With ``quantization_config`` the
    selected weights are quantized as they are read, one tensor at a time. A folder saved by transformers with
    bitsandbytes (4-bit or 8-bit) loads quantized as stored (``jaxpeft.models.bnb``); its 4-bit weights dequantize
    to its ``bnb_4bit_compute_dtype`` unless ``param_dtype`` is given. ``model.quantization_config`` says how.
    """
    qconfig = _as_quantization_config(quantization_config)
    requested_dtype, param_dtype = param_dtype, jnp.float32 if param_dtype is None else param_dtype
    bnb_config = None
    path = os.fspath(name_or_path)
    if gguf_file is not None:
        path = os.path.join(_resolve_folder_for_gguf(path, revision), gguf_file)
    if path.endswith(".gguf"):
        from jaxpeft.models import gguf

        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file.")
        config, tensors = gguf.read_gguf_checkpoint(path, keep_quantized=qconfig is not None, **config_overrides)
        family, module = _build_module(config, head, dtype, param_dtype, scan_layers, remat_policy,
                                       attention_implementation)
    else:
        folder = hub.resolve_checkpoint(path, revision)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"No config.json in {folder!r}; pass a folder written by save_pretrained.")
        config = transformers.AutoConfig.from_pretrained(folder, **config_overrides)
        family, module = _build_module(config, head, dtype, param_dtype, scan_layers, remat_policy,
                                       attention_implementation)
        tensors = hub.read_checkpoint_tensors(folder, lazy=True)
        bnb_config = bnb.checkpoint_quantization(config)
        if bnb_config is not None:
            tensors, qconfig = _prequantized(tensors, bnb_config, requested_dtype, qconfig, path), None
    source = path
    config.name_or_path = path  # as given (a hub id stays one): what an adapter's base_model_name_or_path names
    with hub.converting(_quantizing(qconfig, as_dtype(param_dtype))):
        params = assemble_params(module, family, tensors, config, head, scan_layers, as_dtype(param_dtype), seed,
                                 source)
    if qconfig is not None:  # families that do not place tensors through hub: quantized once assembled
        qconfig = dataclasses.replace(qconfig, compute_dtype=qconfig.compute_dtype or as_dtype(param_dtype).name)
        params = quantization.quantize(params, qconfig)
    if bnb_config is not None:
        qconfig = bnb.loaded_quantization_config(bnb_config, params)
    return PretrainedModel(module, params, config, family, head, quantization_config=qconfig)


def _prequantized(tensors: Mapping, bnb_config: Mapping, requested_dtype: Any, qconfig: Any, path: str) -> Mapping:
    """The tensors of a bitsandbytes checkpoint with its quantized weights as ``QuantizedArray``."""
    if qconfig is not None:
        logger.warning("%s is already quantized with bitsandbytes; quantization_config=%s is ignored", path,
                       quantization.describe(qconfig))
    four_bit = bnb.to_quantization_config(bnb_config).compute_dtype
    requested = None if requested_dtype is None else as_dtype(requested_dtype).name
    return bnb.BnbTensors(tensors, requested or four_bit or "float32", requested or "float32")


def _resolve_folder_for_gguf(path: str, revision: str | None) -> str:
    if os.path.isdir(path):
        return path
    return hub.resolve_checkpoint(path, revision)


def build_from_config(
    head: str,
    config: Any,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat_policy: str | None = None,
    attention_implementation: str | None = None,
) -> PretrainedModel:
    """A randomly initialised model of ``config`` with the ``head`` module."""
    if not isinstance(config, transformers.PretrainedConfig):
        raise ValueError(f"config must be a transformers PretrainedConfig, got {type(config).__name__}.")
    family, module = _build_module(config, head, dtype, param_dtype, scan_layers, remat_policy,
                                   attention_implementation)
    inputs = _init_inputs(module)
    params = jax.jit(lambda rng: nn.unbox(module.init(rng, **inputs)))(jax.random.key(seed))
    return PretrainedModel(module, {"params": params["params"]}, config, family, head)


class PretrainedModel:
    """A linen module with its parameters and transformers config, callable like a transformers model.

    Attributes:
        module: the linen module (``module.apply(model.params, input_ids, ...)``).
        params: the unboxed variables ``{"params": ...}``.
        config: the ``transformers`` config.
        family: the ``ModelFamily`` that built it; ``head`` one of ``"base"``, ``"causal_lm"``, ``"seq_cls"``,
            ``"token_cls"``.

    Example:
        >>> import transformers
        >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> model(input_ids=[[1, 2, 3]], attention_mask=[[1, 1, 1]]).logits.shape
        (1, 3, 100)
    """

    def __init__(self, module: nn.Module, params: dict, config: Any, family: ModelFamily, head: str,
                 quantization_config: quantization.QuantizationConfig | None = None):
        self.module = module
        self.quantization_config = quantization_config
        self.params = params
        self.config = config
        self.family = family
        self.head = head
        self.apply_fn = module.apply
        self._accepted = _call_parameters(module)
        self._forward = jax.jit(self._forward_impl, static_argnames=("train",))

    def _forward_impl(self, params, inputs, dropout_rng, train):
        kwargs = dict(inputs)
        if "deterministic" in self._accepted:
            kwargs["deterministic"] = not train
        rngs = {"dropout": dropout_rng} if train else None
        return _as_output(self.apply_fn(params, **kwargs, rngs=rngs), self.head)

    def __call__(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        *,
        params: dict | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        **inputs: Any,
    ) -> ModelOutput:
        """Runs the model (jitted; one trace per input shape) on what a transformers tokenizer returns.

        Args:
            input_ids: ``(batch, seq)`` token ids (numpy, jax or nested lists).
            attention_mask: ``(batch, seq)``, 1 for real tokens and 0 for padding.
            params: variables to use instead of ``self.params`` (e.g. a fine-tuned copy).
            train: apply dropout; needs ``dropout_rng``.
            **inputs: other inputs the module takes (``token_type_ids``, ``position_ids``, ``prefix_key_values``).
        """
        if input_ids is None:
            raise ValueError("input_ids is required, e.g. model(**tokenizer(texts, return_tensors='np')).")
        if train and dropout_rng is None:
            raise ValueError("train=True needs dropout_rng=jax.random.key(...) for dropout.")
        unknown = sorted(set(inputs) - self._accepted)
        if unknown:
            accepted = sorted(self._accepted - {"deterministic", "input_ids"})
            raise ValueError(f"{type(self.module).__name__} does not take {unknown}; it takes {accepted}.")
        batch = {"input_ids": _as_int_array(input_ids, "input_ids")}
        if attention_mask is not None:
            batch["attention_mask"] = _as_int_array(attention_mask, "attention_mask")
        for name, value in inputs.items():
            if value is None:
                continue
            batch[name] = _as_int_array(value, name) if name in ("token_type_ids", "position_ids") else value
        return self._forward(self.params if params is None else params, batch, dropout_rng, train)

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        params: dict | None = None,
        eos_token_id: Any = "config",
        pad_token_id: Any = "config",
        **kwargs: Any,
    ) -> np.ndarray:
        """Generates tokens; see ``jaxpeft.models.generation.generate`` for the arguments.

        ``eos_token_id`` and ``pad_token_id`` default to the config's; pass ``eos_token_id=None`` to never stop
        early (as in transformers 5).

        Example:
            >>> import transformers
            >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
            ...     vocab_size=50, eos_token_id=0))
            >>> model.generate([[1, 2]], max_new_tokens=3, eos_token_id=None).shape
            (1, 5)
        """
        from jaxpeft.models import generation

        if self.head != "causal_lm":
            raise ValueError(f"generate needs a causal LM; this model has the {self.head!r} head.")
        defaults = generation.token_defaults(self.config)
        return generation.generate(
            self.apply_fn,
            self.params if params is None else params,
            self.module.cache_spec(),
            input_ids,
            attention_mask,
            eos_token_id=defaults["eos_token_id"] if _from_config(eos_token_id) else eos_token_id,
            pad_token_id=defaults["pad_token_id"] if _from_config(pad_token_id) else pad_token_id,
            max_positions=getattr(self.config, "max_position_embeddings", None),
            **kwargs,
        )

    def abstract_variables(self) -> dict:
        """The boxed (``nn.Partitioned``) variables as ``jax.ShapeDtypeStruct``, without computing anything."""
        inputs = _init_inputs(self.module)
        return jax.eval_shape(lambda rng: self.module.init(rng, **inputs), jax.random.key(0))

    def logical_axes(self) -> dict:
        """``PartitionSpec`` tree of logical axis names (embed, mlp, heads, kv, vocab, layers) matching ``params``."""
        return nn.get_partition_spec(self.abstract_variables())

    def _float_linear_modules(self, scan_layers: bool) -> list[str] | None:
        """Hugging Face names of the modules whose ``kernel`` is not quantized (None when that is unknown)."""
        flat = flatten_dict(dict(self.params["params"]))
        shapes = {path: np.shape(leaf) for path, leaf in flat.items()
                  if path[-1] == "kernel" and not quantization.is_quantized(leaf)}
        names = _hf_shapes(self.family, self.config, self.head, scan_layers, shapes) if shapes else {}
        return None if names is None else [name.rpartition(".")[0] for name in names]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` that transformers' torch classes load.

        Quantized weights (nf4/fp4, with or without double quantization, and row-wise int8) are written in the
        bitsandbytes layout with its ``quantization_config``, which transformers with bitsandbytes loads; any other
        quantized weight is a one-line ``ValueError`` (save a float model: ``merge_and_unload()`` or
        ``quantization.dequantize_tree``).
        """
        from transformers.models.auto import modeling_auto

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        scan_layers = getattr(self.module, "scan_layers", False)
        tensors = self.family.params_to_hf(self.params, self.config, self.head, scan_layers)
        float_linear = self._float_linear_modules(scan_layers) if quantization.has_quantized(self.params) else None
        tensors, bnb_config = bnb.to_bnb_tensors(jax.device_get(tensors), float_linear)
        tensors = {name: np.asarray(array) for name, array in tensors.items()}
        config = copy.deepcopy(self.config)
        torch_class = getattr(modeling_auto, _TRANSFORMERS_HEAD_MAPPINGS[self.head]).get(config.model_type)
        if torch_class is not None:
            config.architectures = [torch_class]
        if bnb_config is not None:
            config.quantization_config = bnb_config
        elif hasattr(config, "quantization_config"):  # e.g. a quantized checkpoint's merged float model
            del config.quantization_config
        leaves = jax.tree_util.tree_leaves(self.params, is_leaf=quantization.is_quantized)
        floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
        if floats:
            config.dtype = str(jnp.dtype(floats[0].dtype))
        config.save_pretrained(folder)
        hub.write_safetensors(tensors, os.path.join(folder, hub.SAFETENSORS_FILE))


class _AutoHead:
    head = "base"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> PretrainedModel:
        """Loads a checkpoint folder, a hub id (cache first), or a ``.gguf`` file.

        Keyword arguments: ``dtype`` (compute), ``param_dtype``, ``scan_layers``, ``remat_policy``
        (None, "full", "dots", ...), ``attention_implementation`` (None: by backend; ``"xla"``, ``"xla_chunked"``,
        ``"cudnn"``, ``"splash"``: see ``jaxpeft.models.attention_kernels``), ``revision``, ``gguf_file``, ``seed``
        (for newly initialised heads), ``quantization_config`` (a ``jaxpeft.QuantizationConfig``: QLoRA's 4-bit
        base, quantized while loading); anything else overrides the config (``num_labels=3``).
        """
        return load_pretrained(cls.head, name_or_path, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> PretrainedModel:
        """A randomly initialised model; keywords ``seed``, ``dtype``, ``param_dtype``, ``scan_layers``,
        ``remat_policy``, ``attention_implementation``."""
        return build_from_config(cls.head, config, **kwargs)


class AutoModel(_AutoHead):
    """The base model (``.last_hidden_state``).

    Example:
        >>> import transformers
        >>> model = AutoModel.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
        >>> model(input_ids=[[1, 2]]).last_hidden_state.shape
        (1, 2, 16)
    """

    head = "base"


class AutoModelForCausalLM(_AutoHead):
    """A causal language model (``.logits`` over the vocabulary, ``.generate``).

    Example:
        >>> import transformers
        >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=50))
        >>> model.generate([[1, 2]], max_new_tokens=3).shape
        (1, 5)
    """

    head = "causal_lm"


class AutoModelForSequenceClassification(_AutoHead):
    """Sequence classification (``.logits`` of shape ``(batch, num_labels)``; decoders pool the last non-pad token).

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, num_labels=3)
        >>> AutoModelForSequenceClassification.from_config(config)(input_ids=[[1, 2]]).logits.shape
        (1, 3)
    """

    head = "seq_cls"


class AutoModelForTokenClassification(_AutoHead):
    """Token classification (``.logits`` of shape ``(batch, seq, num_labels)``), for the encoder families."""

    head = "token_cls"
