"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024).

Every adapted layer shares two frozen random projections, ``A [r, in_max]`` and ``B [out_max, r]`` (sized for the
largest adapted layer), and trains only two vectors: the layer's weight ``W [out, in]`` becomes
``W + diag(λ_b) B[:out, :] diag(λ_d) A[:, :in]``, the dropout (``vera_dropout``) acting on the update's input.

Leaves kept in an adapted layer's parameters, for adapter ``name`` (torch layout, stacked ``(*stack, ...)`` under
``nn.scan``):

- ``vera_lambda_b/<name>``: ``[out]``, trained; HF PEFT's ``vera_lambda_b``.
- ``vera_lambda_d/<name>``: ``[r]``, trained; HF PEFT's ``vera_lambda_d``.
- ``vera_A/<name>``: ``[r, in]`` float32, the layer's slice ``A[:, :in]`` of the shared projection. A constant.
- ``vera_B/<name>``: ``[out, r]`` float32, the slice ``B[:out, :]``. A constant.
- ``vera_active/<name>``: ``(*stack,)`` float32, 1 for the layers of a scanned stack that the config selects and 0
  for the others. A constant.

Adapter files hold, as HF PEFT's do, ``base_model.model.<module>.vera_lambda_b`` / ``.vera_lambda_d`` per layer
and the shared projections once, ``base_model.vera_A`` ``[r, in_max]`` and ``base_model.vera_B`` ``[out_max, r]``
(the layers' slices put back together). HF PEFT draws the projections from torch's random generator seeded with
``projection_prng_key``; jaxpeft cannot reproduce torch's generator, so it draws its own (the same kaiming-uniform
distribution, from ``jax.random.key(projection_prng_key)``), always saves them, and uses a loaded file's as they are.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _layouts
from jaxpeft._tracing import Layer, Trace
from jaxpeft.config import (
    PeftConfig,
    check,
    check_module_targets,
    is_finite_number,
    is_positive_int,
    plain_number,
    strict_options,
)
from jaxpeft.core import AdapterError
from jaxpeft.method import register
from jaxpeft.methods._reweight import reweight_method
from jaxpeft.tree import flatten, unflatten_like

Path = tuple[str, ...]
BIAS_OPTIONS = ("none", "all", "vera_only")
PROJECTIONS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}  # leaf key -> tensor name in the file


