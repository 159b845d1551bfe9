"""An NNX model seen through jaxpeft's core: the same pure functions as for linen, no second implementation.

Every method, the layer search, merging and the adapter files work on a linen-style pair ``(apply_fn,
variables)``: ``variables["params"]`` holds the parameters by module path, and the adapters' leaves sit inside the
adapted module's parameters (``params/<module>/lora_A/<adapter>``). An NNX model gets the same pair from ``view``:
its ``nnx.Param`` values laid out by NNX graph path (``layers/3/attn/q_proj/kernel``), and an apply function that
runs the NNX code itself.

The bridge is one small idea. An adapted NNX module is wrapped in an ``AdaptedModule`` that keeps the original
module as ``base_layer`` and the adapter's leaves as NNX variables beside it (``q_proj.lora_A.default``), so
``nnx.vmap``/``nnx.scan`` stack and slice them with the layer. Calling the wrapper runs a one-module linen apply: a
linen *mirror* of the module (a ``nn.Dense`` for an ``nnx.Linear``, ..., a plain module for any other), placed at
the module's path, whose call rebuilds the NNX module from the values in its linen scope and runs it. jaxpeft's
interceptors see that mirror exactly as they see a linen layer: stock layers take the stock path, any other
module is traced to a jaxpr and its own parameters followed through their contractions.

Quantized weights (QLoRA) take the same road: ``jaxpeft.nnx.quantize`` keeps a ``QuantizedArray`` as the value of
the weight's ``nnx.Param`` and wraps each module that holds one in an ``AdaptedModule`` (with no adapter yet), so
the module always runs through its linen mirror, which reads its own quantized parameters dequantized, as a linen
layer reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
from flax import nnx

from jaxpeft import _contractions, _tracing, core, quantization
from jaxpeft._tracing import OUTPUT_HEAD_NAMES, PARAM_SLOTS, Layer, Trace
from jaxpeft.core import AdapterError
from jaxpeft.tree import ADAPTER_KEYS, flatten

Path = tuple[str, ...]
BASE_LAYER = "base_layer"
MODULE_RNGS = "_jaxpeft_module_rngs"  # a module call's own ``rngs`` argument, while linen's ``rngs`` is in use
ROUTE, ADAPT = "route", "adapt"  # a wrapper that only shows the module to the core / that applies adapters
# The dropout key of the linen apply a module runs in: modules inside it that show themselves to the core run
# their own apply with a key derived from it, so adapters on them drop out too.
_ROUTE_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("jaxpeft_nnx_route_dropout", default=None)


class AdapterConstant(nnx.Variable):
    """A fixed value of an adapter (LoRA's scaling, a layer-selection mask): kept beside the layer, never trained.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxpeft.nnx import AdapterConstant
        >>> AdapterConstant(jnp.float32(2.0))[...].item()
        2.0
    """


class Static:
    """A static attribute of an NNX module that compares by identity (NNX hashes static attributes)."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


# ----------------------------------------------------------------------------------------- linen mirrors


MODULE_METHOD = "_jaxpeft_module_method"  # which method of the NNX module a mirror method runs
OTHER_METHODS = ("attend",)  # besides the call, what adapters may change: an Embed's attend (tied output heads)


def _runs_in_scope(method_name: str) -> Callable:
    """A mirror method that runs the NNX module's ``method_name`` with the mirror's params."""

    def run_in_scope(self, *args, **kwargs):
        if method_name != "__call__":
            kwargs[MODULE_METHOD] = method_name
        return self.run(self.variables.get("params", {}), *args, **kwargs)

    run_in_scope.__name__ = method_name  # linen names the intercepted method after the function
    return run_in_scope


@functools.cache
def _mirror_class(linen_base: type, name: str) -> type:
    """A linen module class derived from ``linen_base`` whose call (and ``attend``) is ``run(its params, *args)``.
    The call may build helper modules (LoRA's Conv window), so it is the compact method."""
    methods = {method: _runs_in_scope(method) for method in OTHER_METHODS}
    return type(name, (linen_base,), {"__annotations__": {"run": Any}, "run": None,
                                       "__call__": nn.compact(_runs_in_scope("__call__")), **methods})


def _stock_attributes(module: nnx.Module) -> tuple[type, dict] | None:
    """The linen layer a stock NNX layer matches, with the attributes jaxpeft's methods read; None for others."""
    kind = type(module)
    if kind is nnx.Linear:
        return nn.Dense, {"features": module.out_features, "use_bias": module.use_bias}
    if kind is nnx.LinearGeneral:
        return nn.DenseGeneral, {"features": module.out_features, "axis": module.axis,
                                 "batch_dims": tuple(module.batch_axis), "use_bias": module.use_bias}
    if kind is nnx.Einsum:
        return nn.Einsum, {"shape": module.kernel_shape, "einsum_str": module.einsum_str,
                           "use_bias": module.bias_shape is not None}
    if kind is nnx.Embed:
        return nn.Embed, {"num_embeddings": module.num_embeddings, "features": module.features}
    if kind is nnx.Conv:
        return nn.Conv, {"features": module.out_features, "kernel_size": module.kernel_size,
                         "strides": module.strides, "padding": module.padding,
                         "input_dilation": module.input_dilation, "kernel_dilation": module.kernel_dilation,
                         "feature_group_count": module.feature_group_count, "use_bias": module.use_bias}
    return None


def mirror(module: nnx.Module, run: Callable) -> nn.Module:
    """An unbound linen mirror of ``module`` whose call is ``run(params, *args, **kwargs)``."""
    stock = _stock_attributes(module)
    if stock is not None:
        linen_base, attributes = stock
        return _mirror_class(linen_base, type(module).__name__)(**attributes, run=run, parent=None)
    return _mirror_class(nn.Module, type(module).__name__)(run=run, parent=None)


def layer_apply(module: nnx.Module, path: Path, method_name: str = "__call__") -> Callable:
    """``apply(variables, *args, rngs=None, **kwargs)``: ``module`` (its ``method_name``) run as a linen module at
    ``path``, its parameters (and adapter leaves) read from ``variables["params"]`` at that path."""

    def run(params, *args, **kwargs):
        if MODULE_RNGS in kwargs:  # the module's own ``rngs`` argument, kept apart from linen's
            kwargs["rngs"] = kwargs.pop(MODULE_RNGS)
        method_name = kwargs.pop(MODULE_METHOD, "__call__")
        tracing = _contractions.TRACING.get()
        fresh, state = rebuild(module, dequantized_own(module, params), detach_state=tracing)
        out = getattr(fresh, method_name)(*args, **kwargs)
        if tracing and _ADAPTING.get() and any(var.get_value() is not value for var, value in state):
            raise AdapterError(f"module {'.'.join(path) or '(the model)'} ({type(module).__name__}) changes NNX state "
                               "(RNG counts, caches) in its call, which adapters on its own parameters cannot "
                               "follow (they trace the call); adapt the layers inside it instead")
        return out

    unbound = mirror(module, run)

    def at_path(scope, *args, **kwargs):
        for segment in path:
            scope = scope.push(segment)
        return getattr(unbound.clone(parent=scope), method_name)(*args, **kwargs)

    def apply(variables, *args, rngs=None, **kwargs):
        token = _ROUTE_DROPOUT.set((rngs or {}).get("dropout"))
        try:
            return flax.core.apply(at_path, mutable=False)(variables, *args, rngs=rngs, **kwargs)
        finally:
            _ROUTE_DROPOUT.reset(token)

    return apply


def _module_key(key: jax.Array, path: Path) -> jax.Array:
    """A module's own dropout key, from the call's."""
    return jax.random.fold_in(key, zlib.crc32(".".join(path).encode()))


# ----------------------------------------------------------------------------------------- paths and values


def is_param_like(variable: nnx.Variable) -> bool:
    """Whether a variable belongs in ``variables["params"]``: parameters and adapter constants."""
    return isinstance(variable, (nnx.Param, AdapterConstant))


def _wrapper_paths(root: nnx.Module) -> set[tuple]:
    return {path for path, node in nnx.iter_modules(root) if isinstance(node, AdaptedModule)}


def layout_path(nnx_path: tuple, wrappers: set[tuple]) -> Path:
    """The linen-style path of a variable at ``nnx_path``: ``base_layer`` of a wrapper dropped, segments as str."""
    kept = [segment for i, segment in enumerate(nnx_path)
            if not (segment == BASE_LAYER and tuple(nnx_path[:i]) in wrappers)]
    return tuple(str(segment) for segment in kept)


def param_variables(root: nnx.Module) -> dict[Path, tuple[tuple, nnx.Variable]]:
    """``{linen path: (NNX path, variable)}`` of every parameter and adapter leaf under ``root``."""
    wrappers = _wrapper_paths(root)
    found = {}
    for path, variable in nnx.to_flat_state(nnx.state(root, nnx.Any(nnx.Param, AdapterConstant))):
        found.setdefault(layout_path(path, wrappers), (path, variable))
    return found


def params_tree(root: nnx.Module) -> dict:
    """``variables["params"]`` of ``root``: the values of its parameters and adapter leaves, by linen path."""
    return flax.traverse_util.unflatten_dict({path: fitted(var.get_value())
                                              for path, (_, var) in param_variables(root).items()})


def fitted(value: Any) -> Any:
    """``value``; a quantized one with its stacking axes read from its arrays (a slice that ``nnx.scan`` or
    ``nnx.vmap`` takes of a stacked ``QuantizedArray`` keeps the static shape of the whole stack)."""
    if not quantization.is_quantized(value):
        return value
    stack = tuple(value.codes.shape[:-1])
    return value if stack == value.stack_shape else value.replace(stack_shape=stack)


def rebuild(module: nnx.Module, params: Mapping, detach_state: bool = False) -> tuple[nnx.Module, list]:
    """A new ``module`` (same graph) whose parameters and adapter leaves take their values from ``params`` (a
    linen-style tree), and its other variables (RNG counts, caches) with the values they start with. Those stay
    shared with ``module`` (their updates are the module's), or with ``detach_state`` are copies (for a call traced
    to a jaxpr, whose updates must not reach the module)."""
    graphdef, state = nnx.split(module)
    values = flatten(params)
    wrappers = _wrapper_paths(module)
    flat, others = [], []
    for path, variable in nnx.to_flat_state(state):
        key = layout_path(path, wrappers) if is_param_like(variable) else None
        if key in values:
            variable = variable.replace(values[key])
        elif key is None:
            variable = variable.replace(variable.get_value()) if detach_state else variable
            others.append((variable, variable.get_value()))
        flat.append((path, variable))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), others


