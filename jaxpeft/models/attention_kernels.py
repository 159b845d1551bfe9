"""The attention kernels behind ``attention.dot_product_attention``, one per backend, all given the same
``AttentionMask`` (its parts, not a dense array) and all equal to the dense XLA computation:

- ``"xla"``: the scores, softmax and weighted sum written out in XLA on the dense mask (``explicit_attention``); a
  causal mask splits the queries into ``CAUSAL_BLOCKS`` blocks that each skip the keys after their last query;
- ``"xla_chunked"``: the same a block of queries at a time, each block rematerialised in the backward pass, so
  no more than ``(batch, heads, block, keys)`` scores are held (long sequences on CPU, and anywhere else);
- ``"cudnn"``: cuDNN's fused attention on NVIDIA GPUs (``jax.nn.dot_product_attention(implementation="cudnn")``);
- ``"splash"``: the Pallas splash-attention kernel on TPUs.

``choose_implementation`` picks one when the model leaves it open (``attention_implementation=None``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxpeft.models.attention import AttentionMask
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    >>> mask = AttentionMask(jnp.ones((1, 8), jnp.int32), jnp.zeros((), jnp.int32), query_length=8)
    >>> dense = attend(q, k, v, mask.replace(implementation="xla"), scale=0.5)
    >>> chunked = attend(q, k, v, mask.replace(implementation="xla_chunked"), scale=0.5, block_size=3)
    >>> bool(jnp.allclose(dense, chunked, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxpeft.models.attention import AttentionMask

IMPLEMENTATIONS = ("xla", "xla_chunked", "cudnn", "splash")
# Queries per block of the chunked path, and the query × key count above which the CPU choice turns to it.
DEFAULT_BLOCK_SIZE = 512
CHUNKED_ABOVE = 1024 * 1024
# Query blocks of the "xla" kernel under a causal mask without a cache (3/8 of the scores are never computed), for
# sequences of at least CAUSAL_BLOCKS * MIN_CAUSAL_BLOCK queries.
CAUSAL_BLOCKS = 4
MIN_CAUSAL_BLOCK = 16


def check_implementation(implementation: str | None) -> None:
    """A one-line error unless ``implementation`` is None or one of ``IMPLEMENTATIONS``.

    Example:
        >>> check_implementation("flash")
        Traceback (most recent call last):
        ...
        ValueError: attention_implementation='flash' is not one of None (chosen by backend), 'xla', \
