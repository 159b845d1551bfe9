"""Find the layers of a Flax linen model by tracing its apply function once, computing nothing.

``trace_layers`` runs ``apply_fn`` under ``jax.eval_shape`` with a method interceptor and records every module
call: its path, its type, and for the layer types that PEFT methods adapt (Dense, DenseGeneral, Embed, Conv,
Einsum) the shapes that a method needs. Layers inside ``nn.scan``/``nn.vmap`` are seen once per stack; their
parameters in the variables tree carry extra leading axes (one per layer), found here by comparing the shapes
seen inside each lifted transform with those outside it. Each such layer gets the per-layer *virtual paths* that
Hugging Face would use (``encoder.layer.3.attention.self.query``): the layer index goes right after the name of
the lifted module.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

Path = tuple[str, ...]

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

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclasses.dataclass(frozen=True)
class Trace:
    """What one traced call of a model showed: its adaptable layers, every module path, every parameter shape."""

    layers: dict[Path, Layer]
    module_types: dict[Path, str]
    module_virtual_paths: dict[Path, dict[tuple[int, ...], str]]
    param_shapes: dict[Path, tuple[int, ...]]  # every leaf of variables["params"], stacking axes included

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
    flat = traverse_util.flatten_dict(nn.meta.unbox(tree)) if tree else {}
    return {k: len(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def trace_layers(apply_fn: Callable, variables: Any, args: tuple, kwargs: dict) -> Trace:
    """Traces ``apply_fn(variables, *args, **kwargs)`` abstractly and returns what modules it called."""
    module_types: dict[Path, str] = {}
    layer_calls: dict[Path, tuple[nn.Module, tuple, Any, int]] = {}
    layer_outputs: dict[Path, Any] = {}
    boundary_views: dict[Path, dict[Path, int]] = {}
    found_heads: set[Path] = set()

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "<lambda>" or module.scope is None:
            return out
        path = tuple(module.path)
        module_types.setdefault(path, type(module).__name__)
        root = _root_scope(module.scope)
        if root.path and tuple(root.path) not in boundary_views:
            boundary_views[tuple(root.path)] = _leaf_ndims(root.variables().get("params", {}))
        kind = layer_kind(module)
        if kind is not None and context.method_name == "__call__" and path not in layer_calls:
            kernel = nn.meta.unbox(module.get_variable("params", KERNEL_NAMES[kind]))
            inputs = call_args[0] if call_args else next(iter(call_kwargs.values()))
            layer_calls[path] = (module.clone(parent=None), tuple(kernel.shape), kernel.dtype, jax.numpy.ndim(inputs))
            layer_outputs[path] = out
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
    full_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.meta.unbox(params)).items()
                   if hasattr(v, "shape")}
    stacking = _stacking_boundaries(boundary_views, full_shapes)

    def virtual_paths(path: Path) -> dict[tuple[int, ...], str]:
        cuts = [(len(b), sizes) for b, sizes in stacking.items() if path[:len(b)] == b]
        cuts.sort()
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

    layers = {}
    for path, (module, kernel_shape, dtype, input_ndim) in layer_calls.items():
        kind = layer_kind(module)
        full = full_shapes.get(path + (KERNEL_NAMES[kind],), kernel_shape)
        stack_shape = tuple(full[: len(full) - len(kernel_shape)])
        is_output = path in found_heads or path[-1] in OUTPUT_HEAD_NAMES
        layers[path] = Layer(path, kind, module, kernel_shape, dtype, input_ndim, stack_shape,
                             virtual_paths(path), is_output)
    module_virtual_paths = {p: virtual_paths(p) for p in module_types}
    return Trace(layers, module_types, module_virtual_paths, full_shapes)


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
