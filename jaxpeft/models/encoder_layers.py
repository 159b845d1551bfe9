"""Pieces shared by the encoder families (BERT, RoBERTa, DistilBERT).

The families build their modules from the helpers here so that every parameter carries logical axis names and
Hugging Face-style initialisation, every attention goes through the library's ``attention.dot_product_attention``
(``jax.nn.dot_product_attention`` unless attention dropout is on) with the same padding mask and prefix key/values
(``(keys, values)``, each (num_layers, batch, num_prefix, heads, head_dim), as for the decoder families), and the
stack of repeated layers is laid out the same way:

* unscanned, the stack is a module named ``layer`` whose children are named ``"0"``, ``"1"``, ..., so parameter paths
  read like the torch names (``encoder/layer/0/attention/self/query``);
* scanned, the stack is one ``nn.scan`` module named ``layer`` whose parameters have a leading ``'layers'`` axis.

The checkpoint conversion (``params_from_hf`` / ``params_to_hf``) relies on module names mirroring the torch names:
it only has to rename leaves (``weight`` <-> ``kernel`` / ``scale`` / ``embedding``), transpose linear weights,
and stack or unstack the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpeft.models import attention

Dtype = Any
Array = jax.Array

# Leaf names of the torch checkpoints that hold buffers, not weights; they are dropped when loading.
_BUFFER_NAMES = ("position_ids", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """The hashable subset of a transformers encoder config that the modules read."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    initializer_range: float
    pad_token_id: int | None
    num_labels: int
    sinusoidal_positions: bool = False

    @property
    def head_dim(self) -> int:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} attention heads")
        return self.hidden_size // self.num_heads


@flax.struct.dataclass
class EncoderOutput:
    """Output of a base encoder: ``last_hidden_state`` (batch, seq, hidden) and, with a pooler, ``pooler_output``."""

    last_hidden_state: Array
    pooler_output: Array | None = None




def dense(
    features: int,
    name: str,
    kernel_axes: tuple[str | None, str | None],
    settings: EncoderSettings,
    dtype: Dtype,
    param_dtype: Dtype,
) -> nn.Dense:
    """A ``nn.Dense`` initialised like a transformers ``nn.Linear`` (normal(initializer_range) kernel, zero bias)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(settings.initializer_range), kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), kernel_axes[-1:]),
        name=name,
    )


def layer_norm(name: str, epsilon: float, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """A ``nn.LayerNorm`` (statistics in float32) with ones/zeros initialisation like torch."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def normal_table_init(stddev: float, padding_idx: int | None = None) -> Callable:
    """Initialiser of an embedding table like torch ``nn.Embedding`` in transformers: normal, padding row zero."""
    normal = nn.initializers.normal(stddev)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)
        if padding_idx is not None and 0 <= padding_idx < shape[0]:
            table = table.at[padding_idx].set(0)
        return table

    return init