@strict_options
@dataclasses.dataclass
class VeraConfig(PeftConfig):
    """VeRA options, with HF PEFT's names and defaults.

    Attributes:
        r: the rank of the shared random projections (VeRA takes higher ranks than LoRA: 256 by default).
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"``; Dense, DenseGeneral and Einsum layers. None: the architecture's
            defaults with ``jaxpeft.get_peft_model`` (HF PEFT's), otherwise required.
        projection_prng_key: the seed of the shared projections ``vera_A``/``vera_B`` (drawn with ``jax.random``:
            jaxpeft cannot reproduce the projections HF PEFT draws from torch's generator).
        save_projection: must be True: the projections are always saved with the adapter, and a file without them
            (HF PEFT's ``save_projection=False``) cannot be loaded, since they came from torch's generator.
        vera_dropout: dropout probability on the update's input (``'dropout'`` rng stream).
        d_initial: the initial value of every entry of ``vera_lambda_d`` (``vera_lambda_b`` starts at zero).
        fan_in_fan_out: accepted for HF compatibility; Flax kernels are always ``[in, out]``, so it changes nothing.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"vera_only"`` (the biases of adapted layers).
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        init_weights: True (``vera_lambda_b`` zero: the model starts unchanged) or False (``vera_lambda_b`` ones,
            ``vera_lambda_d`` standard normal: for tests).
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jaxpeft import init_adapters, rewrite
        >>> from jaxpeft.methods.vera import VeraConfig
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])  # layers named layers_0, layers_2
        >>> x = jnp.ones((1, 4))
        >>> config = VeraConfig(r=4, target_modules=["layers_0", "layers_2"])
        >>> variables = init_adapters(jax.random.key(0), config, model.apply, model.init(jax.random.key(1), x), x)
        >>> {key: value["default"].shape for key, value in variables["params"]["layers_2"].items()
        ...  if key.startswith("vera")}
        {'vera_lambda_b': (2,), 'vera_lambda_d': (4,), 'vera_A': (4, 8), 'vera_B': (2, 4), 'vera_active': ()}
        >>> bool(jnp.array_equal(rewrite(model.apply, config)(variables, x), model.apply(variables, x)))
        True
    """

    peft_type: ClassVar[str] = "VERA"
    option_hints: ClassVar[dict[str, str]] = {"rank": "r", "dropout": "vera_dropout", "seed": "projection_prng_key"}

    r: int = 256
    target_modules: str | Sequence[str] | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.r), f"r must be a positive integer, got r={self.r!r}")
        self.r = int(self.r)
        check(isinstance(self.projection_prng_key, numbers.Integral) and not isinstance(self.projection_prng_key, bool)
              and 0 <= self.projection_prng_key < 2**63,
              f"projection_prng_key must be an integer >= 0, got projection_prng_key={self.projection_prng_key!r}")
        self.projection_prng_key = int(self.projection_prng_key)
        check(self.save_projection is True,
              "save_projection=False is not supported: without vera_A/vera_B in the file HF PEFT regenerates them "
              "from torch's random generator, which jaxpeft cannot reproduce; save the adapter with "
              "save_projection=True")
        check(is_finite_number(self.vera_dropout) and 0 <= self.vera_dropout < 1,
              f"vera_dropout must be in [0, 1), got vera_dropout={self.vera_dropout!r}")
        check(is_finite_number(self.d_initial), f"d_initial must be a finite number, got d_initial={self.d_initial!r}")
        self.vera_dropout, self.d_initial = plain_number(self.vera_dropout), plain_number(self.d_initial)
        check(self.bias in BIAS_OPTIONS, f"bias={self.bias!r} is unknown; use one of {', '.join(BIAS_OPTIONS)}")
        for name in ("init_weights", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        check_module_targets(self)


# ----- leaves -----

def layer_leaves(key: jax.Array, config: VeraConfig, name: str, n_out: int, n_in: int, dtype: Any) -> dict:
    """One layer's leaves; the projection slices are placeholders that ``create`` fills from the shared ones."""
    del name
    if config.init_weights:
        lambda_b, lambda_d = jnp.zeros((n_out,), dtype), jnp.full((config.r,), config.d_initial, dtype)
    else:
        lambda_b, lambda_d = jnp.ones((n_out,), dtype), jax.random.normal(key, (config.r,), dtype)
    return {"vera_lambda_b": lambda_b, "vera_lambda_d": lambda_d,
            "vera_A": jnp.zeros((config.r, n_in), jnp.float32), "vera_B": jnp.zeros((n_out, config.r), jnp.float32)}


def projections(config: VeraConfig, n_out: int, n_in: int) -> tuple[jax.Array, jax.Array]:
    """The shared ``A [r, n_in]`` and ``B [n_out, r]``: kaiming-uniform as in HF PEFT (bound ``sqrt(6 / fan_in)``,
    fan_in the number of columns), drawn from ``jax.random.key(projection_prng_key)``."""
    key_a, key_b = jax.random.split(jax.random.key(config.projection_prng_key))

    def uniform(key, shape):
        bound = math.sqrt(6.0 / shape[1])
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    return uniform(key_a, (config.r, n_in)), uniform(key_b, (n_out, config.r))


def _with_slices(leaf: Any, shared: jax.Array) -> jax.Array:
    """``shared`` cut to the layer's slice (``A[:, :in]`` or ``B[:out, :]``), repeated along the stack axes."""
    rows, cols = leaf.shape[-2:]
    return jnp.broadcast_to(jnp.asarray(shared, jnp.float32)[:rows, :cols], leaf.shape)


def _fill_projections(leaves: dict, shared: dict[str, jax.Array]) -> dict:
    return {slot: _with_slices(value, shared[slot[1]]) if slot[1] in shared else value
            for slot, value in leaves.items()}


def _wrap_create(create):
    def create_with_projections(key: jax.Array, config: VeraConfig, trace: Trace, dtype: Any) -> dict:
        leaves = create(key, config, trace, dtype)
        n_in = max(value.shape[-1] for (_, leaf_key), value in leaves.items() if leaf_key == "vera_A")
        n_out = max(value.shape[-2] for (_, leaf_key), value in leaves.items() if leaf_key == "vera_B")
        shared_a, shared_b = projections(config, n_out, n_in)
        return _fill_projections(leaves, {"vera_A": shared_a, "vera_B": shared_b})

    return create_with_projections


def delta(config: VeraConfig, leaves: dict, weight: jax.Array) -> jax.Array:
    """``diag(λ_b) B diag(λ_d) A``, ``[out, in]`` in float32."""
    del config, weight
    lambda_b = leaves["vera_lambda_b"].astype(jnp.float32)
    lambda_d = leaves["vera_lambda_d"].astype(jnp.float32)
    return (lambda_b[:, None] * leaves["vera_B"].astype(jnp.float32)) @ (
        lambda_d[:, None] * leaves["vera_A"].astype(jnp.float32))


def sizes(config: VeraConfig, leaves: dict) -> tuple[int, int]:
    del config
    return leaves["vera_B"].shape[-2], leaves["vera_A"].shape[-1]


def task_defaults(config: VeraConfig, model) -> dict[str, Any]:
    """HF PEFT's VeRA targets for the architecture (the same as LoRA's for jaxpeft's model families)."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


# ----- the HF PEFT file format -----

def torch_tensors(config: VeraConfig, layer: Layer, name: str, shapes: dict[Path, tuple[int, ...]]) -> dict:
    """One layer's tensors: ``vera_lambda_b [out]`` and ``vera_lambda_d [r]``, as jaxpeft keeps them."""
    del config, layer, name
    return {key: ((key,), _layouts.plain_layout(shapes[(key,)], flat=False))
            for key in ("vera_lambda_b", "vera_lambda_d")}


def _projection_leaves(variables: Any, adapter_name: str) -> dict[Path, Any]:
    """``{path: leaf}`` of the adapter's ``vera_A`` and ``vera_B`` leaves, in every adapted layer."""
    flat = flatten(variables.get("params", {}))
    found = {path: leaf for path, leaf in flat.items()
             if len(path) >= 2 and path[-2] in PROJECTIONS and path[-1] == adapter_name}
    if not found:
        raise AdapterError(f"the variables hold no VeRA adapter {adapter_name!r}")
    return found


def hf_tensors(config: VeraConfig, variables: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``{"base_model.vera_A": [r, in_max], "base_model.vera_B": [out_max, r]}``, the shared projections put
    back together from the layers' slices (each slice is the start of the shared matrix, so the largest is it)."""
    del config
    largest: dict[str, np.ndarray] = {}
    for path, leaf in _projection_leaves(variables, adapter_name).items():
        value = np.asarray(jax.device_get(nn.meta.unbox(leaf)), np.float32)
        value = value.reshape((-1,) + value.shape[-2:])[0]  # every stack entry holds the same slice
        if path[-2] not in largest or value.size > largest[path[-2]].size:
            largest[path[-2]] = value
    return {PROJECTIONS[key]: value for key, value in largest.items()}


def leaves_from_hf(config: VeraConfig, tensors: dict, variables: Any, adapter_name: str) -> Any:
    """``variables`` with every layer's projection slices cut from the file's shared ``vera_A`` and ``vera_B``."""
    del config
    missing = sorted(name for name in PROJECTIONS.values() if name not in tensors)
    if missing:
        raise AdapterError(f"the VeRA adapter file lacks {', '.join(missing)}; it was saved with "
                           "save_projection=False, whose projections jaxpeft cannot regenerate")
    flat = flatten(variables["params"])
    for path, leaf in _projection_leaves(variables, adapter_name).items():
        new = _with_slices(nn.meta.unbox(leaf), tensors[PROJECTIONS[path[-2]]])
        flat[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new
    params = unflatten_like(flat, variables["params"])
    return {**variables, "params": params} if isinstance(variables, dict) else variables.copy({"params": params})


def _method():
    method = reweight_method(
        VeraConfig, ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"), layer_leaves, sizes,
        active_key="vera_active", method_name="VeRA", delta=delta, constant_keys=("vera_A", "vera_B"),
        dropout_rate=lambda config: config.vera_dropout, task_defaults=task_defaults, torch_tensors=torch_tensors,
        hf_tensors=hf_tensors, leaves_from_hf=leaves_from_hf,
        leaf_layouts={"vera_lambda_b": ("stack", "out"), "vera_lambda_d": ("stack", None),
                      "vera_A": ("stack", None, None), "vera_B": ("stack", None, None), "vera_active": ("stack",)})
    return dataclasses.replace(method, create=_wrap_create(method.create))


METHOD = register(_method())
