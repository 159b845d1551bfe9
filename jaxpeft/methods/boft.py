"""BOFT: butterfly orthogonal finetuning (Liu et al., 2024), as HF PEFT's ``BOFTConfig``: the input of a layer
rotated by a product of block-diagonal orthogonal matrices mixed by butterfly permutations, and its output scaled.

Leaves kept in an adapted layer's parameters, for adapter ``name``:

- ``boft_R/<name>``: ``(*stack, factors, blocks, block_size, block_size)`` float32, HF PEFT's ``boft_R`` (the same
  tensor): each block's skew-symmetric part ``Q = (A - A^T) / 2`` gives the rotation ``R = (I - Q)(I + Q)^-1``
  (the exact Cayley transform).
- ``boft_s/<name>``: ``(*stack, out, 1)`` float32, HF PEFT's ``boft_s``: the scale of each output (bias excluded).
- ``boft_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects and 0
  for the others. A constant, never trained.

Factor ``i`` is ``B_i = P_i · blockdiag(R_i) · P_i^T`` with ``P_i`` HF PEFT's block butterfly permutation (the
identity for ``i = 0``), ``M = B_(n-1) ··· B_0``; the layer computes ``s ⊙ (W (M^T x)) + b``, i.e. the weight
``W' = diag(s) · W · M^T``, which merging stores (unmerging uses ``M``'s transpose and ``1 / s``). Adapts Dense,
DenseGeneral and Einsum layers (a torch ``Linear``).

HF PEFT builds ``boft_n_butterfly_factor > 1`` only where its CUDA extension compiles; elsewhere (CPU) it uses one
factor whatever the option says, and its ``boft_R`` then has one factor. jaxpeft always builds the factors asked
for, as HF PEFT does on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._tracing import layer_kind
from jaxpeft.config import PeftConfig, check, check_module_targets, is_finite_number, plain_number, strict_options
from jaxpeft.core import AdapterError
from jaxpeft.method import register
from jaxpeft.methods import _reweight

ROTATION, SCALE, ACTIVE = "boft_R", "boft_s", "boft_active"


@strict_options
@dataclasses.dataclass
class BOFTConfig(PeftConfig):
    """BOFT options, with HF PEFT's names and defaults.

    Attributes:
        boft_block_size: the size of each orthogonal block (default 4); give either it or ``boft_block_num``
            (the other 0). It must divide every adapted layer's input size.
        boft_block_num: the number of blocks per factor.
        boft_n_butterfly_factor: the number of butterfly factors (1: OFT with a scale; 2: twice the effective block
            size, ...). Each factor doubles the span of the permutation, so the input size must be a multiple of
            ``boft_block_size * 2^(factors - 1)`` and both block sizes and counts even.
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"``. None: the architecture's defaults (those of LoRA, as in HF PEFT).
        exclude_modules: the same forms, for modules to leave alone.
        boft_dropout: HF PEFT's multiplicative dropout: in training, in one randomly chosen factor, that share
            of the blocks is the identity (the ``'dropout'`` rng stream).
        fan_in_fan_out: accepted for HF compatibility; Flax kernels are always ``[in, out]``, so it changes nothing.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"boft_only"`` (the biases of adapted layers).
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        init_weights: True (``boft_R`` zeros, ``boft_s`` ones: the model starts unchanged) or False (``boft_R``
            normal with standard deviation 0.1, ``boft_s`` normal around 1: for tests).
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.boft import BOFTConfig
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 8))
        >>> config = BOFTConfig(target_modules=".*", boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> [variables["params"][key]["default"].shape for key in ("boft_R", "boft_s")]
        [(2, 4, 2, 2), (3, 1)]
        >>> adapted = jaxpeft.rewrite(model.apply, config)(variables, x)
        >>> bool(jnp.allclose(model.apply(jaxpeft.merge(variables, config), x), adapted, atol=1e-5))
        True
    """

    peft_type: ClassVar[str] = "BOFT"
    option_hints: ClassVar[dict[str, str]] = {"block_size": "boft_block_size", "dropout": "boft_dropout"}

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{name} must be an integer >= 0, got {name}={value!r}")
        factors = self.boft_n_butterfly_factor
        check(isinstance(factors, int) and not isinstance(factors, bool) and factors >= 1,
              f"boft_n_butterfly_factor must be a positive integer, got boft_n_butterfly_factor={factors!r}")
        check((self.boft_block_size != 0) != (self.boft_block_num != 0),
              f"give exactly one of boft_block_size and boft_block_num (the other 0), got boft_block_size="
              f"{self.boft_block_size}, boft_block_num={self.boft_block_num}")
        check(is_finite_number(self.boft_dropout) and 0 <= self.boft_dropout < 1,
              f"boft_dropout must be in [0, 1), got boft_dropout={self.boft_dropout!r}")
        self.boft_dropout = plain_number(self.boft_dropout)
        check(self.bias in ("none", "all", "boft_only"),
              f"bias={self.bias!r} is unknown; use 'none', 'all' or 'boft_only'")
        for name in ("init_weights", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        check_module_targets(self)


# ----- shapes and permutations -----

def blocks_for(config: BOFTConfig, n_in: int, name: str = "") -> tuple[int, int]:
    """``(blocks per factor, block size)`` for a layer with ``n_in`` inputs; a one-line error where HF PEFT
    refuses the combination."""
    extra = config.boft_n_butterfly_factor - 1  # the paper's count: factors beyond the first
    where = f"BOFT at {name or 'a layer'} with {n_in} inputs"
    if config.boft_block_size == 0:
        count = config.boft_block_num
        if n_in % count:
            raise AdapterError(f"{where}: boft_block_num={count} does not divide the input size; choose a divisor")
        if extra and (extra > int(math.log2(count)) or count % 2 ** extra):
            raise AdapterError(f"{where}: boft_block_num={count} must be a multiple of 2^(boft_n_butterfly_factor - "
                               "1); lower boft_n_butterfly_factor or change boft_block_num")
        size = n_in // count
    else:
        size = config.boft_block_size
        if n_in % size or (extra and n_in % (size * 2 ** extra)):
            raise AdapterError(f"{where}: the input size must be a multiple of boft_block_size * 2^("
                               "boft_n_butterfly_factor - 1); change boft_block_size or boft_n_butterfly_factor")
        count = n_in // size
    if extra and (count % 2 or size % 2):
        raise AdapterError(f"{where}: with boft_n_butterfly_factor > 1 the block size ({size}) and the number of "
                           f"blocks ({count}) must be even; change boft_block_size or boft_block_num")
    return count, size


def butterfly_permutation(n: int, chunks: int, group: int) -> np.ndarray:
    """HF PEFT's block butterfly permutation: ``n`` indices in ``chunks`` equal chunks, each made of groups of
    ``group`` indices reordered even-numbered groups first, then odd-numbered. Row ``i`` of the permutation matrix
    has its 1 in column ``perm[i]``."""
    chunk = n // chunks
    groups = chunk // group
    order = list(range(0, groups, 2)) + list(range(1, groups, 2))
    within = np.concatenate([np.arange(g * group, (g + 1) * group) for g in order])
    return np.concatenate([start + within for start in range(0, n, chunk)])


def permutations(factors: int, count: int, size: int) -> list[np.ndarray]:
    n = count * size
    if factors == 1:
        return [np.arange(n)]
    return [butterfly_permutation(n, count // 2 ** i, size // 2) for i in range(factors)]


# ----- the transform -----

def cayley(blocks: jax.Array) -> jax.Array:
    """``(I - Q)(I + Q)^-1`` for ``Q`` the skew-symmetric part of each ``[..., b, b]`` block."""
    q = 0.5 * (blocks - jnp.swapaxes(blocks, -1, -2))
    eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    # (I - Q)(I + Q)^-1 = ((I - Q)^-1 (I + Q))^T, as (I + Q)^T = I - Q
    return jnp.swapaxes(jnp.linalg.solve(eye - q, eye + q), -1, -2)


def _with_dropout(config: BOFTConfig, rotations: jax.Array, drop_key: jax.Array) -> jax.Array:
    """A share ``boft_dropout`` of the blocks of one random factor replaced by the identity."""
    factors, count, size, _ = rotations.shape
    factor_key, block_key = jax.random.split(drop_key)
    factor = jax.random.randint(factor_key, (), 0, factors)
    dropped = jax.random.permutation(block_key, count) < int(config.boft_dropout * count)
    mask = (jnp.arange(factors)[:, None] == factor) & dropped[None, :]
    return jnp.where(mask[..., None, None], jnp.eye(size, dtype=rotations.dtype), rotations)


def _times_factor(x: jax.Array, blocks: jax.Array, perm: np.ndarray, transposed: bool) -> jax.Array:
    """``x · B`` (``transposed``: ``x · B^T``) for ``B = P blockdiag(blocks) P^T``, ``x [out, n]``."""
    n_out, n = x.shape
    count, size = blocks.shape[:2]
    inverse = np.argsort(perm)
    spec = "okc,kdc->okd" if transposed else "okc,kcd->okd"
    by_block = x[:, inverse].reshape(n_out, count, size)
    return jnp.einsum(spec, by_block, blocks, precision="highest").reshape(n_out, n)[:, perm]


def transform(config: BOFTConfig, leaves: dict, weight: jax.Array, inverse: bool,
              drop_key: jax.Array | None = None) -> jax.Array:
    """``diag(s) · W · M^T`` for ``W [out, in]`` (``inverse``: ``diag(1 / s) · W · M``)."""
    rotations = cayley(leaves[ROTATION].astype(jnp.float32))
    if drop_key is not None and config.boft_dropout > 0:
        rotations = _with_dropout(config, rotations, drop_key)
    factors, count, size, _ = rotations.shape
    perms = permutations(factors, count, size)
    scale = leaves[SCALE].astype(jnp.float32)
    if inverse:
        for i in reversed(range(factors)):
            weight = _times_factor(weight, rotations[i], perms[i], transposed=False)
        return weight / scale
    for i in range(factors):
        weight = _times_factor(weight, rotations[i], perms[i], transposed=True)
    return weight * scale


# ----- leaves and method -----

def layer_leaves(key: jax.Array, config: BOFTConfig, name: str, n_out: int, n_in: int, dtype: Any) -> dict:
    count, size = blocks_for(config, n_in, name)
    shape = (config.boft_n_butterfly_factor, count, size, size)
    if config.init_weights:
        return {ROTATION: jnp.zeros(shape, dtype), SCALE: jnp.ones((n_out, 1), dtype)}
    rotation_key, scale_key = jax.random.split(key)
    return {ROTATION: (0.1 * jax.random.normal(rotation_key, shape, jnp.float32)).astype(dtype),
            SCALE: (1 + 0.1 * jax.random.normal(scale_key, (n_out, 1), jnp.float32)).astype(dtype)}


def sizes(config: BOFTConfig, leaves: dict) -> tuple[int, int]:
    _, count, size, _ = leaves[ROTATION].shape
    return leaves[SCALE].shape[0], count * size


def task_defaults(config: BOFTConfig, model) -> dict[str, Any]:
    """The architecture's default ``target_modules`` (LoRA's, as in HF PEFT) when the config names none."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


