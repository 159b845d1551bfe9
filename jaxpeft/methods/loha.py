"""LoHa: a layer's weight plus the Hadamard product of two low-rank matrices (Hyeon-Woo et al., 2022, FedPara).

With ``W [out, in]`` the layer's weight as torch holds it, LoHa adds

    ΔW = (alpha / r) * (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)

so the layer computes ``x·W + x·ΔW``. Leaves kept in an adapted layer's parameters, for adapter ``name``, in torch's
layout (they are HF PEFT's tensors as they are), after the layer's stack axes under ``nn.scan``:

- ``hada_w1_a/<name>``, ``hada_w2_a/<name>``: ``(*stack, out, r)``;
- ``hada_w1_b/<name>``, ``hada_w2_b/<name>``: ``(*stack, r, in)``;
- ``hada_scaling/<name>``: ``(*stack,)`` float32, ``alpha / r`` of each layer (``rank_pattern`` and
  ``alpha_pattern`` honoured), a constant;
- ``hada_active/<name>``: ``(*stack,)`` float32, 1 where the layer is adapted, 0 where ``layers_to_transform``
  leaves a layer of a scanned stack alone; a constant.

``out`` and ``in`` are the products of the kernel's output and input axes (DenseGeneral and Einsum kernels count
as one matrix). ``init_weights=True`` starts ``hada_w2_b`` at zero (the model starts unchanged) and the others with
torch's ``kaiming_uniform_(a=sqrt(5))``, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; ``False`` draws all four.
Convolutions (HF PEFT's ``hada_t1``/``hada_t2`` and ``use_effective_conv2d``) are not supported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import _targets
from jaxpeft.config import (
    PeftConfig,
    check,
    check_module_targets,
    is_finite_number,
    is_positive_int,
    plain_number,
    strict_options,
)
from jaxpeft.method import Method, register
from jaxpeft.methods._reweight import reweight_method

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
HIGHEST = jax.lax.Precision.HIGHEST


@strict_options
@dataclasses.dataclass
class LoHaConfig(PeftConfig):
    """LoHa options, with HF PEFT's names and defaults.

    Attributes:
        r: the rank of each of the two factors.
        alpha: scaling numerator: the change is scaled by ``alpha / r``.
        rank_dropout: dropout of whole output rows of the change in training. Not implemented: a non-zero value
            loads and runs for inference (where HF PEFT ignores it too), and training with dropout refuses it.
        module_dropout: probability of skipping the adapter of a layer in training; as ``rank_dropout``.
        use_effective_conv2d: HF PEFT's CP decomposition of convolution kernels; convolutions are not adapted, so
            it changes nothing here.
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"`` (every Dense/DenseGeneral/Einsum except the output head).
        exclude_modules: the same forms, for modules to leave alone.
        init_weights: True (``hada_w2_b`` zero: the model starts unchanged) or False (all factors random).
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``); needs
            ``layers_to_transform``.
        rank_pattern / alpha_pattern: ``{regex: value}`` per-module overrides of ``r`` / ``alpha``.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.loha import LoHaConfig
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 4))
        >>> config = LoHaConfig(r=2, alpha=4, target_modules=["layers_0"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> layer = variables["params"]["layers_0"]
        >>> [(k, layer[k]["default"].shape) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        [('hada_w1_a', (8, 2)), ('hada_w1_b', (2, 4)), ('hada_w2_a', (8, 2)), ('hada_w2_b', (2, 4))]
        >>> bool(jnp.array_equal(jaxpeft.rewrite(model.apply, config)(variables, x), model.apply(variables, x)))
        True
        >>> float(variables["params"]["layers_0"]["hada_scaling"]["default"])
        2.0
    """

    peft_type: ClassVar[str] = "LOHA"
    option_hints: ClassVar[dict[str, str]] = {"rank": "r", "lora_alpha": "alpha", "init_lora_weights": "init_weights"}

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_lycoris_options(self)
        check(isinstance(self.init_weights, bool), f"init_weights must be True or False, got {self.init_weights!r}")

    def rank_for(self, name: str) -> int:
        """The rank of the module at dotted path ``name``."""
        return _targets.pattern_value(name, self.rank_pattern, self.r)

    def scaling_for(self, name: str) -> float:
        """``alpha / r`` of the module at dotted path ``name``."""
        return _targets.pattern_value(name, self.alpha_pattern, self.alpha) / self.rank_for(name)


def check_lycoris_options(config: Any) -> None:
    """Checks (and normalises) the options LoHa and LoKr share, HF PEFT's ``LycorisConfig`` ones."""
    check(is_positive_int(config.r), f"r must be a positive integer, got r={config.r!r}")
    check(is_finite_number(config.alpha) and config.alpha > 0,
          f"alpha must be positive and finite, got alpha={config.alpha!r}")
    config.r, config.alpha = int(config.r), plain_number(config.alpha)
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        check(is_finite_number(value) and 0 <= value < 1, f"{name} must be in [0, 1), got {name}={value!r}")
        setattr(config, name, plain_number(value))
    check(isinstance(config.use_effective_conv2d, bool),
          f"use_effective_conv2d must be True or False, got {config.use_effective_conv2d!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        value = {} if getattr(config, name) is None else getattr(config, name)
        check(isinstance(value, Mapping), f"{name} must be a dict {{module regex: value}}, got {value!r}")
        setattr(config, name, dict(value))
    for key, rank in config.rank_pattern.items():
        check(is_positive_int(rank), f"rank_pattern[{key!r}]={rank!r} must be a positive integer")
    for key, alpha in config.alpha_pattern.items():
        check(is_finite_number(alpha) and alpha > 0, f"alpha_pattern[{key!r}]={alpha!r} must be positive and finite")
    config.rank_pattern = {key: int(rank) for key, rank in config.rank_pattern.items()}
    config.alpha_pattern = {key: plain_number(alpha) for key, alpha in config.alpha_pattern.items()}
    check_module_targets(config)


def kaiming_uniform(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` of a matrix: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
    ``fan_in = shape[1]``."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def random_leaves(key: jax.Array, shapes: dict[str, tuple[int, int]], zero: tuple[str, ...],
                  dtype: Any) -> dict[str, jax.Array]:
    """Kaiming-uniform matrices of the given shapes; those named in ``zero`` are zeros."""
    keys = jax.random.split(key, len(shapes))
    return {name: jnp.zeros(shape, dtype) if name in zero else kaiming_uniform(k, shape, dtype)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)}


def layer_leaves(key: jax.Array, config: LoHaConfig, name: str, n_out: int, n_in: int,
                 dtype: Any) -> dict[str, jax.Array]:
    """One layer's LoHa leaves (torch layout, no stack axes)."""
    rank = config.rank_for(name)
    shapes = {"hada_w1_a": (n_out, rank), "hada_w1_b": (rank, n_in), "hada_w2_a": (n_out, rank),
              "hada_w2_b": (rank, n_in)}
    leaves = random_leaves(key, shapes, ("hada_w2_b",) if config.init_weights else (), dtype)
    leaves["hada_scaling"] = jnp.asarray(config.scaling_for(name), jnp.float32)
    return leaves


def sizes(config: LoHaConfig, leaves: dict[str, jax.Array]) -> tuple[int, int]:
    del config
    return leaves["hada_w1_a"].shape[0], leaves["hada_w1_b"].shape[1]


def product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in float32 at full precision."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)


def delta(config: LoHaConfig, leaves: dict[str, jax.Array], weight: jax.Array) -> jax.Array:
    """ΔW ``[out, in]`` (float32)."""
    del config, weight
    w1 = product(leaves["hada_w1_a"], leaves["hada_w1_b"])
    w2 = product(leaves["hada_w2_a"], leaves["hada_w2_b"])
    return leaves["hada_scaling"].astype(jnp.float32) * w1 * w2


def task_defaults(config: LoHaConfig, model) -> dict[str, Any]:
    """HF PEFT's LoHa targets are its LoRA targets: the architecture's defaults when the config names none."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


def without_dropout_training(method: Method) -> Method:
    """``method`` with an interceptor that refuses to run with dropout while ``rank_dropout`` or
    ``module_dropout`` is set: jaxpeft does not implement them, and inference ignores them (as HF PEFT's eval mode
    does), so adapters trained with them load and run."""
    inner = method.interceptor

    def interceptor(config: Any, adapter_name: str, dropout: bool):
        for name in ("rank_dropout", "module_dropout") if dropout else ():
            value = getattr(config, name)
            check(value == 0, f"{name}={value} is not supported in training by jaxpeft's {config.peft_type} "
                              f"(inference ignores it); train with {name}=0.0 or without a 'dropout' rng")
        return inner(config, adapter_name, dropout)

    return dataclasses.replace(method, interceptor=interceptor)


METHOD = register(without_dropout_training(reweight_method(
    LoHaConfig, FACTORS + ("hada_scaling",), layer_leaves, sizes, active_key="hada_active", method_name="LoHa",
    delta=delta, constant_keys=("hada_scaling",), task_defaults=task_defaults)))
