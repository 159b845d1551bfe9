"""Attention and the layer stack shared by the decoder families: masks, prefix key/values, the key/value cache,
scanned or unrolled layers with optional rematerialisation.

Positions along the key axis are *cache slots*: without a cache the slots are the positions of the sequence
(``0..T-1``); with a cache of length ``S`` the ``T`` new tokens go to slots ``index..index+T-1``. A query may
attend to a key when the key's slot is not after its own (causal), lies within the sliding window if there is
one, and the key is not padding. Prefix key/values (prefix tuning) sit in front of all slots and are always
attended; they move no position of the real tokens.

Example:
    >>> import jax.numpy as jnp
    >>> mask = AttentionMask(jnp.array([[0, 1, 1]]), jnp.zeros((), jnp.int32), query_length=3, num_prefix_tokens=2)
    >>> mask.rows().shape, mask.rows()[0, 0, 2].tolist()
    ((1, 1, 3, 5), [True, True, False, True, True])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxpeft.models import attention_kernels
from jaxpeft.models.attention_kernels import soft_cap  # noqa: F401  (re-exported: the families' soft-capping)

# Per layer {"key": (batch, slots, kv_heads, head_dim), "value": ...}; for scanned layers one such dict whose
# arrays carry a leading layer axis, otherwise a tuple with one dict per layer.
LayerCache = dict[str, jax.Array]


@flax.struct.dataclass
class KVCache:
    """A preallocated key/value cache and the slot where the next tokens go (same for every row)."""

    layers: Any
    index: jax.Array


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What ``init_cache`` needs to know about a decoder; ``module.cache_spec()`` returns it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    scan_layers: bool
    dtype: Any = jnp.float32


def init_cache(spec: CacheSpec, batch_size: int, max_length: int) -> KVCache:
    """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens.

    Example:
        >>> cache = init_cache(CacheSpec(2, 4, 8, scan_layers=True), batch_size=1, max_length=16)
        >>> cache.layers["key"].shape
        (2, 1, 16, 4, 8)
    """
    shape = (batch_size, max_length, spec.num_kv_heads, spec.head_dim)
    if spec.scan_layers:
        shape = (spec.num_layers, *shape)
        layers = {"key": jnp.zeros(shape, spec.dtype), "value": jnp.zeros(shape, spec.dtype)}
    else:
        layers = tuple(
            {"key": jnp.zeros(shape, spec.dtype), "value": jnp.zeros(shape, spec.dtype)} for _ in range(spec.num_layers)
        )
    return KVCache(layers=layers, index=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query sees, kept as its parts, so that an attention kernel can use the structure (causal,
    sequence lengths, segments) rather than a dense ``(batch, 1, queries, keys)`` array.

    ``attention_mask`` is ``(batch, slots)``: 0 where the key slot is padding, else the slot's *segment*: 1 for
    every token of an ordinary batch, ``1, 2, 3, ...`` for the documents packed into one row. A query sees a key
    when the key is not padding, lies in the query's segment (a padding query sees every segment), is not in a
    later slot (``causal``), and lies within ``sliding_window`` slots of the query if that is set. The
    ``num_prefix_tokens`` prefix key/values come first and are seen by every query.

    Attributes:
        attention_mask: ``(batch, slots)`` int, as above (1 also for empty cache slots, which ``causal`` hides).
        query_offset: ``()`` int32, the slot of the first query (the cache index when decoding, else 0).
        sliding_window: ``()`` int32 or None: how many recent slots (the query's own included) a query sees.
        query_length: number of queries.
        num_prefix_tokens: prefix key/values in front of the slots.
        causal: hide keys in later slots.
        has_cache: the slots are a cache's (``query_offset`` may be nonzero and ``slots`` exceed the queries).
        given: an ``attention_mask`` was passed (False: every slot holds a token, so kernels may skip masking).
        implementation: the kernel: ``"xla"``, ``"xla_chunked"``, ``"cudnn"``, ``"splash"``, or None to choose
            by backend and shape (``attention_kernels.choose_implementation``).
    """

    attention_mask: jax.Array
    query_offset: jax.Array
    sliding_window: jax.Array | None = None
    query_length: int = flax.struct.field(pytree_node=False, default=1)
    num_prefix_tokens: int = flax.struct.field(pytree_node=False, default=0)
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    has_cache: bool = flax.struct.field(pytree_node=False, default=False)
    given: bool = flax.struct.field(pytree_node=False, default=True)
    implementation: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_keys(self) -> int:
        """Prefix key/values plus slots: the key axis of the attention."""
        return self.num_prefix_tokens + self.attention_mask.shape[1]

    def query_segments(self, start: int = 0, length: int | None = None) -> jax.Array:
        """``(batch, length)``: the ``attention_mask`` entry of queries ``start..start+length-1``."""
        length = self.query_length - start if length is None else length
        if not self.has_cache:
            return self.attention_mask[:, start : start + length]
        return jax.lax.dynamic_slice_in_dim(self.attention_mask, self.query_offset + start, length, axis=1)

    def rows(self, start: int = 0, length: int | None = None) -> jax.Array:
        """The boolean ``(batch, 1, length, num_keys)`` mask of queries ``start..start+length-1``; ``rows()`` is
        the whole dense mask."""
        length = self.query_length - start if length is None else length
        batch_size, num_slots = self.attention_mask.shape
        query_slots = self.query_offset + start + jnp.arange(length)[:, None]
        key_slots = jnp.arange(num_slots)[None, :]
        allowed = jnp.ones((length, num_slots), bool)
        if self.causal:
            allowed &= key_slots <= query_slots
        if self.sliding_window is not None:
            allowed &= query_slots - key_slots < self.sliding_window
        key_segments = self.attention_mask[:, None, None, :]
        query_segments = self.query_segments(start, length)[:, None, :, None]
        same_segment = (query_segments == 0) | (query_segments == key_segments)
        mask = allowed[None, None, :, :] & (key_segments != 0) & same_segment
        if self.num_prefix_tokens:
            prefix = jnp.ones((batch_size, 1, length, self.num_prefix_tokens), bool)
            mask = jnp.concatenate([prefix, mask], axis=-1)
        return mask