'xla_chunked', 'cudnn', 'splash'.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        names = ", ".join(repr(name) for name in IMPLEMENTATIONS)
        raise ValueError(
            f"attention_implementation={implementation!r} is not one of None (chosen by backend), {names}."
        )


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``: ``x`` squashed smoothly into ``(-cap, cap)``; ``x`` itself when ``cap`` is None.

    Example:
        >>> [round(float(v), 2) for v in soft_cap(jnp.array([0.0, 3.0, 1000.0]), 30.0)]
        [0.0, 2.99, 30.0]
    """
    return x if cap is None else jnp.tanh(x / cap) * cap


def explicit_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    dense_mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention with the softmax written out (float32 scores), soft-capping and dropout included.

    ``query`` ``(batch, T, heads, head_dim)``, ``key``/``value`` ``(batch, S, kv_heads, head_dim)``,
    ``dense_mask`` ``(batch, 1, T, S)`` bool; returns ``(batch, T, heads, head_dim)``. The queries that share a key
    head are laid out as one ``(group * T, head_dim)`` matrix per batch row and key head, so the two products are
    one plain matrix product each: on the CPU this runs the forward and backward pass in about half the time of
    ``jax.nn.dot_product_attention``'s layout.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    rows = query.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, num_kv_heads, group * q_len, head_dim)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqh,bksh->bkqs", rows, key, preferred_element_type=jnp.float32) * scale
    logits = soft_cap(logits, logit_softcap)
    mask_rows = dense_mask.shape[0]
    dense_mask = jnp.broadcast_to(dense_mask[:, :, None], (mask_rows, 1, group, q_len, dense_mask.shape[-1]))
    logits = jnp.where(dense_mask.reshape(mask_rows, 1, group * q_len, -1), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (batch, num_kv_heads, group, q_len, key.shape[2]))
        probs = jnp.where(keep.reshape(probs.shape), probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(value.dtype), value)
    out = out.reshape(batch, num_kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)


def causal_block_size(mask: AttentionMask) -> int | None:
    """The query block length with which the ``"xla"`` kernel skips a causal mask's later keys, or None (one block).

    Example:
        >>> from jaxpeft.models.attention import AttentionMask
        >>> mask = AttentionMask(jnp.ones((1, 256), jnp.int32), jnp.zeros((), jnp.int32), query_length=256)
        >>> causal_block_size(mask), causal_block_size(mask.replace(causal=False))
        (64, None)
    """
    if not mask.causal or mask.has_cache or mask.query_length < CAUSAL_BLOCKS * MIN_CAUSAL_BLOCK:
        return None
    return -(-mask.query_length // CAUSAL_BLOCKS)


def xla_attention(
    query, key, value, mask: AttentionMask, *, scale: float, logit_softcap=None, block_size: int | None = None
) -> jax.Array:
    """The XLA attention on the dense mask. Under a causal mask the queries go a block of ``block_size`` (default
    ``causal_block_size``) at a time, each block seeing only the keys up to its last query and keeping its scores
    for the backward pass (about 0.5-0.65 x the time of one block on a CPU, ``benchmarks/RESULTS.md``)."""
    block_size = block_size or causal_block_size(mask)
    if block_size is None:
        return explicit_attention(query, key, value, mask.rows(), scale=scale, logit_softcap=logit_softcap)
    return _query_blocks(query, key, value, mask, scale=scale, logit_softcap=logit_softcap, block_size=block_size,
                         remat=False)


def chunked_attention(
    query, key, value, mask: AttentionMask, *, scale: float, logit_softcap=None, block_size: int = DEFAULT_BLOCK_SIZE
) -> jax.Array:
    """``xla_attention`` a block of ``block_size`` queries at a time.

    Each block is exact (it sees all of its keys), so no running softmax is needed; ``jax.checkpoint`` on the block
    makes the backward pass recompute its scores rather than keep them. Causal blocks look only at the keys up to
    their last query (the prefix and slots before it), which halves the work of a long causal sequence.
    """
    return _query_blocks(query, key, value, mask, scale=scale, logit_softcap=logit_softcap, block_size=block_size,
                         remat=True)


def _query_blocks(query, key, value, mask: AttentionMask, *, scale, logit_softcap, block_size: int, remat: bool):
    query_length = query.shape[1]
    outputs = []
    for start in range(0, query_length, block_size):
        length = min(block_size, query_length - start)
        num_keys = mask.num_keys
        if mask.causal and not mask.has_cache:
            num_keys = mask.num_prefix_tokens + start + length
        block = functools.partial(_chunk, mask=mask, start=start, length=length, num_keys=num_keys, scale=scale,
                                  logit_softcap=logit_softcap)
        outputs.append((jax.checkpoint(block) if remat else block)(query[:, start : start + length], key, value))
    return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


def _chunk(query, key, value, *, mask, start, length, num_keys, scale, logit_softcap):
    dense_mask = mask.rows(start, length)[..., :num_keys]
    return explicit_attention(
        query, key[:, :num_keys], value[:, :num_keys], dense_mask, scale=scale, logit_softcap=logit_softcap
    )


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_DTYPES = (jnp.bfloat16, jnp.float32)
# Splash works on blocks of 128 queries/keys (the TPU's lanes); these are the block sizes it may use, largest first.
SPLASH_BLOCK_SIZES = (512, 256, 128)


def _dtypes(query: jax.Array, key: jax.Array) -> str:
    """``"bfloat16"``, or ``"float32/bfloat16"`` when query and key differ: for the refusals below."""
    names = [jnp.dtype(query.dtype).name, jnp.dtype(key.dtype).name]
    return names[0] if names[0] == names[1] else "/".join(names)


def _plain_causal(mask: AttentionMask) -> bool:
    """Query ``i`` sees keys ``<= i`` in cuDNN's sense (``is_causal``): causal, no cache, no prefix in front."""
    return mask.causal and not mask.has_cache and mask.num_prefix_tokens == 0


