"""Shared by the methods that change a linear layer's weight matrix (LoHa, LoKr, VeRA, OFT, BOFT, ...).

Such a method describes one layer's change on the weight as torch holds it, a float32 matrix ``W [out, in]``:

- an *additive* method gives ``delta(config, leaves, W) -> ΔW [out, in]``; the layer computes ``x·W + x'·ΔW``
  (``x'`` the input after the method's dropout), merge adds ``ΔW`` and unmerge takes it out exactly;
- any other gives ``transform(config, leaves, W, inverse) -> W'``; the layer computes ``x·W'`` and merge stores
  ``W'`` (``inverse=True``: the ``W`` that gives back ``W'``, for unmerge).

``reweight_method`` builds the whole ``Method`` from that and from ``layer_leaves``, which makes one layer's leaves
(without stack axes): the layer finding, stacking under ``nn.scan``, ``layers_to_transform`` inside a stack, the
kernel layouts of Dense, DenseGeneral and Einsum layers and merging are all here. Leaves are kept in torch's
layout, so their HF PEFT tensors are the leaves themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import method as method_module
from jaxpeft._tracing import Layer, Trace, layer_kind
from jaxpeft.core import AdapterError, resolve_layers

Path = tuple[str, ...]
KINDS = ("dense", "dense_general", "einsum")


def matrix_sizes(layer: Layer) -> tuple[int, int]:
    """``(out, in)`` of the layer's weight as one torch matrix."""
    from jaxpeft.methods.lora import kernel_axes  # the input and output axes of Dense, DenseGeneral and Einsum

    in_axes, out_axes = kernel_axes(layer)
    return math.prod(out_axes), math.prod(in_axes)


def to_matrix(kernel: jax.Array, n_out: int, n_in: int) -> jax.Array:
    """A kernel ``(*input axes, *output axes)`` as the float32 torch matrix ``[out, in]``."""
    return kernel.astype(jnp.float32).reshape(n_in, n_out).T