def interceptor(config: BOFTConfig, adapter_name: str, dropout: bool):
    """Rotates and scales each adapted layer's weight; in training with ``boft_dropout``, one draw per layer call
    from the ``'dropout'`` stream."""
    plain = _PLAIN(config, adapter_name, False)
    if not dropout or config.boft_dropout == 0:
        return plain

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or layer_kind(module) not in _reweight.KINDS
                or not module.has_variable("params", ROTATION)):
            return next_fun(*args, **kwargs)
        drop_key = module.make_rng("dropout")
        with_dropout = _reweight.make_interceptor(
            (ROTATION, SCALE), ACTIVE, None, lambda c, leaves, w, inverse: transform(c, leaves, w, inverse, drop_key),
            lambda c: 0.0)
        return with_dropout(config, adapter_name, False)(next_fun, args, kwargs, context)

    return adapt


_BASE = _reweight.reweight_method(
    BOFTConfig, (ROTATION, SCALE), layer_leaves, sizes, active_key=ACTIVE, method_name="BOFT", transform=transform,
    task_defaults=task_defaults,
    leaf_layouts={ROTATION: ("stack", None, None, None, None), SCALE: ("stack", None, None), ACTIVE: ("stack",)})
_PLAIN = _BASE.interceptor
METHOD = register(dataclasses.replace(_BASE, interceptor=interceptor))