def write_cache(layer_cache: LayerCache, key: jax.Array, value: jax.Array, index: jax.Array):
    """Writes the new ``key``/``value`` ``(batch, T, kv_heads, head_dim)`` at slot ``index``.

    Returns ``(new_layer_cache, all_keys, all_values)`` where the latter two span every slot of the cache.
    """
    start = (0, index, 0, 0)
    keys = jax.lax.dynamic_update_slice(layer_cache["key"], key.astype(layer_cache["key"].dtype), start)
    values = jax.lax.dynamic_update_slice(layer_cache["value"], value.astype(layer_cache["value"].dtype), start)
    return {"key": keys, "value": values}, keys, values


class SequenceTooLongError(ValueError):
    """An input that needs more positions than a model's learned position table has, refused at trace time.

    ``num_tokens`` is the input's length (virtual tokens, which prompt tuning puts in front, included) and
    ``max_tokens`` the most the model takes; prompt tuning reads both to say how far to shorten.
    """

    def __init__(self, message: str, num_tokens: int, max_tokens: int):
        super().__init__(message)
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


def check_sequence_length(num_tokens: int, table_size: int, option: str, first_position: int = 0) -> None:
    """Refuses ``num_tokens`` default positions from ``first_position`` on when they run past a learned position
    table of ``table_size`` rows (the model config's ``option``): an embedding lookup past the table reads NaN.

    Sequence lengths are static under ``jit``, so this costs nothing when the compiled function runs.

    Example:
        >>> check_sequence_length(40, 32, "n_positions")
        Traceback (most recent call last):
        ...
        jaxpeft.models.attention.SequenceTooLongError: the input has 40 tokens but this model takes at most 32 \
(n_positions=32); truncate it, e.g. tokenize(..., max_length=32).
    """
    max_tokens = table_size - first_position
    if num_tokens > max_tokens:
        offset = f", positions starting at {first_position}" if first_position else ""
        raise SequenceTooLongError(
            f"the input has {num_tokens} tokens but this model takes at most {max_tokens} ({option}={table_size}"
            f"{offset}); truncate it, e.g. tokenize(..., max_length={max_tokens}).",
            num_tokens,
            max_tokens,
        )


