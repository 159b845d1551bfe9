"""Find the layers of a Flax linen model by tracing its apply function once, computing nothing.

``trace_layers`` runs ``apply_fn`` under ``jax.eval_shape`` with a method interceptor and records every module
call: its path, its type, and for the layer types that PEFT methods adapt (Dense, DenseGeneral, Embed, Conv,
Einsum) the shapes that a method needs. Any other module that holds parameters of two or more axes is traced to a
jaxpr (``jaxpeft._contractions``) to see which of them it multiplies with an input, and how: each such parameter is
a layer of kind ``"param"`` (path ``<module path>/<slot>/<parameter name>``, where methods keep its leaves), with the
role of each of its axes (``"in"``: contracted, ``"out"``: kept, ``"batch"``: one adapter per entry).

Layers inside ``nn.scan``/``nn.vmap`` are seen once per stack; their
parameters in the variables tree carry extra leading axes (one per layer), found here by comparing the shapes
seen inside each lifted transform with those outside it. Each such layer gets the per-layer *virtual paths* that
Hugging Face would use (``encoder.layer.3.attention.self.query``): the layer index goes right after the name of
the lifted module.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft import _contractions, quantization
from jaxpeft.tree import shape_of, shapes

Path = tuple[str, ...]
# Slots under a module's parameters for the leaves of adapters on one of its own parameters:
# ``params/<module>/<slot>/<parameter>/<leaf key>/<adapter>``. OWN_PARAMS holds adapters that follow the parameter's
# contractions (LoRA's A and B meet the input); TARGET_PARAMS, those of ``target_parameters``, which change the
# parameter itself wherever the module uses it (HF PEFT's semantics).
OWN_PARAMS = "own_params"
TARGET_PARAMS = "target_parameters"
PARAM_SLOTS = (OWN_PARAMS, TARGET_PARAMS)

LAYER_KINDS: dict[type, str] = {
    nn.Dense: "dense",
    nn.DenseGeneral: "dense_general",
    nn.Embed: "embed",
    nn.Conv: "conv",
    nn.Einsum: "einsum",
}
KERNEL_NAMES = {kind: "embedding" if kind == "embed" else "kernel" for kind in LAYER_KINDS.values()}
OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "output_head")


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind of a linen module (``"dense"``, ``"embed"``, ...), or None for any other module."""
    for layer_type, kind in LAYER_KINDS.items():
        if type(module) is layer_type:
            return kind
    for layer_type, kind in LAYER_KINDS.items():
        if isinstance(module, layer_type):
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adaptable layer found in a model.

    Attributes:
        path: the module path, which is also the path of its parameters in ``variables["params"]``.
        kind: ``"dense"``, ``"dense_general"``, ``"embed"``, ``"conv"`` or ``"einsum"``.
        module: an unbound copy of the layer module (its attributes: features, axis, kernel_size, ...).
        kernel_shape: the shape of one layer's kernel (or embedding table), without stacking axes.
        kernel_dtype: the dtype of the stored kernel.
        input_ndim: the number of dimensions of the layer's input.
        stack_shape: the leading axes its parameters carry in the variables tree (``(num_layers,)`` under
            ``nn.scan``; ``()`` otherwise).
        virtual_paths: ``{stack index: dotted Hugging Face style path}``; the index is ``()`` for unstacked layers.
        is_output: whether the layer produces the model's output (an output head).
    """

    path: Path
    kind: str
    module: Any
    kernel_shape: tuple[int, ...]
    kernel_dtype: Any
    input_ndim: int
    stack_shape: tuple[int, ...]
    virtual_paths: dict[tuple[int, ...], str]
    is_output: bool
    roles: tuple[str, ...] = ()  # kind "param": each parameter axis's role, "in", "out" or "batch"
    contractions: tuple[str, ...] = ()  # kind "param": the contraction primitives the parameter meets

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def param_name(self) -> str | None:
        """For a layer of kind ``"param"``, the name of the parameter it adapts."""
        return self.path[-1] if self.kind == "param" else None


@dataclasses.dataclass(frozen=True)
class ParamUse:
    """How a module uses one of its own parameters in a traced call: the roles of its axes in each contraction
    with an input, and the primitives of its other uses (a gather, an addition, ...)."""

    shape: tuple[int, ...]
    dtype: Any
    roles: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    contractions: set[str] = dataclasses.field(default_factory=set)  # the contraction primitives it meets
    other: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class Trace:
    """What one traced call of a model showed: its adaptable layers, every module path, every parameter shape."""

    layers: dict[Path, Layer]
    module_types: dict[Path, str]
    module_virtual_paths: dict[Path, dict[tuple[int, ...], str]]
    param_shapes: dict[Path, tuple[int, ...]]  # every leaf of variables["params"], stacking axes included
    # (*module path, parameter name) -> how a module uses its own parameters of two or more axes, and the
    # "param" layer of each (``Layer.path`` is that key; methods put a slot before the parameter's name)
    param_uses: dict[Path, ParamUse] = dataclasses.field(default_factory=dict)
    params: dict[Path, Layer] = dataclasses.field(default_factory=dict)
    # module path -> the shape and dtype of its first ``__call__``'s output, where that output is one array
    module_outputs: dict[Path, jax.ShapeDtypeStruct] = dataclasses.field(default_factory=dict)

    def stack_shape(self, path: Path) -> tuple[int, ...]:
        """The sizes of the stacking axes (``nn.scan``/``nn.vmap``) around the module at ``path``."""
        indices = list(self.module_virtual_paths.get(path, {(): ""}))
        return tuple(max(index[axis] for index in indices) + 1 for axis in range(len(indices[0])))

    def param_layers(self, module_path: Path) -> list[Layer]:
        """The ``"param"`` layers of a module: its own parameters of two or more axes that it uses."""
        return [layer for path, layer in self.params.items() if path[:-1] == module_path]

    def existing_paths(self, limit: int = 12) -> str:
        """The first ``limit`` module paths, for error messages."""
        names = [p for vp in self.module_virtual_paths.values() for p in vp.values() if p]
        shown = ", ".join(names[:limit])
        return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _root_scope(scope):
    while scope.parent is not None:
        scope = scope.parent
    return scope


def _leaf_ndims(tree) -> dict[Path, int]:
    return {path: len(shape) for path, shape in shapes(tree).items()} if tree else {}


def own_matrices(module: nn.Module) -> dict[str, jax.Array]:
    """The module's own parameters (not its submodules') of two or more axes, unboxed."""
    params = module.variables.get("params", {})
    own = {name: quantization.pin(value) for name, value in params.items() if not isinstance(value, Mapping)}
    return {name: value for name, value in own.items() if jnp.ndim(value) >= 2}


def _traced_uses(next_fun, args, kwargs, own: dict[str, Any], module_path: Path, uses: dict[Path, ParamUse]):
    """Runs one method call through its jaxpr, noting how it uses each of ``own``; returns the call's output."""
    traced = _contractions.trace_call(next_fun, args, kwargs)

    def use_of(name: str) -> ParamUse:
        value = own[name]
        return uses.setdefault(module_path + (name,), ParamUse(tuple(value.shape), value.dtype))

    def note(contraction: _contractions.Contraction, invals) -> None:
        ndim = len(own[contraction.view.param].shape)
        use = use_of(contraction.view.param)
        use.roles.append(tuple(contraction.roles[axis] for axis in range(ndim)))
        use.contractions.add(contraction.eqn.primitive.name)

    outs, others = _contractions.run(traced.closed, traced.arrays, own, note)
    for name, primitive in others:
        use_of(name).other.add(primitive)
    return traced.output(outs)


