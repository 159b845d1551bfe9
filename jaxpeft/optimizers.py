"""Optimizers for PEFT: LoRA+ (Hayou et al., 2024) as an optax transform.

LoRA+ trains LoRA's B with a learning rate ``loraplus_lr_ratio`` times A's, and the LoRA factors of embedding
layers with their own small rate. HF PEFT builds it as torch parameter groups (``create_loraplus_optimizer``); with
an optimizer whose update is linear in the learning rate (SGD, Adam, AdamW with its decoupled weight decay), the
same is a per-leaf scaling of the updates, which is what ``scale_by_loraplus`` does after any such optimizer.
Groups follow HF PEFT's rule: LoRA leaves of an embedding layer get ``loraplus_lr_embedding``; ``lora_B`` and the
leaves that are vectors in torch (biases, norm scales, DoRA's magnitude) get ``loraplus_lr_ratio``; everything
else (``lora_A``, full copies in ``modules_to_save``) keeps the base rate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpeft.tree import ADAPTER_KEYS

RATIO_KEYS = ("lora_B", "lora_magnitude_vector")
LORA_KEYS = ("lora_A", "lora_B")
VECTOR_NAMES = ("bias", "scale")


class ScaleByLoraPlusState(NamedTuple):
    """The factor every leaf's update is multiplied by (a float32 scalar per leaf; ``None`` where the tree has
    ``None``)."""

    factors: Any


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def loraplus_group(path: tuple[str, ...], layer_keys: set[str]) -> str:
    """HF PEFT's LoRA+ group of the leaf at ``path`` (``"embedding"``, ``"B"`` or ``"A"``); ``layer_keys`` are
    the keys of the parameters of the layer holding it (an embedding layer holds ``embedding``).

    Example:
        >>> loraplus_group(("dense", "lora_B", "default"), {"kernel", "lora_A", "lora_B"})
        'B'
        >>> loraplus_group(("embed", "lora_A", "default"), {"embedding", "lora_A", "lora_B"})
        'embedding'
    """
    adapter_key = next((key for key in path if key in ADAPTER_KEYS), None)
    if adapter_key in LORA_KEYS and "embedding" in layer_keys:
        return "embedding"
    if adapter_key in RATIO_KEYS or path[-1] in VECTOR_NAMES or "bias" in (adapter_key or ""):
        return "B"
    return "A"


def loraplus_factors(params: Any, loraplus_lr_ratio: float, embedding_factor: float) -> Any:
    """A tree like ``params`` of each leaf's update factor: ``loraplus_lr_ratio`` for group B,
    ``embedding_factor`` for embedding LoRA factors, 1 for the others."""
    factor_of = {"A": 1.0, "B": float(loraplus_lr_ratio), "embedding": float(embedding_factor)}

    def layer_keys(path: tuple[str, ...]) -> set[str]:
        cut = next((i for i, key in enumerate(path) if key in ADAPTER_KEYS), len(path) - 1)
        layer = params
        for key in path[:cut]:
            layer = layer[key]
        return set(layer) if isinstance(layer, dict) or hasattr(layer, "keys") else set()

    def factor(path, leaf):
        if leaf is None:
            return None
        keys = _keys(path)
        return jnp.float32(factor_of[loraplus_group(keys, layer_keys(keys))])

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_loraplus(loraplus_lr_ratio: float, *, learning_rate: float | None = None,
                      loraplus_lr_embedding: float = 1e-6) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its LoRA+ factor; chain it after the optimizer.

    ``loraplus_lr_ratio`` is HF PEFT's ηB/ηA. The LoRA factors of embedding layers train at
    ``loraplus_lr_embedding`` (HF PEFT's default 1e-6), which needs the base ``learning_rate`` (the peak of a
    schedule) to turn into a factor; without it they keep the base rate.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "lora_A": {"default": jnp.ones((2, 1))},
        ...                     "lora_B": {"default": jnp.ones((1, 2))}}}
        >>> optimizer = optax.chain(optax.sgd(0.1), scale_by_loraplus(16.0))
        >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)
        >>> updates, _ = optimizer.update(grads, optimizer.init(params), params)
        >>> [round(float(updates["dense"][key]["default"][0, 0]), 6) for key in ("lora_A", "lora_B")]
        [-0.1, -1.6]
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0 (HF PEFT advises >= 1), got {loraplus_lr_ratio!r}")
    embedding_factor = loraplus_lr_embedding / learning_rate if learning_rate else 1.0

    def init(params):
        return ScaleByLoraPlusState(loraplus_factors(params, loraplus_lr_ratio, embedding_factor))

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map(lambda update, factor: None if update is None else update * factor.astype(
            update.dtype), updates, state.factors, is_leaf=lambda leaf: leaf is None)
        return scaled, state

    return optax.GradientTransformation(init, update)