def independent_copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with its own variables holding the same arrays: nothing is copied on the device, and
    changing the copy's variables leaves ``model`` alone."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda leaf: leaf, state))


def child(node: Any, segment: str) -> Any:
    """The child of ``node`` named by one linen path segment (through wrappers and lists)."""
    if isinstance(node, AdaptedModule):
        node = node.base_layer
    if isinstance(node, (nnx.List, list, tuple)):
        return node[int(segment)]
    if isinstance(node, (nnx.Dict, dict)):
        return node[segment] if segment in node else node[int(segment)]
    return getattr(node, segment)


def set_child(node: Any, segment: str, value: Any) -> None:
    if isinstance(node, AdaptedModule):
        node = node.base_layer
    if isinstance(node, (nnx.List, list)):
        node[int(segment)] = value
    elif isinstance(node, (nnx.Dict, dict)):
        node[segment if segment in node else int(segment)] = value
    else:
        setattr(node, segment, value)


def find(root: Any, path: Path) -> Any:
    node = root
    for segment in path:
        node = child(node, segment)
    return node


def callable_modules(root: nnx.Module, wrapped: bool = True) -> list[tuple[Path, nnx.Module]]:
    """``(linen path, module)`` of every module under ``root`` that can be called, deepest first; with
    ``wrapped=False``, without the modules that a wrapper holds already."""
    wrappers = _wrapper_paths(root)
    found = []
    for path, node in nnx.iter_modules(root):
        if isinstance(node, (nnx.List, nnx.Dict, AdaptedModule)) or not callable(node):
            continue
        if not wrapped and path and path[-1] == BASE_LAYER and tuple(path[:-1]) in wrappers:
            continue
        found.append((layout_path(path, wrappers), node))
    return sorted(found, key=lambda item: -len(item[0]))