def _is_one_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, jax.core.Tracer)) and jnp.ndim(value) >= 1


# apply_fn -> {call signature: Trace}; an entry lives as long as its apply function.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_SAMPLE_SIZE = 1 << 16  # sample inputs are keyed by value; larger ones are not worth keeping


def _call_signature(variables: Any, args: tuple, kwargs: dict) -> tuple | None:
    """What a trace depends on, hashable: the structure, shapes and dtypes of ``variables`` (traced abstractly) and
    the values of the sample inputs (concrete while tracing). None when the call cannot be keyed."""
    variable_leaves, variable_tree = jax.tree_util.tree_flatten(variables)
    input_leaves, input_tree = jax.tree_util.tree_flatten((args, kwargs))
    try:
        hash((variable_tree, input_tree))
    except TypeError:
        return None
    inputs = []
    for leaf in input_leaves:
        if isinstance(leaf, jax.core.Tracer) or (hasattr(leaf, "shape") and jnp.size(leaf) > _MAX_SAMPLE_SIZE):
            return None
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            array = jax.device_get(leaf)
            inputs.append((type(leaf).__name__, array.shape, str(array.dtype), array.tobytes()))
        elif isinstance(leaf, (bool, int, float, str, type(None))):
            inputs.append((type(leaf).__name__, leaf))
        else:
            return None
    variable_shapes = tuple((type(leaf).__name__, shape_of(leaf), str(getattr(leaf, "dtype", type(leaf))))
                    for leaf in variable_leaves)
    return variable_tree, variable_shapes, input_tree, tuple(inputs)