def check_prefix_key_values(prefix_key_values, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int):
    """Raises a one-line error unless ``prefix_key_values`` is ``(keys, values)`` of the documented shape."""
    if prefix_key_values is None:
        return 0
    if not isinstance(prefix_key_values, (tuple, list)) or len(prefix_key_values) != 2:
        raise ValueError(
            "prefix_key_values must be a (keys, values) pair of arrays shaped "
            "(num_layers, batch, num_virtual_tokens, kv_heads, head_dim)."
        )
    keys, values = prefix_key_values
    num_virtual = keys.shape[2] if keys.ndim == 5 else -1
    expected = (num_layers, batch_size, num_virtual, num_kv_heads, head_dim)
    for name, array in (("keys", keys), ("values", values)):
        if tuple(array.shape) != expected:
            raise ValueError(
                f"prefix_key_values {name} have shape {tuple(array.shape)}; expected "
                f"(num_layers, batch, num_virtual_tokens, kv_heads, head_dim) = {expected}."
            )
    return num_virtual


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: AttentionMask | jax.Array,
    *,
    prefix_key_value: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention; returns ``(batch, T, heads, head_dim)``.

    ``query`` is ``(batch, T, heads, head_dim)``, ``key``/``value`` ``(batch, S, kv_heads, head_dim)``, ``mask``
    an ``AttentionMask`` (the kernel follows its ``implementation``, see ``attention_kernels``) or a dense boolean
    ``(batch, 1, T, P + S)`` array (XLA). ``prefix_key_value`` is this layer's ``(keys, values)`` of shape
    ``(batch, P, kv_heads, head_dim)``, put in front of ``key``/``value``. ``logit_softcap`` caps the scaled
    scores as ``cap * tanh(scores / cap)`` before the mask (Gemma 2). Attention dropout (training only) takes the
    explicit softmax on the dense mask.
    """
    if prefix_key_value is not None:
        prefix_key, prefix_value = prefix_key_value
        key = jnp.concatenate([prefix_key.astype(key.dtype), key], axis=1)
        value = jnp.concatenate([prefix_value.astype(value.dtype), value], axis=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    if isinstance(mask, AttentionMask) and not use_dropout:
        return attention_kernels.attend(query, key, value, mask, scale=scale, logit_softcap=logit_softcap)
    dense_mask = mask.rows() if isinstance(mask, AttentionMask) else mask
    return attention_kernels.explicit_attention(
        query, key, value, dense_mask, scale=scale, logit_softcap=logit_softcap,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
    )


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy_for(name: str | None):
    """``jax.checkpoint_policies`` policy for a ``remat_policy`` name; ``None`` means no rematerialisation."""
    if name is None or name == "none":
        return None
    if name not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {name!r}; choose one of {sorted(REMAT_POLICIES)} or None.")
    return REMAT_POLICIES[name]


class UnrolledLayers(nn.Module):
    """The layers one after another, each a child named ``"0"``, ``"1"``, ... like a torch ``ModuleList``.

    Called like a scanned stack: ``(hidden, mask, rope, cache_index, deterministic, caches, prefix_key_values)``
    with ``caches`` a tuple of per-layer caches (or ``None``) and ``prefix_key_values`` stacked over layers.
    """

    block_cls: Any
    num_layers: int
    block_kwargs: Any

    @nn.compact
    def __call__(self, hidden, mask, rope, cache_index, deterministic, caches, prefix_key_values):
        new_caches = []
        for i in range(self.num_layers):
            layer_cache = None if caches is None else caches[i]
            layer_prefix = None if prefix_key_values is None else (prefix_key_values[0][i], prefix_key_values[1][i])
            block = self.block_cls(**self.block_kwargs, name=str(i))
            hidden, layer_cache = block(hidden, mask, rope, cache_index, deterministic, layer_cache, layer_prefix)
            new_caches.append(layer_cache)
        return hidden, None if caches is None else tuple(new_caches)


def layer_stack(block_cls, *, num_layers: int, scan_layers: bool, remat_policy: str | None, name: str, **kwargs):
    """The module holding ``num_layers`` blocks under ``name`` (``"h"``, ``"layers"``), scanned or unrolled.

    ``block_cls.__call__(hidden, mask, rope, cache_index, deterministic, layer_cache, layer_prefix)`` must return
    ``(hidden, layer_cache)``. Scanned, the parameters carry a leading layer axis (logical name ``"layers"``) and
    the cache and prefix key/values are scanned over along their leading axis too.
    """
    policy = remat_policy_for(remat_policy)
    if policy is not None:
        # Argument 5 (counting self) is `deterministic`, a Python bool that must stay static.
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not scan_layers, static_argnums=(5,))
    if not scan_layers:
        return UnrolledLayers(block_cls=block_cls, num_layers=num_layers, block_kwargs=kwargs, name=name)
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(**kwargs, name=name)


def cache_length(cache: KVCache) -> int:
    """Number of slots of ``cache``."""
    layers = cache.layers
    return layers["key"].shape[2] if isinstance(layers, Mapping) else layers[0]["key"].shape[1]


def prepare_decoder_inputs(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    cache: KVCache | None,
    *,
    num_prefix_tokens: int = 0,
    sliding_window: int | jax.Array | None = None,
    implementation: str | None = None,
):
    """``(mask, position_ids, cache_index)`` for one decoder call, ``mask`` an ``AttentionMask``.

    Without a cache ``attention_mask`` is ``(batch, seq)`` and positions default to ``0..seq-1`` (as in
    transformers' forward). With a cache it covers all cache slots ``(batch, slots)`` and positions default to
    the slots of the new tokens. Its entries are 0 for padding and a segment id otherwise: 1 throughout for an
    ordinary batch, ``1, 2, ...`` for the documents packed into a row (they do not see each other; their
    ``position_ids`` restart, see ``data.pack_examples``).
    """
    batch_size, seq_len = input_ids.shape
    cache_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    num_slots = seq_len if cache is None else cache_length(cache)
    given = attention_mask is not None
    if attention_mask is None:
        attention_mask = jnp.ones((batch_size, num_slots), jnp.int32)
    if attention_mask.shape != (batch_size, num_slots):
        what = "(batch, seq) like input_ids" if cache is None else "(batch, cache slots) when a cache is given"
        expected = (batch_size, num_slots)
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {what}: {expected}.")
    attention_kernels.check_implementation(implementation)
    if position_ids is None:
        position_ids = jnp.broadcast_to(cache_index + jnp.arange(seq_len), (batch_size, seq_len))
    mask = AttentionMask(
        attention_mask=jnp.asarray(attention_mask),
        query_offset=cache_index,
        sliding_window=None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32),
        query_length=seq_len,
        num_prefix_tokens=num_prefix_tokens,
        has_cache=cache is not None,
        given=given,
        implementation=implementation,
    )
    return mask, position_ids, cache_index


def token_ids_of(input_ids, inputs_embeds):
    """``input_ids``, or zeros of the ``(batch, seq)`` shape that ``inputs_embeds`` stands for (used for shapes)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return input_ids if inputs_embeds is None else jnp.zeros(inputs_embeds.shape[:2], jnp.int32)


def pool_last_token(
    hidden: jax.Array, input_ids: jax.Array | None, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
    """Hidden state of each row's last token: the last that ``attention_mask`` keeps when there is a mask (right
    or left padding, whatever id pads), else the last that is not ``pad_token_id`` (transformers' decoder pooling),
    else (no ``input_ids`` or no pad token) the last position.

    Example:
        >>> hidden = jnp.arange(4.0)[None, :, None]
        >>> ids = jnp.array([[5, 6, 9, 9]])
        >>> [float(pool_last_token(hidden, ids, mask, 0)[0, 0]) for mask in (jnp.array([[1, 1, 0, 0]]), None)]
        [1.0, 3.0]
        >>> float(pool_last_token(hidden, ids, None, 9)[0, 0])
        1.0
    """
    if attention_mask is not None:
        is_token = jnp.asarray(attention_mask) != 0
    elif input_ids is not None and pad_token_id is not None:
        is_token = jnp.asarray(input_ids) != pad_token_id
    else:
        return hidden[:, -1]
    positions = jnp.arange(hidden.shape[1])
    last = jnp.argmax(positions * is_token, axis=-1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def dense(config, features: int, axes: tuple, name: str, dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    """A decoder's ``nn.Dense`` initialised like transformers' ``nn.Linear`` (normal(``initializer_range``)
    kernel, zero bias), its parameters annotated with the logical ``axes`` (kernel) and ``axes[-1]`` (bias)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nn.initializers.normal(config.initializer_range), *axes),
        bias_init=logical(nn.initializers.zeros_init(), axes[-1]),
        name=name,
    )


def logical(init, *axes: str | None):
    """``init`` annotated with logical axis names (``nn.with_logical_partitioning``)."""
    return nn.with_logical_partitioning(init, axes)
