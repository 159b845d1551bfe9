"""(IA)^3: learned vectors that rescale a layer's output, or the input of feedforward layers (Liu et al., 2022).

Leaves kept in an adapted layer's parameters, for adapter ``name``:

- ``ia3_l/<name>``: float32, shaped to broadcast against the layer's kernel: ``(*stack, 1 per input axis,
  *output axes)`` scales the output (bias included), ``(*stack, *input axes, 1 per output axis)`` scales the input
  of a module in ``feedforward_modules``. For a Dense kernel ``[in, out]`` that is ``[1, out]`` or ``[in, 1]``:
  the transpose of HF PEFT's ``ia3_l`` (``[out, 1]`` or ``[1, in]`` for torch's ``[out, in]`` weight). Which axes
  are 1 says which side is scaled, so the forward pass and merge need no other record of it.
- ``ia3_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects and 0
  for the others (whose scaling stays exactly 1). A constant, never trained.

Adapts Dense, DenseGeneral, Conv and Einsum layers, like HF PEFT's Linear, Conv1D and Conv layers, and any module
that multiplies its own parameters with an input: ``ia3_l`` then follows each such parameter (kept under
``own_params/<parameter>``, shaped like it with 1 along the axes it does not scale) and scales the output of each
of its contractions, or their input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _contractions, _layouts
from jaxpeft._tracing import Layer, Trace, layer_kind, own_matrices
from jaxpeft.config import PeftConfig, check, strict_options
from jaxpeft.core import AdapterError, OwnParamCalls, own_param_leaves, resolve_layers
from jaxpeft.method import Method, register

Path = tuple[str, ...]
KINDS = ("dense", "dense_general", "conv", "einsum", "param")


# HF PEFT's per-architecture defaults: model type -> (target_modules, feedforward_modules).
DEFAULT_TARGETS = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["q_lin", "v_lin", "lin2"], ["lin2"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@strict_options
@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)^3 options, with HF PEFT's names and defaults.

    Attributes:
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"``. Required: the per-architecture defaults of HF PEFT are not applied.
        exclude_modules: the same forms, for modules to leave alone.
        feedforward_modules: the targeted modules whose *input* is scaled instead of their output (a list of
            name suffixes, matched with ``str.endswith`` as HF PEFT does, or a full-match regex). As lists, they
            must be a subset of ``target_modules``. None: no feedforward modules.
        fan_in_fan_out: accepted for HF compatibility; Flax kernels are always ``[in, out]``, so it changes nothing.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        init_ia3_weights: True (ones: the model starts unchanged) or False (standard normal: for tests).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])  # layers named layers_0, layers_2
        >>> x = jnp.ones((1, 4))
        >>> config = jaxpeft.IA3Config(target_modules=["layers_0", "layers_2"], feedforward_modules=["layers_2"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> [variables["params"][name]["ia3_l"]["default"].shape for name in ("layers_0", "layers_2")]
        [(1, 8), (8, 1)]
        >>> adapted = jaxpeft.rewrite(model.apply, config)
        >>> bool(jnp.array_equal(adapted(variables, x), model.apply(variables, x)))  # ones: unchanged at first
        True
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    feedforward_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: Sequence[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.init_ia3_weights, bool),
              f"init_ia3_weights must be True or False, got init_ia3_weights={self.init_ia3_weights!r}")
        for name in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                value = list(value)
                check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
                setattr(self, name, value)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            check(not extra, f"feedforward_modules must be a subset of target_modules; {extra} are not targeted")

    def is_feedforward(self, name: str) -> bool:
        """Whether the module at dotted path ``name`` has its input scaled (HF PEFT's matching rule)."""
        patterns = self.feedforward_modules
        if patterns is None:
            return False
        if isinstance(patterns, str):
            return re.fullmatch(patterns, name) is not None
        return any(name.endswith(p) for p in patterns)


# ----- which kernel axes and which activation axes are scaled -----

def _einsum_specs(layer_name: str, module: nn.Einsum) -> tuple[str, str, str]:
    spec = (module.einsum_str or "").replace(" ", "")
    if "->" not in spec or "..." in spec:
        raise AdapterError(f"IA3 needs Einsum {layer_name} to have an explicit einsum_str without '...' in its "
                           "constructor; exclude the layer")
    inputs, out_spec = spec.split("->")
    x_spec, kernel_spec = inputs.split(",")
    return x_spec, kernel_spec, out_spec


def _kernel_axes(kind: str, module: nn.Module, kernel_ndim: int, layer_name: str) -> tuple[tuple, tuple]:
    """(input axes, output axes) of the kernel, as positions."""
    if kind == "dense":
        return (0,), (1,)
    if kind == "dense_general":
        if tuple(module.batch_dims):
            raise AdapterError(f"IA3 cannot adapt DenseGeneral {layer_name} with batch_dims; exclude the layer")
        n_in = len(module.axis) if isinstance(module.axis, Sequence) else 1
        return tuple(range(n_in)), tuple(range(n_in, kernel_ndim))
    if kind == "conv":
        return (kernel_ndim - 2,), (kernel_ndim - 1,)
    x_spec, kernel_spec, out_spec = _einsum_specs(layer_name, module)
    in_letters = "".join(c for c in kernel_spec if c in x_spec and c not in out_spec)
    out_letters = "".join(c for c in out_spec if c in kernel_spec)
    if kernel_spec != in_letters + out_letters or not in_letters or not out_letters:
        raise AdapterError(f"IA3 cannot adapt Einsum {layer_name} ({module.einsum_str!r}): its kernel axes must be "
                           "the contracted ones followed by the output ones, in output order (e.g. 'btd,dnh->btnh')")
    in_axes, out_axes = tuple(range(len(in_letters))), tuple(range(len(in_letters), kernel_ndim))
    return in_axes, out_axes


def _activation_axes(kind: str, module: nn.Module, ndim: int, kernel_axes: tuple, scales_input: bool) -> tuple:
    """Positions, in the layer's input (``scales_input``) or output, of the given kernel axes, in the same order."""
    if kind == "einsum":
        x_spec, kernel_spec, out_spec = _einsum_specs(".".join(module.path), module)
        spec = x_spec if scales_input else out_spec
        return tuple(spec.index(kernel_spec[k]) for k in kernel_axes)
    if kind == "dense_general" and scales_input:
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        return tuple(a % ndim for a in axis)
    return tuple(range(ndim - len(kernel_axes), ndim))


def _broadcast_shape(kernel_shape: tuple, scaled_axes: tuple) -> tuple:
    return tuple(size if i in scaled_axes else 1 for i, size in enumerate(kernel_shape))


def _to_activation(vector: jax.Array, kernel_axes: tuple, activation_axes: tuple, ndim: int) -> jax.Array:
    """The per-layer ``ia3_l`` (kernel layout) rearranged to broadcast against an activation of rank ``ndim``."""
    sizes = tuple(vector.shape[k] for k in kernel_axes)
    order = sorted(range(len(activation_axes)), key=lambda i: activation_axes[i])
    moved = vector.reshape(sizes).transpose(order)
    shape = [1] * ndim
    for i in order:
        shape[activation_axes[i]] = sizes[i]
    return moved.reshape(shape)


# ----- create -----

def _create_layer(key: jax.Array, config: IA3Config, layer: Layer, dtype: Any) -> dict[str, jax.Array]:
    feedforward = {config.is_feedforward(name) for name in layer.virtual_paths.values()}
    if len(feedforward) > 1:
        raise AdapterError(f"feedforward_modules makes some of the stacked layers {layer.name} feedforward and others "
                           "not; a scanned stack needs one kind (or load the model without scanned layers)")
    scales_input = feedforward.pop()
    if layer.kind == "param":
        in_axes = tuple(i for i, role in enumerate(layer.roles) if role == "in")
        out_axes = tuple(i for i, role in enumerate(layer.roles) if role != "in")
    else:
        in_axes, out_axes = _kernel_axes(layer.kind, layer.module, len(layer.kernel_shape), layer.name)
    if scales_input and layer.kind == "conv" and layer.module.feature_group_count != 1:
        raise AdapterError(f"IA3 cannot scale the input of grouped Conv {layer.name}; leave it out of "
                           "feedforward_modules")
    shape = _broadcast_shape(layer.kernel_shape, in_axes if scales_input else out_axes)
    if scales_input and shape == _broadcast_shape(layer.kernel_shape, out_axes):
        raise AdapterError(f"IA3 cannot scale the input of {layer.name}: its input and output both have size 1")
    stacked = layer.stack_shape + shape
    if config.init_ia3_weights:
        vector = jnp.ones(stacked, dtype)
    else:
        vector = jax.random.normal(key, stacked, dtype)
    active = np.zeros(layer.stack_shape, np.float32)
    for index in layer.virtual_paths:
        active[index] = 1.0
    return {"ia3_l": vector, "ia3_active": jnp.asarray(active)}


def create(key: jax.Array, config: IA3Config, trace: Trace, dtype: Any) -> dict[tuple[tuple[str, ...], str], Any]:
    """IA3 leaves for every layer ``config`` targets in the traced model."""
    layers = resolve_layers(config, trace, KINDS, method_name="IA3")
    leaves = {}
    for i, (path, layer) in enumerate(sorted(layers.items())):
        for leaf_key, value in _create_layer(jax.random.fold_in(key, i), config, layer, dtype).items():
            leaves[(path, leaf_key)] = value
    return leaves


# ----- forward -----

def _effective(vector: jax.Array, active: jax.Array) -> jax.Array:
    """``ia3_l`` where the layer is adapted, 1 elsewhere (no gradient reaches the others)."""
    active = active.reshape(active.shape + (1,) * (vector.ndim - active.ndim))
    return jnp.where(active > 0, vector, 1.0)


def _scaled_contraction(vector: jax.Array, contraction: _contractions.Contraction, invals: list) -> jax.Array:
    """A contraction of a parameter with ``ia3_l`` (shaped like the parameter, 1 along the axes it does not scale):
    its output scaled, or its input when the vector runs along the contracted axes."""
    roles = contraction.roles
    scales_output = all(size == 1 for axis, size in enumerate(vector.shape) if roles.get(axis) == "in")
    if scales_output:
        out = _contractions.bind(contraction.eqn, invals)[0]
        return out * _contractions.output_scale(contraction, vector, out.ndim).astype(out.dtype)
    invals = list(invals)
    x = invals[1 - contraction.weight]
    invals[1 - contraction.weight] = x * _contractions.input_scale(contraction, vector, x.ndim).astype(x.dtype)
    return _contractions.bind(contraction.eqn, invals)[0]


def _through_own_params(next_fun, args, kwargs, module: nn.Module, adapter_name: str):
    """A call of a module that holds the adapter on its own parameters, run through its jaxpr, each contraction of
    such a parameter scaled by its ``ia3_l``."""
    vectors = {name: _effective(leaves["ia3_l"], leaves["ia3_active"])
               for name, leaves in own_param_leaves(module, adapter_name, ("ia3_l", "ia3_active")).items()}

    def scale(contraction, invals):
        vector = vectors.get(contraction.view.param)
        return None if vector is None else _scaled_contraction(vector, contraction, invals)

    return _contractions.call_through(next_fun, args, kwargs, own_matrices(module), scale)


def interceptor(config: IA3Config, adapter_name: str, dropout: bool):
    """Scales each adapted layer's output by ``ia3_l``, or a feedforward layer's input."""
    del config, dropout
    own_param_calls = OwnParamCalls()

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "setup" and module.scope is not None and own_param_leaves(
                module, adapter_name, ("ia3_l",)):
            return own_param_calls(module, next_fun, args, kwargs,
                                   lambda: _through_own_params(next_fun, args, kwargs, module, adapter_name))
        kind = layer_kind(module)
        if kind not in KINDS or context.method_name != "__call__" or not module.has_variable("params", "ia3_l"):
            return next_fun(*args, **kwargs)
        by_name = module.get_variable("params", "ia3_l")
        if adapter_name not in by_name:
            return next_fun(*args, **kwargs)
        active = nn.meta.unbox(module.get_variable("params", "ia3_active")[adapter_name])
        vector = _effective(nn.meta.unbox(by_name[adapter_name]), active)
        kernel_shape = tuple(nn.meta.unbox(module.get_variable("params", "kernel")).shape)
        name = ".".join(module.path)
        in_axes, out_axes = _kernel_axes(kind, module, len(kernel_shape), name)
        if vector.shape == _broadcast_shape(kernel_shape, out_axes):
            out = next_fun(*args, **kwargs)
            scale = _to_activation(vector, out_axes, _activation_axes(kind, module, out.ndim, out_axes, False),
                                   out.ndim)
            return out * scale.astype(out.dtype)
        if vector.shape != _broadcast_shape(kernel_shape, in_axes):
            raise AdapterError(f"adapter {adapter_name!r} at {name} has ia3_l {vector.shape}, which fits neither side "
                               f"of the layer's kernel {kernel_shape}: the adapter was made for another model")
        args = list(args) if args else [kwargs.pop(next(iter(kwargs)))]
        x = args[0]
        scale = _to_activation(vector, in_axes, _activation_axes(kind, module, x.ndim, in_axes, True), x.ndim)
        args[0] = x * scale.astype(x.dtype)
        return next_fun(*args, **kwargs)

    return adapt


# ----- merge -----

def merge_layer(config: IA3Config, layer_params: dict, leaves: dict, sign: float) -> dict:
    """The kernel (and, for output scaling, the bias) multiplied by ``ia3_l`` (``sign=1``) or divided (``-1``).

    Computed in float32. Unmerging divides, so it is exact only up to rounding, and impossible where ``ia3_l`` is 0.
    """
    del config
    kernel_name = "kernel" if "kernel" in layer_params else next(iter(layer_params))  # a layer, or one parameter
    kernel = layer_params[kernel_name]
    kernel_value = nn.meta.unbox(kernel)
    active = jnp.asarray(nn.meta.unbox(leaves["ia3_active"]))
    vector = _effective(jnp.asarray(nn.meta.unbox(leaves["ia3_l"]), jnp.float32), active)
    fits = vector.ndim == kernel_value.ndim and all(
        v in (1, k) for v, k in zip(vector.shape, kernel_value.shape, strict=True))
    if not fits:
        raise AdapterError(f"ia3_l {vector.shape} does not fit the layer's kernel {kernel_value.shape}")
    factor = vector if sign > 0 else 1.0 / vector
    merged = {kernel_name: _rebox(kernel, kernel_value.astype(jnp.float32) * factor)}
    if "bias" in layer_params and kernel_name == "kernel":
        # The bias has the shape of the kernel's output axes, which come last; output scaling is 1 on the others.
        bias = layer_params["bias"]
        bias_value = nn.meta.unbox(bias)
        stack = active.ndim
        bias_shape = bias_value.shape[stack:]
        n_in = kernel_value.ndim - stack - len(bias_shape)
        if vector.shape[stack:] == (1,) * n_in + bias_shape:
            merged["bias"] = _rebox(bias, bias_value.astype(jnp.float32) * factor.reshape(bias_value.shape))
    return merged


def _rebox(original: Any, value: jax.Array) -> Any:
    value = value.astype(nn.meta.unbox(original).dtype)
    return original.replace_boxed(value) if isinstance(original, nn.meta.AxisMetadata) else value


def task_defaults(config: IA3Config, model) -> dict[str, Any]:
    """HF PEFT's targets (and feedforward modules) for the model's architecture when the config names none."""
    model_type = model.config.model_type
    if config.target_modules is not None or model_type not in DEFAULT_TARGETS:
        return {}
    targets, feedforward = DEFAULT_TARGETS[model_type]
    return {"target_modules": targets} | ({"feedforward_modules": feedforward}
                                         if config.feedforward_modules is None else {})


def torch_tensors(config: Any, layer: Layer, name: str, shapes: dict[Path, tuple[int, ...]]) -> dict:
    shape = shapes[("ia3_l",)]
    size = math.prod(shape)
    if layer.kind == "conv":
        hf_shape = (1, size) + (1,) * (len(shape) - 2)
    else:
        hf_shape = (1, size) if config.is_feedforward(name) else (size, 1)
    return {"ia3_l": (("ia3_l",), _layouts.reshape_layout(shape, hf_shape))}


METHOD = register(Method(
    config_class=IA3Config, leaf_keys=("ia3_l", "ia3_active"), constant_keys=("ia3_active",), create=create,
    interceptor=interceptor, merge_layer=merge_layer, task_defaults=task_defaults, torch_tensors=torch_tensors,
    leaf_layouts={"ia3_l": ("kernel",), "ia3_active": ("stack",)}))