def _needs_dense_mask(mask: AttentionMask) -> bool:
    """Whether ``mask.rows()`` hides more than ``is_causal`` (when ``_plain_causal``) or nothing at all does."""
    return (
        mask.given
        or mask.has_cache
        or mask.sliding_window is not None
        or (mask.causal and mask.num_prefix_tokens > 0)
    )


def _cudnn_max_head_dim() -> int:
    """jax's cuDNN flash-attention head-dim limit: 256 on Hopper and later (compute capability 9.0), else 128."""
    if jax.default_backend() != "gpu":
        return 128
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    return 256 if (major, minor) >= (9, 0) else 128


def cudnn_applies(mask: AttentionMask, query: jax.Array, key: jax.Array, logit_softcap=None) -> str | None:
    """None when ``cudnn_attention`` can run these inputs, else the reason it cannot (the limits of
    ``jax._src.cudnn.fused_attention_stablehlo`` for bfloat16/float16 attention).

    Example:
        >>> from jaxpeft.models.attention import AttentionMask
        >>> mask = AttentionMask(jnp.ones((1, 8), jnp.int32), jnp.zeros((), jnp.int32), query_length=8)
        >>> q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
        >>> cudnn_applies(mask, q, q), cudnn_applies(mask, q.astype(jnp.float32), q)
        (None, 'cuDNN attention takes bfloat16 or float16 queries and keys of one dtype, not float32/bfloat16')
    """
    if query.dtype not in CUDNN_DTYPES or key.dtype != query.dtype:
        return f"cuDNN attention takes bfloat16 or float16 queries and keys of one dtype, not {_dtypes(query, key)}"
    head_dim, max_head_dim = query.shape[-1], _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN attention needs a head_dim that is a multiple of 8 and at most {max_head_dim}, not {head_dim}"
    if logit_softcap is not None:
        return "cuDNN attention has no logit soft-capping"
    num_queries, num_keys = query.shape[1], key.shape[1]
    if _needs_dense_mask(mask) and (num_queries % 2 or num_keys % 2):
        return (f"cuDNN attention with a mask (padding, segments, prefix, window or cache) needs even query and key "
                f"lengths, not {num_queries} and {num_keys}")
    return None


def cudnn_attention(query, key, value, mask: AttentionMask, *, scale: float, logit_softcap=None) -> jax.Array:
    """cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``), equal to
    ``xla_attention`` at every query that is not padding.

    A plain causal mask is cuDNN's own ``is_causal`` (no mask array, the masked half skipped); anything more
    (padding, packed segments, prefix key/values, a sliding window, a cache) is passed as the dense
    ``(batch, 1, T, keys)`` ``mask.rows()``, which cuDNN adds as a bias, never holding ``(batch, heads, T, keys)``
    scores. Raises the ``cudnn_applies`` reason when cuDNN cannot run the inputs.
    """
    reason = cudnn_applies(mask, query, key, logit_softcap)
    if reason is not None:
        raise ValueError(f"{reason}.")
    dense_mask = mask.rows() if _needs_dense_mask(mask) else None
    return jax.nn.dot_product_attention(
        query, key, value, mask=dense_mask, scale=scale, is_causal=_plain_causal(mask), implementation="cudnn"
    )


