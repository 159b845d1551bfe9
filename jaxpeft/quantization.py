"""Quantized frozen base weights (QLoRA): NF4/FP4 as bitsandbytes stores them, and int8/int4 with group scales.

A quantized weight is a ``QuantizedArray``: a pytree of its packed codes and block scales, which ``jit``,
``nn.scan``, sharding and checkpoints treat like any array tree. It is a flax ``AxisMetadata`` box, so every linen
layer -- stock or written with ``self.param`` -- receives the dequantized weight when it reads the parameter, inside
the jitted computation; nothing else in a model changes. Every adapter method therefore works on a quantized layer.

Layout: each weight is quantized as the torch ``(out, in)`` matrix of each of its slices (leading stacking axes,
such as ``nn.scan`` layers or experts, are kept apart), flattened row-major and cut into blocks of ``block_size``
values, exactly as bitsandbytes does. NF4/FP4 dequantized values therefore equal bitsandbytes' bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4", "int8", "int4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK = 256  # bitsandbytes' double quantization: the block absmax values in blocks of 256, 8-bit dynamic
DEFAULT_SKIP_MODULES = ("lm_head", "score", "classifier", "qa_outputs")
DEQUANTIZED = "jaxpeft_dequantized"  # the checkpoint name of every dequantized weight

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# The FP4 (e2m1) values of bitsandbytes in its code order, normalised to [-1, 1].
FP4_CODE = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                     np.float32) / np.float32(12.0)).astype(np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` (a fused multiply-add from the start for the first half, from the end for the
    second): the exact values bitsandbytes' code book is built from."""
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
    index = np.arange(steps, dtype=np.float64)
    low = (np.float64(np.float32(start)) + step * index).astype(np.float32)
    high = (np.float64(np.float32(end)) - step * (steps - 1 - index)).astype(np.float32)
    return np.where(np.arange(steps) < steps // 2, low, high)


def dynamic_code() -> np.ndarray:
    """The signed 8-bit dynamic code book of bitsandbytes (``create_dynamic_map()``), sorted; 256 float32 values."""
    values: list[np.ndarray] = []
    for exponent in range(7):
        boundaries = _linspace32(0.1, 1.0, 2 ** exponent + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10.0 ** (exponent - 6))
        values += [(scale * means).astype(np.float32), (-scale * means).astype(np.float32)]
    values.append(np.array([0.0, 1.0], np.float32))
    return np.sort(np.concatenate(values)).astype(np.float32)


DYNAMIC_CODE = dynamic_code()


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How base weights are quantized.

    Attributes:
        quant_type: ``"nf4"`` or ``"fp4"`` (bitsandbytes' 4-bit code books, absmax blocks), ``"int8"`` or ``"int4"``
            (symmetric integers with one float32 scale per block).
        block_size: values per block, along each output row of the weight (as bitsandbytes' blocks); ``None`` for
            int8/int4 takes one scale per output channel.
        double_quant: NF4/FP4 only: the block absmax values themselves quantized to 8 bits (bitsandbytes'
            ``bnb_4bit_use_double_quant``), saving about 0.4 bit per weight.
        compute_dtype: dtype of the dequantized weights; ``None`` keeps each weight's own float dtype.
        skip_modules: module names (last path part, or regular expressions over the dotted path) kept in float;
            ``None`` keeps the usual heads (``lm_head``, ``score``, ``classifier``, ``qa_outputs``).

    Example:
        >>> import jaxpeft
        >>> jaxpeft.QuantizationConfig("nf4", double_quant=True).quant_type
        'nf4'
    """

    quant_type: str = "nf4"
    block_size: int | None = 64
    double_quant: bool = False
    compute_dtype: Any = None
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.block_size is None and self.quant_type in ("nf4", "fp4"):
            raise ValueError(f"{self.quant_type} needs a block_size (bitsandbytes uses 64); per-channel scales "
                             "(block_size=None) are for int8 and int4")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} or None, got {self.block_size!r}")
        if self.double_quant and self.quant_type not in ("nf4", "fp4"):
            raise ValueError("double_quant applies to nf4 and fp4 only (the block absmax values of bitsandbytes)")
        if isinstance(self.skip_modules, str):
            object.__setattr__(self, "skip_modules", (self.skip_modules,))
        elif self.skip_modules is not None:
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype).name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Codes and blocks: pure functions over flat float32 rows (one row per stacked slice).
# --------------------------------------------------------------------------------------------------------------


def _blocks(flat: jax.Array, block: int) -> jax.Array:
    """``(..., n)`` zero-padded to whole blocks, as ``(..., n_blocks, block)``."""
    n = flat.shape[-1]
    padded = -(-n // block) * block
    flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, padded - n)])
    return flat.reshape(flat.shape[:-1] + (padded // block, block))


def _block_absmax(flat: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """The blocks of ``flat`` and their absolute maxima (float32)."""
    blocks = _blocks(flat.astype(jnp.float32), block)
    return blocks, jnp.max(jnp.abs(blocks), axis=-1)


def _scaled(flat: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Values divided by their block's absmax, clipped to [-1, 1], as bitsandbytes scales 4-bit weights: full
    blocks times the reciprocal, the partial last block divided."""
    n = flat.shape[-1]
    blocks, absmax = _block_absmax(flat, block)
    safe = jnp.maximum(absmax, 1e-38)[..., None]
    scaled = blocks * (1.0 / safe)
    if n % block:
        last = blocks[..., -1:, :] / safe[..., -1:, :]
        scaled = jnp.concatenate([scaled[..., :-1, :], last], axis=-2)
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(flat.shape[:-1] + (-1,))[..., :n]
    return scaled, absmax


def _nearest(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index into ``code`` of each value's nearest entry, ties resolved as ``torch.bucketize`` over midpoints."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    midpoints = ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32)
    position = jnp.searchsorted(jnp.asarray(midpoints), scaled, side="left")
    return jnp.asarray(order.astype(np.uint8))[position]


def _pack(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte, the first in the high half (an odd count padded with code 0)."""
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    codes = codes.astype(jnp.uint8)
    return (codes[..., ::2] << 4) | codes[..., 1::2]


def _unpack(packed: jax.Array, n: int) -> jax.Array:
    """The first ``n`` 4-bit codes of ``packed``."""
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :n].astype(jnp.int32)


def _times_blocks(values: jax.Array, scales: jax.Array, block: int) -> jax.Array:
    """``values`` (float32, ``(..., n)``) times the scale of their block."""
    n = values.shape[-1]
    return (_blocks(values, block) * scales[..., None]).reshape(values.shape[:-1] + (-1,))[..., :n]


def _nearest_left_biased(normed: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest entry of the sorted ``code``, a tie going left (bitsandbytes' CPU 8-bit search)."""
    table = jnp.asarray(code)
    left = jnp.clip(jnp.searchsorted(table, normed, side="right") - 1, 0, len(code) - 2)
    go_right = jnp.abs(normed - table[left + 1]) < jnp.abs(normed - table[left])
    return (left + go_right).astype(jnp.uint8)


def _double_quantize(absmax: jax.Array) -> dict[str, jax.Array]:
    """bitsandbytes' nested statistics of each slice's block absmax values: mean offset, 8-bit dynamic codes in
    blocks of 256 (each value divided by its block's absmax) and their float32 absmax."""
    offset = jnp.mean(absmax, axis=-1)
    n = absmax.shape[-1]
    blocks, nested_absmax = _block_absmax(absmax - offset[..., None], NESTED_BLOCK)
    normed = (blocks / jnp.where(nested_absmax == 0, 1.0, nested_absmax)[..., None])
    normed = normed.reshape(absmax.shape[:-1] + (-1,))[..., :n]
    return {"scales": _nearest_left_biased(normed, DYNAMIC_CODE), "nested_scales": nested_absmax, "offset": offset}


def _nested_absmax(leaf: QuantizedArray) -> jax.Array:
    codes = jnp.asarray(DYNAMIC_CODE)[leaf.scales.astype(jnp.int32)]
    return _times_blocks(codes, leaf.nested_scales, NESTED_BLOCK) + leaf.offset[..., None]


# --------------------------------------------------------------------------------------------------------------
# The quantized leaf
# --------------------------------------------------------------------------------------------------------------


class QuantizedArray(flax.struct.PyTreeNode, nn.meta.AxisMetadata):
    """A quantized weight: packed codes and block scales; reading it as a linen parameter dequantizes it.

    ``codes``, ``scales`` and the optional ``nested_scales``/``offset`` (double quantization) or ``offsets``
    (affine formats) have ``stack`` leading axes, then one flat axis over each slice's stored matrix. The static
    fields say how the stored matrix (``stored_shape``, row-major) becomes the weight: ``perm`` permutes its axes to
    the weight's per-slice axes. ``dtype`` is the dtype of the dequantized weight.

    Example:
        >>> import jax, jaxpeft
        >>> kernel = jax.random.normal(jax.random.key(0), (128, 32))
        >>> quantized = jaxpeft.quantization.quantize_array(kernel, jaxpeft.QuantizationConfig("nf4"))
        >>> quantized.shape, quantized.codes.dtype, quantized.dequantize().shape
        ((128, 32), dtype('uint8'), (128, 32))
    """

    codes: jax.Array
    scales: jax.Array
    nested_scales: jax.Array | None = None
    offset: jax.Array | None = None
    offsets: jax.Array | None = None
    quant_type: str = flax.struct.field(pytree_node=False, default="nf4")
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    stored_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    perm: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    stack_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype_name: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + tuple(self.stored_shape[axis] for axis in self.perm)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and all scales."""
        return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    @property
    def T(self) -> QuantizedArray:  # noqa: N802 (numpy's name)
        if self.stack_shape or len(self.perm) != 2:
            raise ValueError(f"transpose a 2-D unstacked QuantizedArray only, not shape {self.shape}")
        return self.replace(perm=self.perm[::-1])

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The weight as an array of ``dtype`` (default: its compute dtype)."""
        return dequantize(self, dtype)

    def unbox(self) -> jax.Array:
        pinned = (_PINNED.get() or {}).get(id(self))
        if pinned is not None and pinned[0] is self:
            return pinned[1]
        return checkpoint_name(dequantize(self), DEQUANTIZED)

    def replace_boxed(self, val: Any) -> QuantizedArray:
        """``val`` quantized like this weight (a changed base weight, e.g. PiSSA's residual, stays quantized)."""
        return val if is_quantized(val) else requantize_like(jnp.asarray(val), self)

    def add_axis(self, index: int, params: dict[Any, Any]) -> QuantizedArray:
        if index > len(self.stack_shape):
            raise ValueError(f"a QuantizedArray stacks on its leading axes only, not axis {index}")
        size = self.codes.shape[index]
        return self.replace(stack_shape=self.stack_shape[:index] + (size,) + self.stack_shape[index:])

    def remove_axis(self, index: int, params: dict[Any, Any]) -> QuantizedArray:
        if index >= len(self.stack_shape):
            raise ValueError(f"a QuantizedArray is sliced on its leading axes only, not axis {index}")
        return self.replace(stack_shape=self.stack_shape[:index] + self.stack_shape[index + 1:])

    def __repr__(self) -> str:
        return f"QuantizedArray({self.quant_type}, shape={self.shape}, dtype={self.dtype_name})"


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedArray)


# Quantized parameters dequantized once for the block of ``pinning()`` that is open: id -> (box, weight).
_PINNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxpeft_pinned_weights", default=None)


@contextlib.contextmanager
def pinning():
    """A block within which ``pin`` fixes what a quantized parameter reads as: a module call traced to a jaxpr
    then sees the very array its parameters were read as before (and dropped when the block ends, so no traced
    value outlives it)."""
    token = _PINNED.set(dict(_PINNED.get() or {}))
    try:
        yield
    finally:
        _PINNED.reset(token)


def pin(leaf: Any) -> Any:
    """The value of a parameter leaf (unboxed); a quantized one dequantized and, inside ``pinning()``, read as
    that same array until the block ends."""
    if not is_quantized(leaf):
        return nn.meta.unbox(leaf)
    pinned = _PINNED.get()
    if pinned is None:
        return leaf.unbox()
    if id(leaf) not in pinned or pinned[id(leaf)][0] is not leaf:
        pinned[id(leaf)] = (leaf, checkpoint_name(dequantize(leaf), DEQUANTIZED))
    return pinned[id(leaf)][1]


def _levels(leaf: QuantizedArray, n: int) -> jax.Array:
    """The codes of each slice as float32 levels, before block scaling."""
    if leaf.quant_type in ("nf4", "fp4"):
        table = NF4_CODE if leaf.quant_type == "nf4" else FP4_CODE
        return jnp.asarray(table)[_unpack(leaf.codes, n)]
    if leaf.quant_type in ("int4", "uint4"):
        codes = _unpack(leaf.codes, n).astype(jnp.float32)
        return codes - 8.0 if leaf.quant_type == "int4" else codes
    return leaf.codes.astype(jnp.float32)


def dequantize(leaf: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The float weight of a ``QuantizedArray`` (computed in float32, then cast to ``dtype`` or its own).

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> q = jaxpeft.quantization.quantize_array(jnp.eye(64), jaxpeft.QuantizationConfig("int8"))
        >>> float(jaxpeft.quantization.dequantize(q)[3, 3])
        1.0
    """
    n = math.prod(leaf.stored_shape)
    scales = _nested_absmax(leaf) if leaf.nested_scales is not None else leaf.scales.astype(jnp.float32)
    values = _times_blocks(_levels(leaf, n), scales, leaf.block_size)
    if leaf.offsets is not None:
        values = values + jnp.repeat(leaf.offsets.astype(jnp.float32), leaf.block_size, axis=-1)[..., :n]
    stack = leaf.codes.shape[:-1]
    matrix = values.reshape(stack + leaf.stored_shape)
    weight = jnp.transpose(matrix, tuple(range(len(stack))) + tuple(len(stack) + axis for axis in leaf.perm))
    return weight.astype(leaf.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------------------------
# Quantizing
# --------------------------------------------------------------------------------------------------------------


def _quantize_rows(rows: jax.Array, quant_type: str, block: int, double_quant: bool) -> dict[str, jax.Array]:
    """The children of a QuantizedArray for flat float rows ``(..., n)``."""
    if quant_type in ("nf4", "fp4"):
        scaled, absmax = _scaled(rows, block)
        if scaled.shape[-1] % 2:  # an odd count is padded with the code of 0, as bitsandbytes pads
            scaled = jnp.pad(scaled, [(0, 0)] * (scaled.ndim - 1) + [(0, 1)])
        children = {"codes": _pack(_nearest(scaled, NF4_CODE if quant_type == "nf4" else FP4_CODE)),
                    "scales": absmax}
        if double_quant:
            children.update(_double_quantize(absmax))
        return children
    levels = 127.0 if quant_type == "int8" else 7.0
    blocks, absmax = _block_absmax(rows, block)
    scale = absmax / levels
    codes = jnp.round(blocks / jnp.where(scale == 0, 1.0, scale)[..., None])
    codes = jnp.clip(codes, -levels, levels).reshape(rows.shape[:-1] + (-1,))[..., :rows.shape[-1]]
    if quant_type == "int8":
        return {"codes": codes.astype(jnp.int8), "scales": scale}
    return {"codes": _pack((codes + 8).astype(jnp.uint8)), "scales": scale}


def _stored_layout(shape: tuple[int, ...], n_stack: int, n_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stored per-slice shape, permutation back to the weight's axes) for a weight of ``shape`` whose slices are
    ``(in axes..., out axes...)``: stored as ``(out..., in...)``, the torch layout."""
    per_slice = shape[n_stack:]
    n_out = len(per_slice) - n_in
    stored = per_slice[n_in:] + per_slice[:n_in]
    perm = tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))
    return stored, perm


def quantize_array(weight: Any, qconfig: QuantizationConfig, *, stack_axes: int | None = None,
                   in_axes: int = 1) -> QuantizedArray:
    """A ``QuantizedArray`` of a float weight laid out ``(stack..., in..., out...)`` (a linen ``Dense`` kernel).

    ``stack_axes`` leading axes (default: all but the last two) are quantized slice by slice; ``in_axes`` axes
    after them are the contracted input axes. Each slice is quantized as its torch ``(out, in)`` matrix.

    Example:
        >>> import jax, jaxpeft
        >>> kernel = jax.random.normal(jax.random.key(0), (4, 64, 32))   # 4 scanned layers
        >>> q = jaxpeft.quantization.quantize_array(kernel, jaxpeft.QuantizationConfig("int4", block_size=32))
        >>> q.stack_shape, q.codes.shape
        ((4,), (4, 1024))
    """
    weight = jnp.asarray(weight)
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(f"only float weights can be quantized, not {weight.dtype}")
    n_stack = max(weight.ndim - 2, 0) if stack_axes is None else stack_axes
    if weight.ndim - n_stack < 2:
        raise ValueError(f"a weight of shape {weight.shape} with {n_stack} stacked axes has no (in, out) matrix")
    stored, perm = _stored_layout(tuple(weight.shape), n_stack, in_axes)
    stored_order = tuple(range(n_stack)) + tuple(n_stack + axis for axis in np.argsort(perm))
    rows = jnp.transpose(weight, stored_order).reshape(weight.shape[:n_stack] + (-1,))
    block = qconfig.block_size or math.prod(stored[1:])
    children = _quantize_rows(rows, qconfig.quant_type, block, qconfig.double_quant)
    dtype = qconfig.compute_dtype or weight.dtype.name
    return QuantizedArray(**children, quant_type=qconfig.quant_type, block_size=block, stored_shape=stored,
                          perm=perm, stack_shape=tuple(weight.shape[:n_stack]), dtype_name=jnp.dtype(dtype).name)


# ``quantize_array`` jitted once for every caller (one compile per weight shape and config).
quantize_array_jit = jax.jit(quantize_array, static_argnums=1)


def _is_skipped(path: tuple[str, ...], skip: Sequence[str]) -> bool:
    dotted = ".".join(path)
    return any(name in path or re.fullmatch(name, dotted) for name in skip)


def _is_target(path: tuple[str, ...], targets: Sequence[str] | str) -> bool:
    dotted = ".".join(path)
    if isinstance(targets, str):
        return re.fullmatch(targets, dotted) is not None
    return any(target in path or dotted.endswith("." + target) or dotted == target for target in targets)


def selects(qconfig: QuantizationConfig, path: tuple[str, ...], shape: Sequence[int],
            target_modules: Sequence[str] | str | None = None) -> bool:
    """Whether the parameter at ``path`` (``(..., module, leaf)``) of ``shape`` is quantized.

    By default the ``kernel`` of every linear layer is (``nn.Dense``, ``DenseGeneral``, ``Einsum`` and
    ``self.param`` kernels) except in ``skip_modules``; with ``target_modules`` (names or a regular expression
    over the dotted module path) every float parameter of two or more axes of those modules is.
    """
    module_path = tuple(str(part) for part in path[:-1])
    if len(shape) < 2 or _is_skipped(module_path, qconfig.skip_modules or DEFAULT_SKIP_MODULES):
        return False
    if target_modules is None:
        return str(path[-1]) == "kernel"
    return _is_target(module_path, target_modules)


def quantize(variables: Any, qconfig: QuantizationConfig, target_modules: Sequence[str] | str | None = None) -> Any:
    """``variables`` with the selected weights replaced by ``QuantizedArray`` leaves (see ``selects``).

    The rest (embeddings, norms, biases, heads) stays as it is. Each weight is quantized on its own, so peak
    memory is the quantized model plus one float weight.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxpeft
        >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(8)])
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 64)))
        >>> quantized = jaxpeft.quantize(variables, jaxpeft.QuantizationConfig("nf4"))
        >>> model.apply(quantized, jnp.ones((1, 64))).shape
        (1, 8)
    """
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    out = {}
    for path, leaf in flat.items():
        value = nn.meta.unbox(leaf) if not is_quantized(leaf) else leaf
        if (not is_quantized(value) and jnp.issubdtype(jnp.result_type(value), jnp.floating)
                and selects(qconfig, path, np.shape(value), target_modules)):
            value = quantize_array_jit(value, qconfig)
        out[path] = value
    return {**variables, "params": traverse_util.unflatten_dict(out)}


def quantized_paths(variables: Any) -> list[tuple[str, ...]]:
    """Paths of the ``QuantizedArray`` leaves in ``variables["params"]``."""
    flat = traverse_util.flatten_dict(dict(variables.get("params", variables)))
    return [path for path, leaf in flat.items() if is_quantized(leaf)]


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every ``QuantizedArray`` replaced by its float weight."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def requantize_like(weight: jax.Array, like: QuantizedArray) -> QuantizedArray:
    """``weight`` quantized with the type, blocks and layout of ``like``."""
    if like.quant_type not in QUANT_TYPES:
        raise ValueError(f"{like.quant_type} weights (read from a GGUF file) cannot be re-quantized; merge into a "
                         "float model instead (requantize=False)")
    n_in = like.perm.index(0)
    block_size = like.block_size if like.block_size in BLOCK_SIZES else None  # else one block per output row
    qconfig = QuantizationConfig(like.quant_type, block_size, double_quant=like.nested_scales is not None,
                                 compute_dtype=like.dtype_name)
    return quantize_array(weight, qconfig, stack_axes=len(like.stack_shape), in_axes=n_in)


def stack(leaves: Sequence[QuantizedArray]) -> QuantizedArray:
    """Quantized slices of one layout stacked on a new leading axis (as ``np.stack`` stacks layers)."""
    first = leaves[0]
    children = jax.tree.map(lambda *xs: jnp.stack(xs), *leaves)
    return children.replace(stack_shape=(len(leaves),) + first.stack_shape)


def parameter_bytes(variables: Any) -> dict[str, int]:
    """Bytes of the quantized weights, of the same weights in bf16, and of the other parameters."""
    quantized = bf16 = other = 0
    flat = traverse_util.flatten_dict(dict(variables.get("params", variables)))
    for leaf in flat.values():
        if is_quantized(leaf):
            quantized += leaf.nbytes
            bf16 += 2 * leaf.size
        else:
            value = nn.meta.unbox(leaf)
            other += int(np.prod(np.shape(value))) * jnp.dtype(value.dtype).itemsize
    return {"quantized": quantized, "quantized_as_bf16": bf16, "other": other}


def recompute_dequantized(function):
    """``function`` (a loss) with every dequantized weight recomputed in the backward pass instead of kept: a
    QLoRA step then never holds the float weights of the whole model, only of the layer at work.

    Example:
        >>> import jax, jax.numpy as jnp, jaxpeft
        >>> loss = jaxpeft.quantization.recompute_dequantized(lambda x: jnp.sum(x ** 2))
        >>> float(jax.grad(loss)(jnp.ones(3))[0])
        2.0
    """
    policy = jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)
    return jax.checkpoint(function, policy=policy)


def child_shardings(leaf: QuantizedArray, sharding: jax.sharding.NamedSharding) -> QuantizedArray:
    """The shardings of ``leaf``'s arrays, as a QuantizedArray of ``NamedSharding``s, for the ``sharding`` its
    float weight would have: stacking axes keep their mesh axes, and the flat axis is split like the weight's
    output rows (whole rows per device) in each array it divides evenly; the others stay whole."""
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * leaf.ndim
    n_stack = len(leaf.stack_shape)
    row_axis = spec[n_stack + leaf.perm.index(0)]
    devices = math.prod(mesh.shape[a] for a in (row_axis if isinstance(row_axis, tuple) else (row_axis,))) \
        if row_axis else 1
    if leaf.stored_shape[0] % devices:
        row_axis = None

    def place(x):
        split = x.ndim > n_stack and row_axis is not None and x.shape[-1] % devices == 0
        flat_axis = (row_axis if split else None,) if x.ndim > n_stack else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[:n_stack], *flat_axis))

    return jax.tree.map(place, leaf)


def merge_error(float_weight: jax.Array, requantized: QuantizedArray) -> float:
    """Largest absolute change re-quantizing ``float_weight`` made."""
    return float(jnp.max(jnp.abs(dequantize(requantized, jnp.float32) - float_weight.astype(jnp.float32))))


def has_quantized(variables: Any) -> bool:
    return any(is_quantized(leaf) for leaf in jax.tree.leaves(variables, is_leaf=is_quantized))


def describe(qconfig: QuantizationConfig | Mapping | None) -> str:
    if qconfig is None:
        return "float"
    if isinstance(qconfig, Mapping):
        qconfig = QuantizationConfig(**qconfig)
    return qconfig.quant_type + (" (double quant)" if qconfig.double_quant else "")