# ----------------------------------------------------------------------------------------- quantized weights


def owner(path: Path, module_paths: list[Path]) -> Path | None:
    """The module that holds the parameter at ``path``: the deepest of ``module_paths`` (deepest first, as
    ``callable_modules`` lists them) above it; None if none is."""
    return next((module for module in module_paths if len(module) < len(path) and path[:len(module)] == module), None)


def quantized_owners(root: nnx.Module) -> set[Path]:
    """The linen paths of the modules under ``root`` that hold a ``QuantizedArray`` themselves (not through a
    module inside them)."""
    modules = [path for path, _ in callable_modules(root)]
    found = set()
    for path, (_, variable) in param_variables(root).items():
        if quantization.is_quantized(variable.get_value()):
            module = owner(path, modules)
            if module is None:
                raise ValueError(f"the quantized weight {'.'.join(path)} belongs to no module with a __call__, so "
                                 "nothing reads it dequantized; quantize the weights of callable modules only")
            found.add(module)
    return found


def dequantized_own(module: nnx.Module, params: Mapping) -> Mapping:
    """``params`` (the linen scope of ``module``'s mirror) with ``module``'s own quantized parameters read as a
    linen layer reads them (``quantization.pin``: dequantized, the very array a traced call was shown); those of
    the modules inside it stay quantized, for their own wrappers to read when they run."""
    flat = flatten(params)
    if not any(quantization.is_quantized(value) for value in flat.values()):
        return params
    inner = [path for path, _ in callable_modules(module) if path]
    return flax.traverse_util.unflatten_dict({
        path: quantization.pin(value) if quantization.is_quantized(value) and owner(path, inner) is None else value
        for path, value in flat.items()})


