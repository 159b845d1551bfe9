"""OFT: orthogonal finetuning, the input of a layer rotated by a learned block-diagonal orthogonal matrix
(Qiu et al., 2023), as HF PEFT's ``OFTConfig``.

Leaves kept in an adapted layer's parameters, for adapter ``name``:

- ``oft_R/<name>``: ``(*stack, blocks, block_size * (block_size - 1) / 2)`` float32, the strictly upper triangles
  (row by row) of skew-symmetric matrices ``Q``, one per diagonal block (one in all with ``block_share``): HF
  PEFT's ``oft_R.weight``, the same tensor. Each block's rotation is the Cayley transform
  ``R = (I - Q)(I + Q)^-1``, or its Neumann series with ``use_cayley_neumann`` (HF PEFT's default and formula).
- ``oft_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects and 0
  for the others. A constant, never trained.

The layer computes ``W x'`` with ``x'`` the input rotated block by block by ``R`` (``x'_j = R_j^T x_j``), which is
the layer with the weight ``W' = W · blockdiag(R)^T``; merging stores ``W'`` and unmerging multiplies by the
blocks' exact inverses. Adapts Dense, DenseGeneral and Einsum layers (a torch ``Linear``); the block size divides
the layer's input size (the option is moved to the nearest divisor otherwise, with a warning, as HF PEFT does).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import _layouts
from jaxpeft._tracing import Layer, layer_kind
from jaxpeft.config import PeftConfig, check, check_module_targets, is_finite_number, plain_number, strict_options
from jaxpeft.method import register
from jaxpeft.methods import _reweight

Path = tuple[str, ...]
BIAS_OPTIONS = ("none", "all", "oft_only")
LEAF, ACTIVE = "oft_R", "oft_active"


@strict_options
@dataclasses.dataclass
class OFTConfig(PeftConfig):
    """OFT options, with HF PEFT's names and defaults.

    Attributes:
        r: the number of orthogonal blocks per layer; give either ``r`` or ``oft_block_size`` (the other 0).
        oft_block_size: the size of each orthogonal block (default 32, with ``r=0``). It must divide the layer's
            input size; otherwise the nearest divisor is used, with a warning (HF PEFT's rule).
        module_dropout: the share of a layer's blocks replaced by the identity in each training step (the
            ``'dropout'`` rng stream), HF PEFT's multiplicative dropout.
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"``. None: the architecture's defaults (those of LoRA, as in HF PEFT).
        exclude_modules: the same forms, for modules to leave alone.
        fan_in_fan_out: accepted for HF compatibility; Flax kernels are always ``[in, out]``, so it changes nothing.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"oft_only"`` (the biases of adapted layers).
        init_weights: True (zeros: every block is the identity, the model starts unchanged) or False (normal with
            standard deviation 0.1: for tests).
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``).
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        coft: constrained OFT: each block's ``Q`` is scaled back to Frobenius norm ``eps / sqrt(blocks)`` when
            larger, before the rotation (gradients pass straight through the projection; HF PEFT also writes
            the projected values into the parameter, which a functional forward pass cannot).
        eps: COFT's bound on the rotation's freedom.
        block_share: one block shared by all the blocks of a layer.
        use_cayley_neumann: the Cayley transform's inverse approximated by HF PEFT's Neumann series (default
            True, as in HF PEFT 0.21) instead of an exact inverse.
        num_cayley_neumann_terms: the number of terms of that series.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.oft import OFTConfig
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((2, 8))
        >>> config = OFTConfig(target_modules=".*", oft_block_size=4, init_weights=False)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> variables["params"]["oft_R"]["default"].shape  # 2 blocks of 4 x 4: 6 numbers each
        (2, 6)
        >>> adapted = jaxpeft.rewrite(model.apply, config)(variables, x)
        >>> bool(jnp.allclose(model.apply(jaxpeft.merge(variables, config), x), adapted, atol=1e-5))
        True
    """

    peft_type: ClassVar[str] = "OFT"
    option_hints: ClassVar[dict[str, str]] = {"block_size": "oft_block_size", "dropout": "module_dropout"}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self):
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{name} must be an integer >= 0, got {name}={value!r}")
        check((self.r != 0) != (self.oft_block_size != 0),
              f"give exactly one of r and oft_block_size (the other 0), got r={self.r}, "
              f"oft_block_size={self.oft_block_size}")
        check(is_finite_number(self.module_dropout) and 0 <= self.module_dropout < 1,
              f"module_dropout must be in [0, 1), got module_dropout={self.module_dropout!r}")
        check(is_finite_number(self.eps) and self.eps > 0, f"eps must be positive, got eps={self.eps!r}")
        self.module_dropout, self.eps = plain_number(self.module_dropout), plain_number(self.eps)
        check(self.bias in BIAS_OPTIONS, f"bias={self.bias!r} is unknown; use one of {', '.join(BIAS_OPTIONS)}")
        for name in ("init_weights", "coft", "block_share", "use_cayley_neumann", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        check_module_targets(self)


# ----- block sizes -----

def _nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of ``n`` closest to ``wanted`` (the smaller on a tie; ``n`` when ``wanted >= n``)."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def blocks_for(config: OFTConfig, n_in: int, name: str = "") -> tuple[int, int]:
    """``(number of blocks, block size)`` for a layer with ``n_in`` inputs."""
    option, wanted = ("oft_block_size", config.oft_block_size) if config.r == 0 else ("r", config.r)
    chosen = wanted if n_in % wanted == 0 and wanted <= n_in else _nearest_divisor(n_in, wanted)
    if chosen != wanted:
        warnings.warn(f"OFT: {option}={wanted} does not divide the input size {n_in} of {name or 'a layer'}; "
                      f"using {option}={chosen}", stacklevel=2)
    return (n_in // chosen, chosen) if config.r == 0 else (chosen, n_in // chosen)


def block_size_of(n_elements: int) -> int:
    """The block size ``b`` with ``b (b - 1) / 2 = n_elements``."""
    return (1 + math.isqrt(1 + 8 * n_elements)) // 2


# ----- the rotation -----

def skew(vectors: jax.Array, size: int) -> jax.Array:
    """``[k, size (size - 1) / 2]`` upper triangles (row by row) -> ``[k, size, size]`` skew-symmetric matrices."""
    rows, cols = jnp.triu_indices(size, 1)
    upper = jnp.zeros(vectors.shape[:-1] + (size, size), vectors.dtype).at[..., rows, cols].set(vectors)
    return upper - jnp.swapaxes(upper, -1, -2)


def cayley(config: OFTConfig, vectors: jax.Array) -> jax.Array:
    """The ``[k, b, b]`` rotations of the packed skew-symmetric ``vectors [k, b (b - 1) / 2]``."""
    vectors = vectors.astype(jnp.float32)
    if config.coft:
        bound = config.eps / math.sqrt(vectors.shape[0])
        norm = jnp.sqrt(2 * jnp.sum(vectors * vectors, axis=-1, keepdims=True))
        projected = jnp.where(norm <= bound, vectors, bound * vectors / jnp.maximum(norm, 1e-30))
        vectors = vectors + jax.lax.stop_gradient(projected - vectors)
    size = block_size_of(vectors.shape[-1])
    q = skew(vectors, size)
    eye = jnp.broadcast_to(jnp.eye(size, dtype=q.dtype), q.shape)
    if not config.use_cayley_neumann:
        # (I - Q)(I + Q)^-1 = ((I + Q)^-T (I - Q)^T)^T, and (I + Q)^T = I - Q
        return jnp.swapaxes(jnp.linalg.solve(eye - q, eye + q), -1, -2)
    return eye + _neumann_tail(q, config.num_cayley_neumann_terms)


def _neumann_tail(q: jax.Array, terms: int) -> jax.Array:
    """HF PEFT's series without its identity: ``2Q`` for 2 terms; else ``2(Q + ... + Q^(m-1)) + Q^m``,
    ``m = max(terms - 1, 3)``."""
    if terms <= 1:
        return jnp.zeros_like(q)
    if terms == 2:
        return 2 * q
    last = max(terms - 1, 3)
    total, power = jnp.zeros_like(q), q
    for _ in range(1, last):
        total = total + 2 * power
        power = jnp.matmul(power, q, precision="highest")
    return total + power


def rotations(config: OFTConfig, leaves: dict, n_in: int, drop_key: jax.Array | None = None) -> jax.Array:
    """The ``[n_in / b, b, b]`` diagonal blocks of a layer's orthogonal matrix (module dropout applied when
    ``drop_key`` is given)."""
    blocks = cayley(config, leaves[LEAF])
    count = n_in // blocks.shape[-1]
    if blocks.shape[0] == 1 and count > 1:
        return jnp.broadcast_to(blocks, (count,) + blocks.shape[1:])  # shared: dropout does not apply
    if drop_key is not None and config.module_dropout > 0:
        dropped = jax.random.permutation(drop_key, count) < int(config.module_dropout * count)
        blocks = jnp.where(dropped[:, None, None], jnp.eye(blocks.shape[-1], dtype=blocks.dtype), blocks)
    return blocks


def transform(config: OFTConfig, leaves: dict, weight: jax.Array, inverse: bool,
              drop_key: jax.Array | None = None) -> jax.Array:
    """``W · blockdiag(R)^T`` for ``W [out, in]`` (``inverse``: ``W · blockdiag(R^-1)^T``, exact)."""
    n_out, n_in = weight.shape
    blocks = rotations(config, leaves, n_in, drop_key)
    if inverse:
        blocks = jnp.linalg.inv(blocks)
    size = blocks.shape[-1]
    by_block = weight.reshape(n_out, n_in // size, size)
    return jnp.einsum("okc,kdc->okd", by_block, blocks, precision="highest").reshape(n_out, n_in)


# ----- leaves, names, method -----

def layer_leaves(key: jax.Array, config: OFTConfig, name: str, n_out: int, n_in: int, dtype: Any) -> dict:
    del n_out
    count, size = blocks_for(config, n_in, name)
    shape = (1 if config.block_share else count, size * (size - 1) // 2)
    if config.init_weights:
        return {LEAF: jnp.zeros(shape, dtype)}
    return {LEAF: (0.1 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)}


def sizes(config: OFTConfig, leaves: dict) -> tuple[int | None, int | None]:
    stored, n_elements = leaves[LEAF].shape
    if config.block_share:
        return None, None
    return None, stored * block_size_of(n_elements)


def torch_tensors(config: Any, layer: Layer, name: str, shapes: dict[Path, tuple[int, ...]]) -> dict:
    del config, layer, name
    return {f"{LEAF}.weight": ((LEAF,), _layouts.plain_layout(shapes[(LEAF,)], flat=False))}


def task_defaults(config: OFTConfig, model) -> dict[str, Any]:
    """The architecture's default ``target_modules`` (LoRA's, as in HF PEFT) when the config names none."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