def splash_applies(mask: AttentionMask, query: jax.Array, key: jax.Array, logit_softcap=None) -> str | None:
    """None when ``splash_attention`` computes exactly these inputs' attention, else the reason it cannot.

    Splash masks by segment ids and a static causal mask, so prefix key/values (seen by every segment), a cache
    (queries offset from their keys) and a traced sliding window are beyond it; soft-capping it has.

    Example:
        >>> from jaxpeft.models.attention import AttentionMask
        >>> mask = AttentionMask(jnp.ones((1, 256), jnp.int32), jnp.zeros((), jnp.int32), query_length=256)
        >>> q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
        >>> splash_applies(mask, q, q), splash_applies(mask.replace(query_length=200), q[:, :200], q[:, :200])
        (None, 'splash attention needs query and key lengths that are multiples of 128, not 200 and 200')
    """
    if query.dtype not in SPLASH_DTYPES or key.dtype != query.dtype:
        return f"splash attention takes bfloat16 or float32 queries and keys of one dtype, not {_dtypes(query, key)}"
    if mask.num_prefix_tokens:
        return "splash attention has no prefix key/values (prefix tuning)"
    if mask.has_cache:
        return "splash attention has no key/value cache (decoding)"
    if mask.sliding_window is not None:
        return "splash attention here has no sliding window"
    num_queries, num_keys = query.shape[1], key.shape[1]
    if num_queries % 128 or num_keys % 128:
        return (f"splash attention needs query and key lengths that are multiples of 128, not {num_queries} and "
                f"{num_keys}")
    return None


def _splash_block_size(length: int) -> int:
    """The largest of ``SPLASH_BLOCK_SIZES`` that divides ``length`` (a multiple of 128)."""
    return next(size for size in SPLASH_BLOCK_SIZES if length % size == 0)


def _splash_kernel(num_heads: int, num_queries: int, num_keys: int, causal: bool, logit_softcap, interpret: bool):
    """The splash kernel for one batch row: ``(heads, T, d)`` queries, ``(kv_heads, S, d)`` keys/values."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (num_queries, num_keys)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    block_q, block_kv = _splash_block_size(num_queries), _splash_block_size(num_keys)
    block_sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * num_heads), block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=logit_softcap, interpret=interpret,
    )


def splash_attention(
    query, key, value, mask: AttentionMask, *, scale: float, logit_softcap=None, interpret: bool = False
) -> jax.Array:
    """The Pallas splash-attention kernel (TPU; ``interpret=True`` runs it anywhere, slowly), vmapped over the
    batch, equal to ``xla_attention`` at every query that is not padding.

    Padding and packed documents are splash's segment ids, ``mask.attention_mask`` itself: a padding query then
    sees the padding keys (its output is finite and meaningless). Grouped-query heads are the kernel's own.
    Raises the ``splash_applies`` reason when splash cannot run the inputs.
    """
    reason = splash_applies(mask, query, key, logit_softcap)
    if reason is not None:
        raise ValueError(f"{reason}.")
    num_heads, num_queries, num_keys = query.shape[2], query.shape[1], key.shape[1]
    kernel = _splash_kernel(num_heads, num_queries, num_keys, mask.causal, logit_softcap, interpret)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    query, key, value = heads_first(query * jnp.asarray(scale, query.dtype)), heads_first(key), heads_first(value)
    if mask.given:
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        segments = mask.attention_mask.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
            query, key, value, segments
        )
    else:
        out = jax.vmap(kernel)(query, key, value)
    return heads_first(out)


def choose_implementation(
    mask: AttentionMask, query: jax.Array, key: jax.Array, logit_softcap=None, backend: str | None = None
) -> str:
    """The kernel for ``attention_implementation=None`` on ``backend`` (default ``jax.default_backend()``):
    ``"cudnn"`` on a GPU and ``"splash"`` on a TPU when they apply (``cudnn_applies``, ``splash_applies``), else
    ``"xla_chunked"`` when queries × keys exceed ``CHUNKED_ABOVE``, else ``"xla"``.

    Example:
        >>> from jaxpeft.models.attention import AttentionMask
        >>> mask = AttentionMask(jnp.ones((1, 4096), jnp.int32), jnp.zeros((), jnp.int32), query_length=4096)
        >>> q = jnp.zeros((1, 4096, 2, 8))
        >>> choose_implementation(mask, q, q), choose_implementation(mask.replace(query_length=8), q[:, :8], q)
        ('xla_chunked', 'xla')
        >>> bf16 = q.astype(jnp.bfloat16)
        >>> [choose_implementation(mask, bf16, bf16, backend=name) for name in ("gpu", "tpu", "cpu")]
        ['cudnn', 'splash', 'xla_chunked']
    """
    backend = backend or jax.default_backend()
    if backend == "gpu" and cudnn_applies(mask, query, key, logit_softcap) is None:
        return "cudnn"
    if backend == "tpu" and splash_applies(mask, query, key, logit_softcap) is None:
        return "splash"
    if mask.query_length * key.shape[1] > CHUNKED_ABOVE:
        return "xla_chunked"
    return "xla"


def fused_kernel_refusal(implementation: str, mask: AttentionMask, query, key, logit_softcap=None,
                         backend: str | None = None) -> str | None:
    """Why the fused ``implementation`` (``"cudnn"``/``"splash"``) cannot run here, or None (also for the XLA
    kernels, which run anywhere)."""
    backend = backend or jax.default_backend()
    if implementation == "cudnn":
        if backend != "gpu":
            return f"cuDNN attention needs an NVIDIA GPU, and the backend is {backend!r}"
        return cudnn_applies(mask, query, key, logit_softcap)
    if implementation == "splash":
        if backend != "tpu":
            return f"splash attention needs a TPU, and the backend is {backend!r}"
        return splash_applies(mask, query, key, logit_softcap)
    return None


def check_fused_kernel(implementation: str, mask: AttentionMask, query, key, logit_softcap=None) -> None:
    """A one-line ``ValueError`` when the kernel named by the user cannot run these inputs here.

    Example:
        >>> from jaxpeft.models.attention import AttentionMask
        >>> mask = AttentionMask(jnp.ones((1, 8), jnp.int32), jnp.zeros((), jnp.int32), query_length=8)
        >>> q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
        >>> check_fused_kernel("cudnn", mask, q, q)
        Traceback (most recent call last):
        ...
        ValueError: attention_implementation='cudnn' cannot run here: cuDNN attention needs an NVIDIA GPU, and the \