def trace_layers(apply_fn: Callable, variables: Any, args: tuple, kwargs: dict) -> Trace:
    """Traces ``apply_fn(variables, *args, **kwargs)`` abstractly and returns what modules it called.

    The trace is kept for the apply function's lifetime and returned again for a call with variables of the same
    structure, shapes and dtypes and the same sample inputs (adding a second adapter, saving, loading).
    An apply function that can describe its model without running it (``jaxpeft.nnx.view``'s, from the NNX
    graph) does so when no inputs are given.
    """
    describe = getattr(apply_fn, "trace_without_inputs", None)
    if describe is not None and not args and not kwargs:
        return describe()
    try:
        kept = _TRACES.setdefault(apply_fn, {})
    except TypeError:  # neither hashable nor weakly referable: traced every time
        return _trace_layers(apply_fn, variables, args, kwargs)
    signature = _call_signature(variables, args, kwargs)
    if signature is None:
        return _trace_layers(apply_fn, variables, args, kwargs)
    if signature not in kept:
        kept[signature] = _trace_layers(apply_fn, variables, args, kwargs)
    return kept[signature]


def _trace_layers(apply_fn: Callable, variables: Any, args: tuple, kwargs: dict) -> Trace:
    module_types: dict[Path, str] = {}
    layer_calls: dict[Path, tuple[nn.Module, tuple, Any, int]] = {}
    layer_outputs: dict[Path, Any] = {}
    boundary_views: dict[Path, dict[Path, int]] = {}
    found_heads: set[Path] = set()
    param_uses: dict[Path, ParamUse] = {}
    module_outputs: dict[Path, jax.ShapeDtypeStruct] = {}
    param_modules: dict[Path, nn.Module] = {}
    analysing: set[Path] = set()  # modules whose call is being traced to a jaxpr (their inner calls run plainly)
    seen_shapes: dict[Path, tuple[int, ...]] = {}  # each module's own parameters as its calls see them

    def call(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name in ("<lambda>", "setup") or module.scope is None or layer_kind(module) is not None:
            return next_fun(*call_args, **call_kwargs)
        path = tuple(module.path)
        with quantization.pinning():
            own = own_matrices(module)
            if not own or path in analysing:
                return next_fun(*call_args, **call_kwargs)
            analysing.add(path)
            param_modules.setdefault(path, module.clone(parent=None))
            try:
                return _traced_uses(next_fun, call_args, call_kwargs, own, path, param_uses)
            finally:
                analysing.discard(path)

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        out = call(next_fun, call_args, call_kwargs, context)
        if context.method_name == "<lambda>" or module.scope is None:
            return out
        path = tuple(module.path)
        module_types.setdefault(path, type(module).__name__)
        for name, value in module.variables.get("params", {}).items():
            if hasattr(value, "shape") or isinstance(value, nn.meta.AxisMetadata):
                seen_shapes.setdefault(path + (name,), shape_of(value))
        if context.method_name == "__call__" and path not in module_outputs and _is_one_array(out):
            module_outputs[path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        root = _root_scope(module.scope)
        if root.path and tuple(root.path) not in boundary_views:
            boundary_views[tuple(root.path)] = _leaf_ndims(root.variables().get("params", {}))
        kind = layer_kind(module)
        if kind is not None and context.method_name == "__call__" and path not in layer_calls:
            kernel = nn.meta.unbox(module.get_variable("params", KERNEL_NAMES[kind]))
            inputs = call_args[0] if call_args else next(iter(call_kwargs.values()))
            layer_calls[path] = (module.clone(parent=None), tuple(kernel.shape), kernel.dtype, jax.numpy.ndim(inputs))
            layer_outputs[path] = out
        elif path in param_modules and context.method_name == "__call__":
            layer_outputs.setdefault(path, out)
        return out

    def traced(variables):
        with nn.intercept_methods(record):
            out = apply_fn(variables, *args, **kwargs)
        output_ids = {id(leaf) for leaf in jax.tree_util.tree_leaves(out)}
        heads = {path for path, o in layer_outputs.items() if id(o) in output_ids}
        found_heads.update(heads)
        return out

    jax.eval_shape(traced, variables)
    params = variables["params"] if "params" in variables else {}
    full_shapes = shapes(params)
    stacking = (_stacking_boundaries(boundary_views, full_shapes) if boundary_views
                else _stacking_from_shapes(seen_shapes, full_shapes))

    def virtual_paths(path: Path) -> dict[tuple[int, ...], str]:
        return virtual_paths_for(path, stacking)

    layers = {}
    for path, (module, kernel_shape, dtype, input_ndim) in layer_calls.items():
        kind = layer_kind(module)
        full = full_shapes.get(path + (KERNEL_NAMES[kind],), kernel_shape)
        stack_shape = tuple(full[: len(full) - len(kernel_shape)])
        is_output = path in found_heads or path[-1] in OUTPUT_HEAD_NAMES
        layers[path] = Layer(path, kind, module, kernel_shape, dtype, input_ndim, stack_shape,
                             virtual_paths(path), is_output)
    module_virtual_paths = {p: virtual_paths(p) for p in module_types}
    params = {key: _param_layer(key, use, param_modules[key[:-1]], full_shapes, virtual_paths(key[:-1]),
                                key[:-1] in found_heads or bool(key[:-1]) and key[-2] in OUTPUT_HEAD_NAMES)
              for key, use in param_uses.items() if use.roles}
    return Trace(layers, module_types, module_virtual_paths, full_shapes, param_uses, params, module_outputs)


def virtual_paths_for(path: Path, stacking: dict[Path, tuple[int, ...]]) -> dict[tuple[int, ...], str]:
    """``{stack index: dotted name}`` of the module at ``path``: each stacking boundary above it (``stacking``,
    boundary path -> sizes of the axes it adds) puts the layer index after its name."""
    cuts = sorted((len(b), sizes) for b, sizes in stacking.items() if path[:len(b)] == b)
    if not cuts:
        return {(): ".".join(path)}
    out = {}
    for index in itertools.product(*[range(n) for _, sizes in cuts for n in sizes]):
        parts, i, start = [], 0, 0
        for cut, sizes in cuts:
            parts.extend(path[start:cut])
            parts.extend(str(j) for j in index[i:i + len(sizes)])
            i, start = i + len(sizes), cut
        parts.extend(path[start:])
        out[index] = ".".join(parts)
    return out


def stock_kernel_roles(layer: Layer) -> tuple[str, ...] | None:
    """The roles of a stock layer's kernel axes (its input axes, then its output axes), None when they are not
    that simple (a DenseGeneral with batch_dims, an Einsum whose kernel mixes them)."""
    ndim, module = len(layer.kernel_shape), layer.module
    if layer.kind in ("dense", "embed"):
        return ("in", "out")
    if layer.kind == "conv":
        return ("in",) * (ndim - 1) + ("out",)
    if layer.kind == "dense_general":
        if tuple(module.batch_dims):
            return None
        n_in = len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
        return ("in",) * n_in + ("out",) * (ndim - n_in)
    inputs, out = module.einsum_str.replace(" ", "").split("->")
    x_spec, k_spec = inputs.split(",")
    return tuple("in" if c in x_spec and c not in out else "batch" if c in x_spec else "out" for c in k_spec)


def fallback_roles(ndim: int) -> tuple[str, ...]:
    """The roles of a parameter's axes when no contraction shows them: a kernel's layout, input then output, with
    any leading axes one adapter per entry (experts)."""
    return ("batch",) * (ndim - 2) + ("in", "out")


def _param_layer(key: Path, use: ParamUse, module: nn.Module, full_shapes: dict, virtual: dict,
                 is_output: bool) -> Layer:
    """The ``"param"`` layer of a parameter its module multiplies; its roles are those of its first contraction
    (``roles`` is empty when its contractions disagree: ``resolve_layers`` reports it)."""
    full = full_shapes.get(key, use.shape)
    roles = use.roles[0] if all(roles == use.roles[0] for roles in use.roles) else ()
    return Layer(key, "param", module, use.shape, use.dtype, 0, tuple(full[: len(full) - len(use.shape)]),
                 virtual, is_output, roles, tuple(sorted(use.contractions)))


def _stacking_boundaries(boundary_views: dict[Path, dict[Path, int]],
                         full_shapes: dict[Path, tuple[int, ...]]) -> dict[Path, tuple[int, ...]]:
    """For each lifted module that adds stacking axes, the sizes of the axes it adds."""
    stacking = {}
    for boundary in sorted(boundary_views, key=len):
        inner = boundary_views[boundary]
        if not inner:
            continue
        rel, inner_ndim = next(iter(inner.items()))
        outer_full = full_shapes.get(boundary + rel)
        if outer_full is None:
            continue
        enclosing = [b for b in boundary_views if b != boundary and boundary[:len(b)] == b]
        if enclosing:
            parent = max(enclosing, key=len)
            outer_ndim = boundary_views[parent].get(boundary[len(parent):] + rel, len(outer_full))
        else:
            outer_ndim = len(outer_full)
        added = outer_ndim - inner_ndim
        if added > 0:
            offset = len(outer_full) - outer_ndim
            stacking[boundary] = tuple(outer_full[offset: offset + added])
    return stacking


def _added_axes(seen: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...]:
    """The leading axes a stored parameter has beyond the shape its module's call sees."""
    return tuple(full[: len(full) - len(seen)])


def _stacking_from_shapes(seen_shapes: dict[Path, tuple[int, ...]],
                          full_shapes: dict[Path, tuple[int, ...]]) -> dict[Path, tuple[int, ...]]:
    """Stacking boundaries of a model whose stacks are not linen lifts (an NNX model with ``nnx.vmap``-made
    layers run by ``nnx.scan``): for each stacked parameter, the shortest prefix of its module path under which
    every parameter a call saw carries the same added axes; the layer index goes after that prefix."""
    added = {key: _added_axes(seen, full_shapes.get(key, seen)) for key, seen in seen_shapes.items()}
    stacking: dict[Path, tuple[int, ...]] = {}
    for key, axes in sorted(added.items(), key=lambda item: len(item[0])):
        if not axes or any(key[:len(b)] == b for b in stacking):
            continue
        for cut in range(len(key)):
            prefix = key[:cut]
            if all(other == axes for k, other in added.items() if k[:cut] == prefix):
                stacking[prefix] = axes
                break
    return stacking