def interceptor(config: OFTConfig, adapter_name: str, dropout: bool):
    """Rotates each adapted layer's weight; in training with ``module_dropout``, a random share of the blocks
    of each layer is the identity (one draw per layer call from the ``'dropout'`` stream)."""
    plain = _PLAIN(config, adapter_name, False)
    if not dropout or config.module_dropout == 0:
        return plain

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or layer_kind(module) not in _reweight.KINDS
                or not module.has_variable("params", LEAF)):
            return next_fun(*args, **kwargs)
        drop_key = module.make_rng("dropout")
        with_dropout = _reweight.make_interceptor(
            (LEAF,), ACTIVE, None, lambda c, leaves, w, inverse: transform(c, leaves, w, inverse, drop_key),
            lambda c: 0.0)
        return with_dropout(config, adapter_name, False)(next_fun, args, kwargs, context)

    return adapt


_BASE = _reweight.reweight_method(
    OFTConfig, (LEAF,), layer_leaves, sizes, active_key=ACTIVE, method_name="OFT", transform=transform,
    torch_tensors=torch_tensors, task_defaults=task_defaults,
    leaf_layouts={LEAF: ("stack", None, None), ACTIVE: ("stack",)})
_PLAIN = _BASE.interceptor
METHOD = register(dataclasses.replace(_BASE, interceptor=interceptor))