backend is 'cpu'; use attention_implementation=None (chosen by backend) or 'xla_chunked' (long sequences).
    """
    reason = fused_kernel_refusal(implementation, mask, query, key, logit_softcap)
    if reason is not None:
        raise ValueError(
            f"attention_implementation={implementation!r} cannot run here: {reason}; use "
            "attention_implementation=None (chosen by backend) or 'xla_chunked' (long sequences)."
        )


def attend(query, key, value, mask: AttentionMask, *, scale: float, logit_softcap=None, block_size=None):
    """Attention by ``mask.implementation`` (or the one ``choose_implementation`` picks); ``key``/``value`` hold
    the prefix key/values in front. Returns ``(batch, T, heads, head_dim)``. ``block_size`` is the query block of
    the XLA kernels (default: ``DEFAULT_BLOCK_SIZE`` for ``"xla_chunked"``, ``causal_block_size`` for ``"xla"``).

    A ``"cudnn"`` or ``"splash"`` named by the user that cannot run these inputs is a one-line ``ValueError``.
    """
    implementation = mask.implementation or choose_implementation(mask, query, key, logit_softcap)
    check_fused_kernel(implementation, mask, query, key, logit_softcap)
    if implementation == "cudnn":
        return cudnn_attention(query, key, value, mask, scale=scale)
    if implementation == "splash":
        return splash_attention(query, key, value, mask, scale=scale, logit_softcap=logit_softcap)
    if implementation == "xla_chunked":
        return chunked_attention(query, key, value, mask, scale=scale, logit_softcap=logit_softcap,
                                 block_size=block_size or DEFAULT_BLOCK_SIZE)
    return xla_attention(query, key, value, mask, scale=scale, logit_softcap=logit_softcap, block_size=block_size)