def holds_quantized(module: nnx.Module) -> bool:
    """Whether a ``QuantizedArray`` is among ``module``'s parameters (its own or its modules')."""
    return any(quantization.is_quantized(variable.get_value()) for _, variable in param_variables(module).values())


# ----------------------------------------------------------------------------------------- the wrapper

# What adapted modules run in the current call: an adapter name, an AdapterMix, or None (the base model), and the
# key of the call's adapter dropout (None: no dropout); unset outside a PeftModel call (each wrapper then runs its
# own active adapter, without dropout).
_SELECTION: contextvars.ContextVar = contextvars.ContextVar("jaxpeft_nnx_selection")
# Set while an adapted module runs its adapters: the interceptors then adapt the modules inside it too, so those
# only show themselves (as linen does with nested modules).
_ADAPTING: contextvars.ContextVar = contextvars.ContextVar("jaxpeft_nnx_adapting", default=False)


@contextlib.contextmanager
def selecting(selection: Any, dropout_key: jax.Array | None = None) -> Iterator[None]:
    token = _SELECTION.set((selection, dropout_key, [0]))  # [0]: adapted module calls so far, for their masks
    try:
        yield
    finally:
        _SELECTION.reset(token)


def _nested(path: Path, tree: dict) -> dict:
    for segment in reversed(path):
        tree = {segment: tree}
    return tree


