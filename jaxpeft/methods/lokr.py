"""LoKr: a layer's weight plus the Kronecker product of two (optionally low-rank) matrices (LyCORIS' LoKr).

With ``W [out, in]`` the layer's weight as torch holds it, ``out = a * b`` and ``in = c * d`` split by
``factorization`` (``a <= b``, ``c <= d``, ``decompose_factor`` steering the split), LoKr adds

    ΔW = (alpha / r) * kron(w1 [a, c], w2 [b, d])

so the layer computes ``x·W + x·ΔW``. ``w1`` is the full ``lokr_w1`` unless ``decompose_both`` is set and
``r < max(a, c) / 2``, when it is ``lokr_w1_a @ lokr_w1_b``; ``w2`` is the full ``lokr_w2`` unless
``r < max(b, d) / 2``, when it is ``lokr_w2_a @ lokr_w2_b`` (HF PEFT's rules). Leaves kept in an adapted layer's
parameters, for adapter ``name``, in torch's layout (HF PEFT's tensors as they are), after the stack axes:

- ``lokr_w1/<name>``: ``(*stack, a, c)``, or ``lokr_w1_a/<name>`` ``(*stack, a, r)`` and ``lokr_w1_b/<name>``
  ``(*stack, r, c)``;
- ``lokr_w2/<name>``: ``(*stack, b, d)``, or ``lokr_w2_a/<name>`` ``(*stack, b, r)`` and ``lokr_w2_b/<name>``
  ``(*stack, r, d)``;
- ``lokr_scaling/<name>``: ``(*stack,)`` float32, ``alpha / r`` of each layer (``rank_pattern`` and
  ``alpha_pattern`` honoured), a constant;
- ``lokr_active/<name>``: ``(*stack,)`` float32, 1 where the layer is adapted; a constant.

``init_weights=True`` zeroes ``w1`` (``lokr_w1``, or ``lokr_w1_a``), ``"lycoris"`` zeroes ``w2`` (``lokr_w2``, or
``lokr_w2_b``), so the model starts unchanged; False draws every factor. Draws are torch's
``kaiming_uniform_(a=sqrt(5))``. Convolutions (``lokr_t2``, ``use_effective_conv2d``) are not supported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import _targets
from jaxpeft.config import PeftConfig, check, strict_options
from jaxpeft.method import register
from jaxpeft.methods._reweight import reweight_method
from jaxpeft.methods.loha import check_lycoris_options, product, random_leaves, without_dropout_training

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")



@strict_options
@dataclasses.dataclass
class LoKrConfig(PeftConfig):
    """LoKr options, with HF PEFT's names and defaults.

    Attributes:
        r: the rank of the low-rank factors (and what decides which factors are low-rank).
        alpha: scaling numerator: the change is scaled by ``alpha / r``.
        rank_dropout: dropout of whole output rows of the change in training. Not implemented: a non-zero value
            loads and runs for inference (where HF PEFT ignores it too), and training with dropout refuses it.
        module_dropout: probability of skipping the adapter of a layer in training; as ``rank_dropout``.
        use_effective_conv2d: HF PEFT's CP decomposition of convolution kernels; convolutions are not adapted, so
            it changes nothing here.
        decompose_both: make ``w1`` low-rank too (``lokr_w1_a @ lokr_w1_b``) when ``r < max(a, c) / 2``.
        decompose_factor: the factor each of ``out`` and ``in`` is split by (``-1``: as near the square root
            as the divisors allow; see ``factorization``).
        rank_dropout_scale: rescale the rows kept by ``rank_dropout``; no effect while ``rank_dropout`` is 0.
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"`` (every Dense/DenseGeneral/Einsum except the output head).
        exclude_modules: the same forms, for modules to leave alone.
        init_weights: True (``w1`` zero: the model starts unchanged), ``"lycoris"`` (``w2`` zero, LyCORIS' way)
            or False (every factor random).
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``); needs
            ``layers_to_transform``.
        rank_pattern / alpha_pattern: ``{regex: value}`` per-module overrides of ``r`` / ``alpha``.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.lokr import LoKrConfig
        >>> model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 8))
        >>> config = LoKrConfig(r=1, alpha=2, target_modules=["layers_0"])  # out 12 = 3 * 4, in 8 = 2 * 4
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> layer = variables["params"]["layers_0"]
        >>> [(k, layer[k]["default"].shape) for k in sorted(layer) if k.startswith("lokr_w")]
        [('lokr_w1', (3, 2)), ('lokr_w2_a', (4, 1)), ('lokr_w2_b', (1, 4))]
        >>> bool(jnp.array_equal(jaxpeft.rewrite(model.apply, config)(variables, x), model.apply(variables, x)))
        True
    """

    peft_type: ClassVar[str] = "LOKR"
    option_hints: ClassVar[dict[str, str]] = {"rank": "r", "lora_alpha": "alpha", "init_lora_weights": "init_weights"}

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_lycoris_options(self)
        check(isinstance(self.init_weights, bool) or self.init_weights == "lycoris",
              f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        for name in ("decompose_both", "rank_dropout_scale"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        factor = self.decompose_factor
        check(isinstance(factor, int) and not isinstance(factor, bool),
              f"decompose_factor must be an integer (-1: near the square root), got {factor!r}")

    def rank_for(self, name: str) -> int:
        """The rank of the module at dotted path ``name``."""
        return _targets.pattern_value(name, self.rank_pattern, self.r)

    def scaling_for(self, name: str) -> float:
        """``alpha / r`` of the module at dotted path ``name``."""
        return _targets.pattern_value(name, self.alpha_pattern, self.alpha) / self.rank_for(name)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``, HF PEFT's (LyCORIS') split for LoKr.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` as it is. Otherwise
    the divisors are walked upwards, from 1, while the smaller one stays below its partner and does not pass
    ``factor`` (any size for ``-1``); the last pair reached comes back smaller first.

    Example:
        >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
        ((16, 16), (8, 16), (1, 127), (4, 32))
        >>> factorization(24, 5), factorization(12, 8), factorization(32, 8)
        ((4, 6), (3, 4), (8, 4))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > limit:
            break
        m, n = divisor, dimension // divisor
    return min(m, n), max(m, n)


def factor_shapes(config: LoKrConfig, rank: int, n_out: int, n_in: int) -> dict[str, tuple[int, int]]:
    """The shapes of one layer's LoKr matrices, named as HF PEFT names them."""
    a, b = factorization(n_out, config.decompose_factor)
    c, d = factorization(n_in, config.decompose_factor)
    shapes = {}
    if config.decompose_both and rank < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, rank), lokr_w1_b=(rank, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if rank < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes


def _zeroed(config: LoKrConfig, shapes: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    """The matrices that start at zero."""
    if config.init_weights == "lycoris":
        return ("lokr_w2", "lokr_w2_b")
    return ("lokr_w1", "lokr_w1_a") if config.init_weights else ()


def layer_leaves(key: jax.Array, config: LoKrConfig, name: str, n_out: int, n_in: int,
                 dtype: Any) -> dict[str, jax.Array]:
    """One layer's LoKr leaves (torch layout, no stack axes)."""
    shapes = factor_shapes(config, config.rank_for(name), n_out, n_in)
    leaves = random_leaves(key, shapes, _zeroed(config, shapes), dtype)
    leaves["lokr_scaling"] = jnp.asarray(config.scaling_for(name), jnp.float32)
    return leaves


def _factor(leaves: dict[str, jax.Array], name: str) -> jax.Array:
    """``w1`` or ``w2`` in float32: the full matrix, or the product of its two low-rank ones."""
    if name in leaves:
        return leaves[name].astype(jnp.float32)
    return product(leaves[name + "_a"], leaves[name + "_b"])


def _factor_shape(leaves: dict[str, jax.Array], name: str) -> tuple[int, int]:
    if name in leaves:
        return leaves[name].shape
    return leaves[name + "_a"].shape[0], leaves[name + "_b"].shape[1]


def sizes(config: LoKrConfig, leaves: dict[str, jax.Array]) -> tuple[int, int]:
    del config
    (a, c), (b, d) = _factor_shape(leaves, "lokr_w1"), _factor_shape(leaves, "lokr_w2")
    return a * b, c * d


def delta(config: LoKrConfig, leaves: dict[str, jax.Array], weight: jax.Array) -> jax.Array:
    """ΔW ``[out, in]`` (float32)."""
    del config, weight
    return leaves["lokr_scaling"].astype(jnp.float32) * jnp.kron(_factor(leaves, "lokr_w1"), _factor(leaves, "lokr_w2"))


def task_defaults(config: LoKrConfig, model) -> dict[str, Any]:
    """HF PEFT's LoKr targets are its LoRA targets: the architecture's defaults when the config names none."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


METHOD = register(without_dropout_training(reweight_method(
    LoKrConfig, ("lokr_scaling",), layer_leaves, sizes, active_key="lokr_active", method_name="LoKr", delta=delta,
    constant_keys=("lokr_scaling",), optional_leaf_keys=FACTORS, task_defaults=task_defaults)))
