"""Pytree helpers: split a variables tree into trainable and frozen parts and put it back together.

In the style of equinox: ``partition`` replaces the leaves that are not selected by ``None`` in each half, so
both halves keep the structure of the original and ``combine`` is a plain leaf-wise merge.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

from jaxpeft.quantization import QuantizedArray

SAVED_MODULES_KEY = "modules_to_save"

# Keys under which PEFT methods keep their leaves inside a layer's parameters: ``params/<layer>/<key>/<adapter>``.
# Methods register theirs (``register_adapter_keys``); ``constant`` keys hold fixed values that are not parameters.
ADAPTER_KEYS: set[str] = {SAVED_MODULES_KEY}
CONSTANT_KEYS: set[str] = set()
# How each leaf's axes relate to the adapted layer's weight, for sharding (``jaxpeft.sharding``): a tuple of
# ``"stack"`` (the layer's stacking axes), ``"in"`` / ``"out"`` (the weight's input / output axes), ``None`` (an
# axis of the adapter's own, e.g. LoRA's rank, never sharded), or one of ``"kernel"`` / ``"bias"`` alone (the axes
# of the layer's kernel / bias, one for one, size-1 axes not sharded). Keys without a layout are replicated.
LEAF_LAYOUTS: dict[str, tuple[str | None, ...]] = {}


def register_adapter_keys(trainable: tuple[str, ...], constant: tuple[str, ...] = (),
                          layouts: dict[str, tuple[str | None, ...]] | None = None) -> None:
    """Declares the leaf keys a method stores in a layer's parameters, and their layouts (see ``LEAF_LAYOUTS``);
    called once by each method module."""
    ADAPTER_KEYS.update(trainable, constant)
    CONSTANT_KEYS.update(constant)
    LEAF_LAYOUTS.update(layouts or {})


def _is_none(x) -> bool:
    return x is None


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """Splits ``tree`` by a boolean ``mask`` of the same structure into ``(selected, rest)``.

    Leaves not in a half are ``None`` there, so ``jax.grad`` with respect to the first half computes gradients
    for the selected leaves only.

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> tree = {"w": jnp.ones(2), "lora": jnp.zeros(2)}
        >>> trainable, frozen = jaxpeft.partition(tree, {"w": False, "lora": True})
        >>> trainable["w"] is None and frozen["lora"] is None
        True
        >>> jaxpeft.combine(trainable, frozen)["w"].tolist()
        [1.0, 1.0]
    """
    selected = jax.tree_util.tree_map(lambda keep, leaf: leaf if keep else None, mask, tree)
    rest = jax.tree_util.tree_map(lambda keep, leaf: None if keep else leaf, mask, tree)
    return selected, rest


def combine(*trees: Any) -> Any:
    """Merges trees produced by ``partition``: each leaf is taken from the first tree where it is not None."""

    def first(*leaves):
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree_util.tree_map(first, *trees, is_leaf=_is_none)


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (what HF PEFT's ``print_trainable_parameters`` reports)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")


def count_parameters(variables: Any, mask: Any = None) -> ParameterCount:
    """Counts the parameters in ``variables["params"]`` (all of them) and those ``mask`` marks trainable.

    Fixed per-adapter constants (such as LoRA's scaling) are not parameters and are not counted.

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> v = {"params": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}}
        >>> jaxpeft.count_parameters(v, {"params": {"w": False, "b": True}})
        ParameterCount(trainable=4, total=16)
    """
    params = {"params": variables.get("params", {})}
    flat = flatten(params)
    flat_mask = flatten({"params": mask["params"]}) if mask is not None else {}
    total = trainable = 0
    for path, leaf in flat.items():
        if any(key in CONSTANT_KEYS for key in path):
            continue
        size = int(np.prod(shape_of(leaf)))
        total += size
        if flat_mask.get(path, False):
            trainable += size
    return ParameterCount(trainable, total)


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The shape of a parameter leaf, boxed or not; a quantized weight's without dequantizing it."""
    if isinstance(leaf, QuantizedArray):
        return leaf.shape
    return tuple(np.shape(nn.meta.unbox(leaf)))


def shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of the leaves of a nested dict of variables (see ``shape_of``)."""
    return {path: shape_of(leaf) for path, leaf in flatten(tree).items() if leaf is not None}


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{path: leaf}`` of a nested dict of variables (boxed leaves such as ``nn.Partitioned`` stay whole)."""
    return traverse_util.flatten_dict(unfreeze(tree) if isinstance(tree, FrozenDict) else tree)


def unflatten_like(flat: dict[tuple[str, ...], Any], like: Any) -> Any:
    """Rebuilds a nested dict from ``flat``, frozen if ``like`` was a FrozenDict."""
    tree = traverse_util.unflatten_dict(flat)
    return freeze(tree) if isinstance(like, FrozenDict) else tree


def adapter_names(variables: Any) -> list[str]:
    """The names of the adapters stored in a variables tree, in order of first appearance."""
    names: dict[str, None] = {}
    for path in flatten(variables.get("params", {})):
        for i, key in enumerate(path[:-1]):
            if key in ADAPTER_KEYS:
                names.setdefault(path[i + 1], None)
                break
    return list(names)


def strip_adapters(variables: Any) -> Any:
    """The variables without any adapter leaves: the plain base model's tree."""
    flat = flatten(variables)
    kept = {path: leaf for path, leaf in flat.items() if not any(key in ADAPTER_KEYS for key in path)}
    return unflatten_like(kept, variables)