def sinusoidal_table_init(key, shape, dtype=jnp.float32):
    """The fixed sin/cos position table of DistilBERT's ``sinusoidal_pos_embds`` (``key`` is unused)."""
    del key
    num_positions, dim = shape
    exponents = 2 * (np.arange(dim) // 2) / dim
    angles = np.arange(num_positions)[:, None] / np.power(10000, exponents)[None, :]
    table = np.empty(shape, dtype=np.float32)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return jnp.asarray(table, dtype)


def embed(
    num_embeddings: int,
    name: str,
    axes: tuple[str | None, str | None],
    settings: EncoderSettings,
    dtype: Dtype,
    param_dtype: Dtype,
    init: Callable | None = None,
) -> nn.Embed:
    """A ``nn.Embed`` of width ``hidden_size``, by default initialised normal(initializer_range)."""
    init = init or normal_table_init(settings.initializer_range)
    return nn.Embed(
        num_embeddings,
        settings.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )


def self_attention(
    module: nn.Module,
    query: Array,
    key: Array,
    value: Array,
    attention_mask: Array,
    prefix_key_value: tuple[Array, Array] | None,
    dropout_rate: float,
    deterministic: bool,
) -> Array:
    """Bidirectional multi-head attention of one layer, shapes [batch, seq, heads, head_dim].

    ``attention_mask`` comes from ``encoder_attention_mask``; ``prefix_key_value`` is this layer's ``(keys, values)``
    of shape (batch, num_prefix, heads, head_dim) or None. ``module`` supplies the ``'dropout'`` rng when the
    attention probabilities are dropped (training with ``dropout_rate > 0``).
    """
    dropout_rng = module.make_rng("dropout") if not deterministic and dropout_rate > 0.0 else None
    return attention.dot_product_attention(
        query,
        key,
        value,
        attention_mask,
        prefix_key_value=prefix_key_value,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )


def encoder_attention_mask(
    attention_mask: Array | None, batch_size: int, seq_length: int, num_prefix: int, implementation: str | None = None
) -> attention.AttentionMask:
    """The bidirectional ``AttentionMask``: every query sees the prefix and the non-padding keys of its segment."""
    attention.attention_kernels.check_implementation(implementation)
    given = attention_mask is not None
    if attention_mask is None:
        attention_mask = jnp.ones((batch_size, seq_length), jnp.int32)
    return attention.AttentionMask(
        attention_mask=jnp.asarray(attention_mask),
        query_offset=jnp.zeros((), jnp.int32),
        query_length=seq_length,
        num_prefix_tokens=num_prefix,
        causal=False,
        given=given,
        implementation=implementation,
    )


def check_prefix_key_values(
    prefix_key_values: tuple[Array, Array] | None, settings: EncoderSettings, batch_size: int
) -> tuple[tuple[Array, Array] | None, int]:
    """``(prefix_key_values with the batch broadcast, num_prefix)`` after checking the shapes.

    ``prefix_key_values`` is None or ``(keys, values)``, each (num_layers, batch or 1, num_prefix, heads, head_dim),
    the layout of the decoder families.
    """
    if prefix_key_values is None:
        return None, 0
    expected = "(keys, values), each (num_layers, batch or 1, num_prefix, heads, head_dim)"
    if not isinstance(prefix_key_values, (tuple, list)) or len(prefix_key_values) != 2:
        raise ValueError(f"prefix_key_values must be a pair {expected}")
    keys, values = (jnp.asarray(array) for array in prefix_key_values)
    num_prefix = keys.shape[2] if keys.ndim == 5 else -1
    per_layer = (num_prefix, settings.num_heads, settings.head_dim)

    def fits(array):
        return (
            array.ndim == 5
            and array.shape[0] == settings.num_layers
            and array.shape[1] in (1, batch_size)
            and array.shape[2:] == per_layer
        )

    if not (fits(keys) and fits(values)):
        raise ValueError(
            f"prefix_key_values has shapes {keys.shape} and {values.shape}; expected {expected} with "
            f"num_layers={settings.num_layers}, batch={batch_size}, heads={settings.num_heads}, "
            f"head_dim={settings.head_dim}"
        )
    shape = (settings.num_layers, batch_size, num_prefix, settings.num_heads, settings.head_dim)
    return (jnp.broadcast_to(keys, shape), jnp.broadcast_to(values, shape)), num_prefix


def embedding_inputs(input_ids: Array | None, inputs_embeds: Array | None) -> tuple[int, int]:
    """(batch, seq) of the inputs; exactly one of ``input_ids`` and ``inputs_embeds`` must be given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
    return int(shape[0]), int(shape[1])


class _LayerList(nn.Module):
    """The unscanned stack: children named "0", "1", ... so that paths read ``layer/0/...`` like torch."""

    block: type
    settings: EncoderSettings
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, hidden_states, prefix_key_values, attention_mask, deterministic):
        for index in range(self.settings.num_layers):
            layer = self.block(settings=self.settings, dtype=self.dtype, param_dtype=self.param_dtype, name=str(index))
            prefix = None if prefix_key_values is None else (prefix_key_values[0][index], prefix_key_values[1][index])
            hidden_states, _ = layer(hidden_states, prefix, attention_mask, deterministic)
        return hidden_states


class LayerStack(nn.Module):
    """The container of the repeated layers (torch ``encoder`` / ``transformer``); its child is named ``layer``.

    ``layer_class`` is a module class built as ``layer_class(settings=..., dtype=..., param_dtype=...)`` and called as
    ``layer(hidden_states, prefix_key_value, attention_mask, deterministic) -> (hidden_states, None)``.
    """

    layer_class: type
    settings: EncoderSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, hidden_states, attention_mask, prefix_key_values, deterministic: bool):
        block = self.layer_class
        policy = attention.remat_policy_for(self.remat_policy)
        if policy is not None:
            # ``deterministic`` (argument 4, counting the module) is a Python bool; prevent_cse is unneeded in a scan.
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan_layers, static_argnums=(4,))
        if not self.scan_layers:
            layers = _LayerList(block, self.settings, self.dtype, self.param_dtype, name="layer")
            return layers(hidden_states, prefix_key_values, attention_mask, deterministic)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=self.settings.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layers = scanned(settings=self.settings, dtype=self.dtype, param_dtype=self.param_dtype, name="layer")
        hidden_states, _ = layers(hidden_states, prefix_key_values, attention_mask, deterministic)
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion.


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """How a family's parameter tree lines up with its Hugging Face tensor names.

    Attributes:
      prefix: the base model's attribute name in the torch head classes (``"bert"``).
      backbone_modules: top-level module names of the torch base model (``("embeddings", "encoder", "pooler")``).
      layer_stack: path of the repeated layers inside the base model (``("encoder", "layer")``).
      head_modules: head name -> top-level head module names (``{"seq_cls": ("classifier",), ...}``).
      head_drops: head name -> backbone modules that head's torch class does not have (``{"token_cls": ("pooler",)}``).
    """

    prefix: str
    backbone_modules: tuple[str, ...]
    layer_stack: tuple[str, ...]
    head_modules: Mapping[str, tuple[str, ...]]
    head_drops: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def check_head(self, head: str) -> None:
        if head not in self.head_modules:
            raise ValueError(
                f"head {head!r} is not served by the {self.prefix} family; heads: {list(self.head_modules)}"
            )


def _is_norm(module_name: str) -> bool:
    return module_name == "LayerNorm" or module_name.endswith("layer_norm")


def _flax_leaf(module_name: str, hf_leaf: str, tensor: np.ndarray) -> tuple[str, np.ndarray]:
    hf_leaf = {"gamma": "weight", "beta": "bias"}.get(hf_leaf, hf_leaf)  # names of old BERT checkpoints
    if hf_leaf == "bias":
        return "bias", tensor
    if hf_leaf != "weight":
        raise KeyError(hf_leaf)
    if _is_norm(module_name):
        return "scale", tensor
    if module_name.endswith("embeddings"):
        return "embedding", tensor
    return "kernel", tensor.T


def _hf_leaf(flax_leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if flax_leaf == "kernel":
        return "weight", np.ascontiguousarray(value.T)
    return {"scale": "weight", "embedding": "weight", "bias": "bias"}[flax_leaf], value


def _set_nested(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def params_from_hf(
    layout: CheckpointLayout,
    tensors: Mapping[str, np.ndarray],
    num_layers: int,
    head: str,
    scan_layers: bool,
) -> tuple[dict, list[str]]:
    """Hugging Face tensors -> ``({"params": tree}, unused_names)`` for one head of a family (see ``ModelFamily``)."""
    layout.check_head(head)
    head_modules = layout.head_modules[head]
    dropped = set(layout.head_drops.get(head, ()))
    in_head = head != "base"
    params: dict = {}
    unused: list[str] = []
    per_layer: dict[tuple[str, ...], dict[int, tuple[str, np.ndarray]]] = {}
    stack_depth = len(layout.layer_stack)

    for name, tensor in tensors.items():
        parts = tuple(name.split("."))
        if parts[-1] in _BUFFER_NAMES:
            continue
        if parts[0] == layout.prefix:
            parts, is_backbone = parts[1:], True
        else:
            is_backbone = parts[0] in layout.backbone_modules
        known = parts[0] in (layout.backbone_modules if is_backbone else head_modules)
        if len(parts) < 2 or not known or (is_backbone and parts[0] in dropped):
            unused.append(name)
            continue
        try:
            leaf, value = _flax_leaf(parts[-2], parts[-1], np.asarray(tensor))
        except KeyError:
            unused.append(name)
            continue
        module_path = parts[:-1]
        if is_backbone and module_path[:stack_depth] == layout.layer_stack:
            if len(module_path) <= stack_depth + 1 or not module_path[stack_depth].isdigit():
                unused.append(name)
                continue
            index = int(module_path[stack_depth])
            if index >= num_layers:
                unused.append(name)
                continue
            if scan_layers:
                inner = module_path[stack_depth + 1 :] + (leaf,)
                per_layer.setdefault(inner, {})[index] = (name, value)
                continue
        path = module_path + (leaf,)
        if is_backbone and in_head:
            path = (layout.prefix,) + path
        _set_nested(params, path, value)

    stack_path = ((layout.prefix,) if in_head else ()) + layout.layer_stack
    for inner, layers in per_layer.items():
        if len(layers) != num_layers:
            # A stacked leaf needs every layer; report the incomplete ones as unused so the loader sees it missing.
            unused.extend(name for name, _ in layers.values())
            continue
        _set_nested(params, stack_path + inner, np.stack([layers[index][1] for index in range(num_layers)]))
    return {"params": params}, unused


def params_to_hf(
    layout: CheckpointLayout, variables: Mapping[str, Any], head: str, scan_layers: bool
) -> dict[str, np.ndarray]:
    """``{"params": tree}`` -> tensors named as the transformers torch class of ``head`` expects them."""
    layout.check_head(head)
    params = nn.unbox(variables["params"]) if "params" in variables else nn.unbox(variables)
    flat = traverse_util.flatten_dict(params)
    stack_path = ((layout.prefix,) if head != "base" else ()) + layout.layer_stack
    tensors: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        value = np.asarray(value)
        module_path, flax_leaf = path[:-1], path[-1]
        if scan_layers and module_path[: len(stack_path)] == stack_path:
            inner = module_path[len(stack_path) :]
            for index in range(value.shape[0]):
                hf_leaf, tensor = _hf_leaf(flax_leaf, value[index])
                tensors[".".join(stack_path + (str(index),) + inner + (hf_leaf,))] = tensor
            continue
        hf_leaf, tensor = _hf_leaf(flax_leaf, value)
        tensors[".".join(module_path + (hf_leaf,))] = tensor
    return tensors