class AdaptedModule(nnx.Module):
    """A module with adapters: the original module as ``base_layer``, each adapter leaf an NNX variable beside
    it (``lora_A["default"]`` is an ``nnx.LoRAParam``; constants such as ``lora_scaling`` are
    ``AdapterConstant``). Calling it calls the module with the active adapter's change; other attributes are the
    module's own. A module holding quantized weights (``jaxpeft.nnx.quantize``) is wrapped even without an
    adapter: its calls then run through its linen mirror, which reads those weights dequantized.

    Example:
        >>> import jax, jax.numpy as jnp, jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> peft = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["layers.0"]),
        ...                                jnp.ones((1, 4)))
        >>> wrapper = peft.base_model.layers[0]
        >>> type(wrapper).__name__, type(wrapper.lora_A["default"]).__name__, wrapper.in_features
        ('AdaptedModule', 'LoRAParam', 4)
    """

    def __init__(self, base_layer: nnx.Module, path: Path, configs: Static, mode: str = ADAPT,
                 active_adapter: str | None = None):
        self.base_layer = base_layer
        self.layer_path = tuple(path)
        self.peft_configs = configs
        self.mode = mode
        self.active_adapter = active_adapter

    def __getattr__(self, name: str) -> Any:
        base = vars(self).get(BASE_LAYER)
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        if name in OTHER_METHODS and isinstance(base, nnx.Embed):
            return functools.partial(self._run, name)
        return getattr(base, name)

    def add_leaves(self, leaves: Mapping[Path, nnx.Variable]) -> None:
        """Keeps ``leaves`` (``{path below this module, starting with an adapter key: variable}``)."""
        for path, variable in leaves.items():
            if path[0] not in vars(self):
                setattr(self, path[0], nnx.data({}))
            node = getattr(self, path[0])
            for segment in path[1:-1]:
                node = node.setdefault(segment, {})
            node[path[-1]] = variable

    def adapter_keys(self) -> list[str]:
        return [key for key in vars(self) if key in ADAPTER_KEYS or key in PARAM_SLOTS]

    def _variables(self) -> dict:
        params = params_tree(self.base_layer)
        for key in self.adapter_keys():
            params[key] = jax.tree_util.tree_map(lambda v: v.get_value(), getattr(self, key),
                                                 is_leaf=lambda v: isinstance(v, nnx.Variable))
        return {"params": _nested(self.layer_path, params)}

    def _base(self, method_name: str, args: tuple, module_kwargs: dict, kwargs: dict) -> Any:
        """The module's own call, without adapters: through its linen mirror where it holds quantized weights
        (read dequantized there), else the NNX call itself."""
        if not holds_quantized(self.base_layer):
            return getattr(self.base_layer, method_name)(*args, **module_kwargs)
        return layer_apply(self.base_layer, self.layer_path, method_name)(self._variables(), *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run("__call__", *args, **kwargs)

    def _run(self, method_name: str, *args, **kwargs):
        apply_fn = layer_apply(self.base_layer, self.layer_path, method_name)
        module_kwargs = dict(kwargs)
        if "rngs" in kwargs:
            kwargs[MODULE_RNGS] = kwargs.pop("rngs")
        if self.mode == ROUTE or _ADAPTING.get():
            key = _ROUTE_DROPOUT.get()
            rngs = None if key is None else {"dropout": _module_key(key, self.layer_path)}
            return apply_fn(self._variables(), *args, rngs=rngs, **kwargs)
        selection, dropout_key, calls = _SELECTION.get((self.active_adapter, None, [0]))
        configs = dict(self.peft_configs.value)
        variables = self._variables()
        present = set(core.adapter_names(variables))
        if isinstance(selection, core.AdapterMix):
            names = tuple(name if name in present else core.BASE for name in selection.names)
            if set(names) == {core.BASE}:
                return self._base(method_name, args, module_kwargs, kwargs)
            selection = core.AdapterMix(selection.index, names)
        elif selection is None or selection not in present:
            return self._base(method_name, args, module_kwargs, kwargs)
        rewritten = core.rewrite(apply_fn, {name: configs[name] for name in present if name in configs})
        if dropout_key is not None:  # each module call its own masks
            calls[0] += 1
            key = jax.random.fold_in(_module_key(dropout_key, self.layer_path), calls[0])
            kwargs["rngs"] = {"dropout": key}
        token = _ADAPTING.set(True)
        try:
            return rewritten(variables, *args, adapter_name=selection, **kwargs)
        finally:
            _ADAPTING.reset(token)


def route_all(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in which every module that can be called is a route-only wrapper, so a linen trace
    of the root sees each module call at its path."""
    routed = independent_copy(model)
    for _, node in nnx.iter_modules(routed):
        if isinstance(node, AdaptedModule):
            node.mode = ROUTE
    for path, node in callable_modules(routed, wrapped=False):
        if path:
            set_child(find(routed, path[:-1]), path[-1], AdaptedModule(node, path, Static({}), ROUTE))
    return routed


def wrap_quantized(model: nnx.Module) -> nnx.Module:
    """``model`` (changed in place) with each module that holds a quantized weight itself in an ``AdaptedModule``
    without adapters, so that it runs through its linen mirror; returns the model (a wrapper, if the model itself
    holds one).

    Example:
        >>> import jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import quantization
        >>> from jaxpeft.nnx._graph import wrap_quantized
        >>> model = nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> model.layers[0].kernel.set_value(quantization.quantize_array(model.layers[0].kernel[...],
        ...                                                               jaxpeft.QuantizationConfig("int8")))
        >>> [type(layer).__name__ for layer in wrap_quantized(model).layers]
        ['AdaptedModule', 'Linear']
    """
    for path in sorted(quantized_owners(model), key=len, reverse=True):
        node = find(model, path)
        if isinstance(node, AdaptedModule):
            continue
        wrapper = AdaptedModule(node, path, Static({}), ADAPT)
        if path:
            set_child(find(model, path[:-1]), path[-1], wrapper)
        else:
            model = wrapper
    return model


def _stock_kernel(module: nnx.Module) -> tuple[str, tuple[int, ...]] | None:
    """The name and the shape of one layer's kernel of a stock NNX layer (without stacking axes), from its
    attributes; None for other modules."""
    kind = type(module)
    if kind is nnx.Linear:
        return "kernel", (module.in_features, module.out_features)
    if kind is nnx.LinearGeneral:
        return "kernel", tuple(module.batch_axis.values()) + tuple(module.in_features) + tuple(module.out_features)
    if kind in (nnx.Einsum, nnx.Conv):
        return "kernel", tuple(module.kernel_shape)
    if kind is nnx.Embed:
        return "embedding", (module.num_embeddings, module.features)
    return None


def described(model: nnx.Module) -> Trace:
    """What the layer search needs, read from the NNX graph without running the model: its stock layers (their
    kernel shapes from their attributes, stacking axes from the stored shapes) and every module path. Modules
    that are not stock layers are listed, not analysed: seeing how they use their parameters takes a run."""
    params = {path: tuple(var.get_value().shape) for path, (_, var) in param_variables(model).items()}
    modules = callable_modules(model)
    kernels = {path: _stock_kernel(module) for path, module in modules}
    seen = {path + (found[0],): found[1] for path, found in kernels.items() if found is not None}
    stacking = _tracing._stacking_from_shapes(seen, params)
    virtual = {path: _tracing.virtual_paths_for(path, stacking) for path, _ in modules}
    layers = {}
    for path, module in modules:
        if kernels[path] is None:
            continue
        name, shape = kernels[path]
        full = params[path + (name,)]
        stand_in = mirror(module, None)
        is_head = bool(path) and path[-1] in OUTPUT_HEAD_NAMES
        layers[path] = Layer(path, _tracing.layer_kind(stand_in), stand_in, shape, None, len(shape),
                             full[: len(full) - len(shape)], virtual[path], is_head)
    types = {path: type(module).__name__ for path, module in modules}
    return Trace(layers, types, virtual, params)


def unseen_modules(trace: Trace) -> list[str]:
    """The modules a description without inputs could not analyse: those with parameters that are not stock
    layers."""
    return [".".join(path) for path in trace.module_types if path not in trace.layers
            and any(key[:len(path)] == path and len(key) == len(path) + 1 and len(shape) >= 2
                    for key, shape in trace.param_shapes.items())]


def view(model: nnx.Module) -> tuple[Callable, dict]:
    """``(apply_fn, variables)``: ``model`` as a linen-style pure apply function and its variables.

    ``variables["params"]`` holds every ``nnx.Param`` value (and any adapter leaves) by module path (the NNX graph
    path without the wrappers' ``base_layer``), and ``apply_fn(variables, *args, rngs=None, **kwargs)`` runs the
    NNX model on them, as a linen apply: with ``rngs={"dropout": key}`` its dropout (the model's own and the
    adapters') draws from ``key``, without it the model runs in ``.eval()`` mode. Every function of jaxpeft's core
    takes this pair: ``init_adapters``, ``rewrite``, ``merge``, ``trainable_mask``, ``save_adapter``,
    ``load_adapter``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
        >>> apply_fn, variables = peft_nnx.view(model)
        >>> sorted(variables["params"])
        ['bias', 'kernel']
        >>> bool(jnp.allclose(apply_fn(variables, jnp.ones((1, 4))), model(jnp.ones((1, 4)))))
        True
    """
    graphdef, state = nnx.split(model)

    def apply_fn(variables, *args, rngs=None, **kwargs):
        routed = route_all(nnx.merge(graphdef, state))
        if rngs and "dropout" in rngs:  # the model's own dropout draws from the call's key, as linen's would
            nnx.reseed(routed, dropout=rngs["dropout"], default=jax.random.fold_in(rngs["dropout"], 1))
        else:
            routed.eval()
        root = routed.base_layer if isinstance(routed, AdaptedModule) else routed
        return layer_apply(root, ())(variables, *args, rngs=rngs, **kwargs)

    apply_fn.trace_without_inputs = lambda: described(model)
    return apply_fn, {"params": params_tree(model)}