def from_matrix(matrix: jax.Array, kernel_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return matrix.T.reshape(kernel_shape).astype(dtype)


def _stacked(per_index: list[dict[str, jax.Array]], stack: tuple[int, ...]) -> dict[str, jax.Array]:
    return {key: jnp.stack([leaves[key] for leaves in per_index]).reshape(stack + per_index[0][key].shape)
            for key in per_index[0]}


def create_leaves(key: jax.Array, config: Any, layer: Layer, dtype: Any, layer_leaves: Callable,
                  active_key: str) -> dict[str, jax.Array]:
    """One layer's leaves, stacked along its stack axes; stack entries the config does not select get zeros
    and ``active_key`` 0 (the layer there stays the base layer)."""
    n_out, n_in = matrix_sizes(layer)
    stack = layer.stack_shape
    per_index, active = [], []
    template = None
    for flat_index, index in enumerate(np.ndindex(*stack) if stack else [()]):
        name = layer.virtual_paths.get(index)
        leaves = layer_leaves(jax.random.fold_in(key, flat_index), config, name or layer.name, n_out, n_in, dtype)
        template = leaves
        per_index.append(leaves if name is not None else None)
        active.append(1.0 if name is not None else 0.0)
    per_index = [leaves if leaves is not None else jax.tree_util.tree_map(jnp.zeros_like, template)
                 for leaves in per_index]
    if len({tuple((k, v.shape) for k, v in sorted(leaves.items())) for leaves in per_index}) > 1:
        raise AdapterError(f"rank_pattern gives the stacked layers {layer.name} leaves of different shapes; a scanned "
                           "stack needs one rank (or load the model without scanned layers)")
    stacked = _stacked(per_index, stack) if stack else per_index[0]
    stacked[active_key] = jnp.asarray(np.asarray(active, np.float32).reshape(stack))
    return stacked


def run_with(module: nn.Module, method_name: str, args, kwargs, **replaced: jax.Array):
    """The layer's call with some of its parameters replaced."""
    params = {name: nn.meta.unbox(value) for name, value in module.variables["params"].items()
              if not isinstance(value, dict)}
    params.update(replaced)
    return module.clone(parent=None).apply({"params": params}, *args, method=method_name, **kwargs)


def _layer_leaves(module: nn.Module, adapter_name: str, leaf_keys: tuple[str, ...]) -> dict[str, jax.Array] | None:
    if not module.has_variable("params", leaf_keys[0]) or adapter_name not in module.get_variable(
            "params", leaf_keys[0]):
        return None
    return {key: nn.meta.unbox(module.get_variable("params", key)[adapter_name]) for key in leaf_keys
            if module.has_variable("params", key) and adapter_name in module.get_variable("params", key)}


def _dropped(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def make_interceptor(leaf_keys: tuple[str, ...], active_key: str, delta: Callable | None,
                     transform: Callable | None, dropout_rate: Callable[[Any], float]):
    """``interceptor(config, adapter_name, dropout)`` for a reweighting method (see the module docstring)."""

    def interceptor(config: Any, adapter_name: str, dropout: bool):
        rate = dropout_rate(config) if dropout else 0.0

        def adapt(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or layer_kind(module) not in KINDS:
                return next_fun(*args, **kwargs)
            leaves = _layer_leaves(module, adapter_name, leaf_keys + (active_key,))
            if leaves is None:
                return next_fun(*args, **kwargs)
            kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
            n_in = math.prod(kernel.shape[:_input_ndim(module, kernel.ndim)])
            weight = to_matrix(kernel, kernel.size // n_in, n_in)
            active = leaves.pop(active_key)
            if delta is None:
                changed = transform(config, leaves, weight, False)
                new_kernel = from_matrix(jnp.where(active != 0, changed, weight), kernel.shape, kernel.dtype)
                return run_with(module, context.method_name, args, kwargs, kernel=new_kernel)
            out = next_fun(*args, **kwargs)
            change = from_matrix(delta(config, leaves, weight) * active, kernel.shape, out.dtype)
            x_args = list(args)
            if rate > 0:
                x_args[0] = _dropped(module, x_args[0], rate)
            no_bias = {"bias": jnp.zeros_like(nn.meta.unbox(module.get_variable("params", "bias")))} if (
                module.has_variable("params", "bias")) else {}
            return out + run_with(module, context.method_name, tuple(x_args), kwargs, kernel=change, **no_bias)

        return adapt

    return interceptor


def _input_ndim(module: nn.Module, kernel_ndim: int) -> int:
    kind = layer_kind(module)
    if kind == "dense":
        return 1
    if kind == "dense_general":
        axis = module.axis
        return len(axis) if isinstance(axis, (tuple, list)) else 1
    from jaxpeft.methods.lora import _einsum_axes

    return len(_einsum_axes(module)[3])


def _fill_sizes(sizes: tuple[int | None, int | None], layer_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(n_out, n_in)`` with a side the leaves do not tell (``None``) taken from the kernel's size (both ``None``:
    a two-axis kernel ``[in, out]``)."""
    n_out, n_in = sizes
    total = math.prod(layer_shape)
    if n_out is None and n_in is None:
        if len(layer_shape) != 2:
            raise AdapterError(f"cannot tell the input and output axes of kernel {tuple(layer_shape)} from the "
                               "adapter's leaves; merge a layer with a two-axis kernel")
        n_in, n_out = layer_shape
    elif n_out is None:
        n_out = total // n_in if n_in and total % n_in == 0 else -1
    elif n_in is None:
        n_in = total // n_out if n_out and total % n_out == 0 else -1
    return n_out, n_in


def make_merge_layer(active_key: str, delta: Callable | None, transform: Callable | None, sizes: Callable):
    """``merge_layer(config, layer_params, leaves, sign)``: the kernel with the change folded in (float32)."""

    def merge_layer(config: Any, layer_params: dict, leaves: dict, sign: float) -> dict:
        boxed = layer_params["kernel"]
        kernel = nn.meta.unbox(boxed)
        active = jnp.asarray(nn.meta.unbox(leaves[active_key]))
        per_layer = {key: jnp.asarray(nn.meta.unbox(value)) for key, value in leaves.items() if key != active_key}
        stack = active.ndim
        layer_shape = kernel.shape[stack:]
        n_out, n_in = _fill_sizes(sizes(config, jax.tree_util.tree_map(lambda leaf: leaf[(0,) * stack], per_layer)),
                                  layer_shape)
        if n_out * n_in != math.prod(layer_shape):
            raise AdapterError(f"the adapter's leaves make a [{n_out}, {n_in}] weight, which does not fit the "
                               f"layer's kernel {tuple(layer_shape)}: the adapter was made for another model")

        def one(kernel_slice, layer_leaves, on):
            weight = to_matrix(kernel_slice, n_out, n_in)
            if delta is not None:
                changed = weight + sign * delta(config, layer_leaves, weight)
            else:
                changed = transform(config, layer_leaves, weight, sign < 0)
            return from_matrix(jnp.where(on != 0, changed, weight), layer_shape, jnp.float32)

        fn = one
        for _ in range(stack):
            fn = jax.vmap(fn)
        new_kernel = fn(kernel, per_layer, active).astype(kernel.dtype)
        return {"kernel": boxed.replace_boxed(new_kernel) if isinstance(boxed, nn.meta.AxisMetadata)
                else new_kernel}

    return merge_layer


def reweight_method(config_class: type, leaf_keys: tuple[str, ...], layer_leaves: Callable, sizes: Callable, *,
                    active_key: str, method_name: str, delta: Callable | None = None,
                    transform: Callable | None = None, constant_keys: tuple[str, ...] = (),
                    dropout_rate: Callable[[Any], float] = lambda config: 0.0, **hooks: Any) -> method_module.Method:
    """The ``Method`` of a reweighting method.

    ``layer_leaves(key, config, name, n_out, n_in, dtype) -> {leaf key: array}`` makes the leaves of the layer at
    dotted path ``name`` whose weight is ``[n_out, n_in]``, and ``sizes(config, leaves) -> (n_out, n_in)`` reads
    them back from one layer's leaves (``None`` for a side they do not tell: it comes from the kernel); give
    ``delta`` (additive) or ``transform``. ``hooks`` go to ``Method`` as they are (``task_defaults``, ``finish``,
    ``cli_name``, ...).
    """
    if (delta is None) == (transform is None):
        raise TypeError("reweight_method: give exactly one of delta= and transform=")

    def create(key: jax.Array, config: Any, trace: Trace, dtype: Any) -> dict[tuple[Path, str], Any]:
        layers = resolve_layers(config, trace, KINDS, method_name=method_name)
        leaves = {}
        for i, (path, layer) in enumerate(sorted(layers.items())):
            if layer.kind == "einsum":
                from jaxpeft.methods.lora import _einsum_axes

                _einsum_axes(layer.module)
            for leaf_key, value in create_leaves(jax.random.fold_in(key, i), config, layer, dtype, layer_leaves,
                                                 active_key).items():
                leaves[(path, leaf_key)] = value
        return leaves

    return method_module.Method(
        config_class=config_class, leaf_keys=leaf_keys + (active_key,), create=create,
        interceptor=make_interceptor(leaf_keys + tuple(hooks.get("optional_leaf_keys", ())), active_key, delta,
                                     transform, dropout_rate),
        merge_layer=make_merge_layer(active_key, delta, transform, sizes),
        constant_keys=constant_keys + (active_key,), **hooks)

