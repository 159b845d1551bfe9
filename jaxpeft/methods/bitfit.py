"""BitFit: train only the biases (Ben Zaken et al., 2021), without touching the base variables.

Each selected module gets a bias delta. Where the bias is added last (Dense, DenseGeneral, Conv and Einsum layers
and ``nn.LayerNorm``) the rewritten apply adds the delta to the module's output; any other module with its own
``bias`` parameter (a library's own layer, whatever it does with it) runs with ``bias + delta`` in place of its
bias. Either way this is exactly training the bias. Several BitFit adapters (and adapters of other methods) can live
in the same variables; ``merge`` adds the delta to the bias.

Leaves kept in a selected layer's parameters, for adapter ``name``:

- ``bitfit_bias/<name>``: float32 zeros, the shape of the layer's ``bias`` (stacked ``(*stack, ...)`` under
  ``nn.scan``);
- ``bitfit_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects and 0
  for the others (whose delta stays exactly 0). A constant, never trained.

HF PEFT has no BitFit method; ``peft_type`` is jaxpeft's own ``"BITFIT"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _contractions, _targets
from jaxpeft._tracing import Layer, Trace, layer_kind
from jaxpeft.config import PeftConfig, check, strict_options
from jaxpeft.core import AdapterError, OwnParamCalls
from jaxpeft.method import Method, register

Path = tuple[str, ...]
LAYER_KINDS = ("dense", "dense_general", "conv", "einsum")
NORM_TYPES = ("LayerNorm",)


@strict_options
@dataclasses.dataclass
class BitFitConfig(PeftConfig):
    """BitFit options.

    Attributes:
        target_modules: None (every module that has its own ``bias`` parameter), module names
            or dotted path suffixes (list), or a full-match regex on the dotted path (string), as in HF PEFT.
        exclude_modules: the same forms, for modules whose bias stays frozen.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])  # layers named layers_0, layers_2
        >>> x = jnp.ones((1, 4))
        >>> config = jaxpeft.BitFitConfig(target_modules=["layers_0"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> variables["params"]["layers_0"]["bitfit_bias"]["default"].shape
        (8,)
        >>> print(jaxpeft.count_parameters(variables, jaxpeft.trainable_mask(variables, config)))
        trainable params: 8 || all params: 66 || trainable%: 12.1212
    """

    peft_type: ClassVar[str] = "BITFIT"

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


# ----- create -----

def _targeted(config: BitFitConfig, name: str) -> bool:
    if _targets.matches(name, config.exclude_modules) or _targets.is_saved_module(name, config.modules_to_save):
        return False
    return config.target_modules is None or _targets.matches(name, config.target_modules)


def _layer_bias_shape(layer: Layer) -> tuple[int, ...] | None:
    """The (unstacked) bias shape of a Dense, DenseGeneral, Conv or Einsum layer, None when it has no bias."""
    module = layer.module
    if layer.kind not in LAYER_KINDS or not module.use_bias:
        return None
    if layer.kind == "einsum":
        spec = (module.einsum_str or "").replace(" ", "")
        if "->" not in spec:
            raise AdapterError(f"BitFit needs the einsum_str of Einsum {layer.name} in its constructor")
        x_spec_and_kernel, out_spec = spec.split("->")
        kernel_spec = x_spec_and_kernel.split(",")[1]
        return tuple(layer.kernel_shape[kernel_spec.index(c)] for c in out_spec if c in kernel_spec)
    features = module.features
    return tuple(features) if isinstance(features, Sequence) else (features,)


def _bias_shape(trace: Trace, path: Path) -> tuple[int, ...] | None:
    """The stacked shape of the bias of the module at ``path`` if BitFit can train it, else None."""
    layer = trace.layers.get(path)
    if layer is not None:
        shape = _layer_bias_shape(layer)
        return None if shape is None else layer.stack_shape + shape
    return trace.param_shapes.get(path + ("bias",))


def create(key: jax.Array, config: BitFitConfig, trace: Trace, dtype: Any) -> dict[tuple[Path, str], Any]:
    """BitFit leaves for every layer with a bias that ``config`` selects in the traced model."""
    del key
    leaves, passed_over = {}, []
    for path, virtual in sorted(trace.module_virtual_paths.items()):
        shape = _bias_shape(trace, path)
        hits = [index for index, name in virtual.items() if (path or shape) and _targeted(config, name)]
        if not hits:
            continue
        if shape is None:
            passed_over.append(f"{virtual[hits[0]]!r} (a {trace.module_types[path]})")
            continue
        active = np.zeros(shape[:len(hits[0])], np.float32)
        for index in hits:
            active[index] = 1.0
        leaves[(path, "bitfit_bias")] = jnp.zeros(shape, dtype)
        leaves[(path, "bitfit_active")] = jnp.asarray(active)
    selected = [name for path, leaf_key in leaves if leaf_key == "bitfit_bias"
                for name in trace.module_virtual_paths[path].values()]
    unmatched = []
    if isinstance(config.target_modules, list):
        unmatched = [t for t in config.target_modules if not any(_targets.matches(n, [t]) for n in selected)]
    if not leaves and config.target_modules is None:
        raise AdapterError("this model has no biases for BitFit to train (it trains the parameters named 'bias' "
                           "of its modules; Llama-family models have none): use another method, e.g. LoRA or IA3")
    if unmatched or not leaves:
        found = ", ".join(passed_over[:3])
        raise AdapterError(f"target_modules {unmatched or config.target_modules!r} matched no module with its own "
                           "'bias' parameter; "
                           + (f"it matched {found}" if found else f"modules that exist: {trace.existing_paths()}"))
    return leaves


# ----- forward -----

def _broadcast_delta(module: nn.Module, delta: jax.Array, x: jax.Array, out: jax.Array) -> jax.Array:
    """The per-layer delta shaped to add to the layer's output, where its own bias goes."""
    if isinstance(module, nn.LayerNorm):
        axes = module.feature_axes if isinstance(module.feature_axes, Sequence) else (module.feature_axes,)
        axes = sorted(a % out.ndim for a in axes)
        shape = [1] * out.ndim
        for a in axes:
            shape[a] = out.shape[a]
        return delta.reshape(shape)
    if layer_kind(module) == "einsum":
        kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
        # Flax's own rule for where an Einsum's bias goes.
        _, shape = module._get_bias_shape(module.einsum_str.replace(" ", ""), x, kernel)
        return delta.reshape(shape)
    return delta  # Dense, DenseGeneral, Conv: the bias covers the output's trailing axes


def _adds_bias_last(module: nn.Module) -> bool:
    return layer_kind(module) in LAYER_KINDS or type(module).__name__ in NORM_TYPES


def _checked_delta(module: nn.Module, adapter_name: str) -> tuple[jax.Array, jax.Array]:
    """The module's bias and the named adapter's delta for it (0 on the layers of a stack it leaves alone)."""
    delta = nn.meta.unbox(module.get_variable("params", "bitfit_bias")[adapter_name])
    active = nn.meta.unbox(module.get_variable("params", "bitfit_active")[adapter_name])
    bias = nn.meta.unbox(module.get_variable("params", "bias"))
    if delta.shape != bias.shape:
        raise AdapterError(f"adapter {adapter_name!r} at {'.'.join(module.path)} has bitfit_bias {delta.shape}, "
                           f"which does not fit the layer's bias {bias.shape}: the adapter was made for another model")
    return bias, _effective(delta, active)


def _with_changed_bias(next_fun, args, kwargs, module: nn.Module, adapter_name: str):
    """A call of a module that uses its bias its own way, run with ``bias + delta`` wherever it uses the bias."""
    bias, delta = _checked_delta(module, adapter_name)
    changed = (bias.astype(jnp.float32) + delta).astype(bias.dtype)
    return _contractions.call_through(next_fun, args, kwargs, {"bias": bias}, replaced={"bias": changed})


def interceptor(config: BitFitConfig, adapter_name: str, dropout: bool):
    """Adds the named adapter's bias delta to each selected module's bias."""
    del config, dropout
    own_param_calls = OwnParamCalls()

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "setup" or module.scope is None
                or adapter_name not in module.variables.get("params", {}).get("bitfit_bias", {})):
            return next_fun(*args, **kwargs)
        if not _adds_bias_last(module):
            return own_param_calls(module, next_fun, args, kwargs, lambda: _with_changed_bias(
                next_fun, args, kwargs, module, adapter_name))
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        _, delta = _checked_delta(module, adapter_name)
        x = args[0] if args else next(iter(kwargs.values()))
        return out + _broadcast_delta(module, delta, x, out).astype(out.dtype)

    return adapt


def _effective(delta: jax.Array, active: jax.Array) -> jax.Array:
    """The delta where the layer is selected, 0 elsewhere (no gradient reaches the others)."""
    active = active.reshape(active.shape + (1,) * (delta.ndim - active.ndim))
    return jnp.where(active > 0, delta, 0.0)


# ----- merge -----

def merge_layer(config: BitFitConfig, layer_params: dict, leaves: dict, sign: float) -> dict:
    """The layer's bias plus ``sign`` times the delta, computed in float32."""
    del config
    bias = layer_params["bias"]
    value = nn.meta.unbox(bias)
    delta = _effective(jnp.asarray(nn.meta.unbox(leaves["bitfit_bias"]), jnp.float32),
                       jnp.asarray(nn.meta.unbox(leaves["bitfit_active"])))
    if delta.shape != value.shape:
        raise AdapterError(f"bitfit_bias {delta.shape} does not fit the layer's bias {value.shape}")
    merged = (value.astype(jnp.float32) + sign * delta).astype(value.dtype)
    return {"bias": bias.replace_boxed(merged) if isinstance(bias, nn.meta.AxisMetadata) else merged}


METHOD = register(Method(
    config_class=BitFitConfig, leaf_keys=("bitfit_bias", "bitfit_active"), constant_keys=("bitfit_active",),
    create=create, interceptor=interceptor, merge_layer=merge_layer, cli_name="bitfit",
    leaf_layouts={"bitfit_bias": ("bias",), "bitfit_active": ("stack",)}))
