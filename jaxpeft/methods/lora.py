"""LoRA: a layer's output plus ``scaling * B(A(dropout(x)))``, with low-rank A and B (Hu et al., 2021).

Leaves kept in an adapted layer's parameters, for adapter ``name``:

- ``lora_A/<name>``: ``(*stack, *input axes, r)``: the kernel's input axes (all of them for DenseGeneral and
  Einsum, kernel window and input channels for Conv, the vocabulary for Embed) map to the rank;
- ``lora_B/<name>``: ``(*stack, r, *output axes)``;
- ``lora_scaling/<name>``: ``(*stack,)`` float32, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) per layer, 0 where
  ``layers_to_transform`` leaves a layer of a scanned stack alone. A constant, never trained;
- with ``use_dora=True``, ``lora_magnitude_vector/<name>``: ``(*stack, *output axes)``, DoRA's magnitude ``m``,
  initialised to the norm of ``W + scaling * A B`` over the input axes (HF PEFT's ``lora_magnitude_vector``).

DoRA (Liu et al., 2024) rescales each output of ``x W + scaling * x A B`` by ``m / ||W + scaling * A B||``, with the
norm treated as a constant (no gradient), as HF PEFT computes it. PiSSA (``init_lora_weights="pissa"`` or
``"pissa_niter_<n>"``) starts A and B at the principal singular components of the kernel and leaves the residual in
the kernel: ``init_adapters`` then returns a changed base kernel.

Modules that are not stock layers (a library's own einsum layer, raw ``self.param`` kernels, experts) keep the
leaves of each of their own parameters under ``params/<module>/own_params/<parameter>/`` (``target_modules``: A and B
follow every contraction of the parameter with an input) or ``params/<module>/target_parameters/<parameter>/``
(``target_parameters``: the parameter becomes ``W + scaling * A B`` wherever the module uses it). Both keep the
parameter's axes in its order, size 1 where they do not vary (A along the output axes, B along the input axes), then
the rank. Where a ``target_parameters`` parameter meets the input only in dot products or grouped expert matmuls,
the update runs factorised too, ``x W + scaling * B(A(x))``, which is the same number; elsewhere (a gather, an
addition) ``W + scaling * A B`` is formed. PiSSA runs one SVD per layer and per batch entry (expert).

LoftQ (``init_lora_weights="loftq"``, Li et al., 2023) quantizes a float kernel itself: the kernel becomes a
``QuantizedArray`` ``Q`` (nf4 for 4 bits, per-channel int8 for 8) and A and B the rank-r SVD of ``W - deq(Q)``,
alternating the two ``loftq_iter`` times (HF PEFT's ``loftq_init``), so that ``deq(Q) + scaling * A B`` is closer
to ``W`` than ``deq(Q)`` alone.

``A`` is the transpose of HF PEFT's ``lora_A.weight`` ([r, in]) and ``B`` that of ``lora_B.weight`` ([out, r]).
Plain LoRA's forward pass never forms ``W + BA``: that would cost a full-size weight gradient in training. DoRA needs
its column norms, computed from ``W + BA`` without gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _contractions, _layouts, _targets
from jaxpeft._tracing import PARAM_SLOTS, TARGET_PARAMS, Layer, Trace, layer_kind, own_matrices
from jaxpeft.config import (
    PeftConfig,
    check,
    is_finite_number,
    is_positive_int,
    layer_indices,
    plain_number,
    strict_options,
)
from jaxpeft.core import (
    AdapterError,
    OwnParamCalls,
    own_param_leaves,
    resolve_layers,
    resolve_parameters,
)
from jaxpeft.method import Method, register
from jaxpeft.methods import trainable_tokens
from jaxpeft.quantization import QuantizationConfig, QuantizedArray, dequantize, is_quantized, quantize_array

Path = tuple[str, ...]
INIT_OPTIONS = (True, False, "gaussian", "pissa", "olora", "loftq", "eva")
PISSA_NITER_PREFIX = "pissa_niter_"
BIAS_OPTIONS = ("none", "all", "lora_only")
KINDS = ("dense", "dense_general", "embed", "conv", "einsum", "param")
DORA_KINDS = ("dense", "dense_general", "conv", "param")
PISSA_KINDS = ("dense", "dense_general", "param")
LOFTQ_KINDS = ("dense", "dense_general")
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # HF PEFT's LoftQConfig
# jaxpeft quantizer of each loftq_bits value: bitsandbytes' nf4 in blocks of 64, int8 with one scale per output
LOFTQ_QUANTIZERS = {4: QuantizationConfig("nf4", block_size=64), 8: QuantizationConfig("int8", block_size=None)}
MAGNITUDE = "lora_magnitude_vector"
TOKEN_ROWS = trainable_tokens.LEAF_KEY  # the rows of trainable_token_indices, as the trainable-tokens method's
TOKEN_INDICES = "trainable_token_indices"  # int32 [n]: the token ids those rows replace
_RANK = "\u03c1"  # the rank axis in einsum specs: a letter no layer spec uses


@strict_options
@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA options, with HF PEFT's names and defaults.

    Attributes:
        r: the rank.
        lora_alpha: scaling numerator: the update is scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout probability on the adapter's input (``'dropout'`` rng stream).
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"`` (every Dense/DenseGeneral/Einsum except the output head). Besides Flax's
            layers, any module that multiplies its own parameters with an input (an einsum with any equation, a
            dot, ``@``) is adapted: A and B follow each such parameter (``own_params``).
        target_parameters: parameters to adapt as a whole, named ``<module path>.<parameter>`` (a dotted suffix
            such as ``"mlp.experts.gate_up_proj"``, or a full-match regex), as HF PEFT's option: the parameter
            becomes ``W + scaling * A B`` wherever the model uses it (sliced per expert, transposed, in a scan).
            Leading axes beyond its input and output axes get one A and B each (one per expert).
        exclude_modules: the same forms, for modules to leave alone.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (the biases of adapted layers).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        init_lora_weights: True (kaiming-uniform A, zero B: the model starts unchanged), ``"gaussian"``
            (A ~ N(0, (1/r)^2), zero B), False (B random too: for tests), ``"pissa"`` (A and B from the kernel's r
            principal singular components, the kernel keeps the residual) or ``"pissa_niter_<n>"`` (the same with a
            randomized SVD of n power iterations), ``"olora"`` (A and B from the QR decomposition of the weight,
            the kernel keeps the residual, as HF PEFT's OLoRA), ``"loftq"`` (the kernel is quantized, A and B take
            the rank-r SVD of the quantization error: see ``loftq_config``), ``"eva"`` (A from the principal
            components of the layer inputs: ``jaxpeft.eva``).
        eva_config: with ``init_lora_weights="eva"``, ``jaxpeft.eva.EvaConfig`` (or a dict of its options): A
            starts like ``True`` until ``jaxpeft.eva.initialize_lora_eva_weights`` sets it from a few batches.
        loftq_config: with ``init_lora_weights="loftq"``, ``{"loftq_bits": 4, "loftq_iter": 1}`` (HF PEFT's
            names and defaults): 4 bits quantize to nf4, 8 bits to per-channel int8; ``loftq_iter`` alternations
            of quantizing and the SVD. Ignored (emptied, with a warning) for other initialisations, as in HF PEFT.
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``).
        rank_pattern / alpha_pattern: ``{regex: value}`` per-module overrides of ``r`` / ``lora_alpha``.
        use_dora: DoRA: a trained per-output magnitude rescales the adapted weight (Dense, DenseGeneral, Conv).
        trainable_token_indices: embedding rows to train besides the LoRA layers, as HF PEFT's option: a list of
            token ids (rows of the input embedding: the embedding named ``embed_tokens``, else the largest one) or
            ``{embedding name: token ids}``. The rows train as in ``TrainableTokensConfig``; a tied output head
            (``Embed.attend``) sees them too. The embedding must not also be a LoRA target or in
            ``modules_to_save``.

    Example:
        >>> import jaxpeft
        >>> jaxpeft.LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"]).r
        16
    """

    peft_type: ClassVar[str] = "LORA"
    option_hints: ClassVar[dict[str, str]] = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    target_parameters: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    loftq_config: dict[str, int] = dataclasses.field(default_factory=dict)
    eva_config: dict[str, Any] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.r), f"r must be a positive integer, got r={self.r!r}")
        check(is_finite_number(self.lora_alpha) and self.lora_alpha > 0,
              f"lora_alpha must be positive and finite, got lora_alpha={self.lora_alpha!r}")
        check(is_finite_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
              f"lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout!r}")
        self.r = int(self.r)
        self.lora_alpha, self.lora_dropout = plain_number(self.lora_alpha), plain_number(self.lora_dropout)
        check(self.bias in BIAS_OPTIONS, f"bias={self.bias!r} is unknown; use one of {', '.join(BIAS_OPTIONS)}")
        check(self.init_lora_weights in INIT_OPTIONS or _pissa_niter(self.init_lora_weights) is not None,
              f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False, 'gaussian', "
              "'pissa', 'pissa_niter_<n>', 'olora', 'loftq' or 'eva'")
        self.loftq_config = _loftq_options(self.init_lora_weights, self.loftq_config)
        self.eva_config = _eva_options(self.init_lora_weights, self.eva_config)
        check(not self.lora_bias, "lora_bias=True is not supported; use lora_bias=False")
        for name in ("rank_pattern", "alpha_pattern"):
            value = {} if getattr(self, name) is None else getattr(self, name)
            check(isinstance(value, Mapping), f"{name} must be a dict {{module regex: value}}, got {value!r}")
            setattr(self, name, dict(value))
        for key, rank in self.rank_pattern.items():
            check(is_positive_int(rank), f"rank_pattern[{key!r}]={rank!r} must be a positive integer")
        for key, alpha in self.alpha_pattern.items():
            check(is_finite_number(alpha) and alpha > 0,
                  f"alpha_pattern[{key!r}]={alpha!r} must be positive and finite")
        self.rank_pattern = {key: plain_number(rank) for key, rank in self.rank_pattern.items()}
        self.alpha_pattern = {key: plain_number(alpha) for key, alpha in self.alpha_pattern.items()}
        for name in ("target_modules", "target_parameters", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                value = list(value)
                check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
                setattr(self, name, value)
        if self.target_parameters is not None and not self.target_parameters:
            self.target_parameters = None  # torch PEFT writes [] for "none"
        if self.target_parameters is not None:
            check(not self.use_dora, "use_dora=True does not work with target_parameters (as in HF PEFT)")
            check(self.lora_dropout == 0, "lora_dropout must be 0 with target_parameters: the update changes the "
                                          "parameter itself, so no dropout can act on the input (as in HF PEFT)")
        self.trainable_token_indices = _token_index_options(self.trainable_token_indices, self.modules_to_save)
        if self.layers_to_transform is not None:
            self.layers_to_transform = layer_indices("layers_to_transform", self.layers_to_transform)
            check(not isinstance(self.target_modules, str),
                  f"layers_to_transform cannot be used with target_modules={self.target_modules!r}, a string (as in HF "
                  "PEFT); list the module names instead, e.g. target_modules=['q_proj', 'v_proj']")

    def rank_for(self, name: str) -> int:
        """The rank of the module at dotted path ``name``."""
        return _targets.pattern_value(name, self.rank_pattern, self.r)

    def scaling_for(self, name: str) -> float:
        """The scaling of the module at dotted path ``name``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank = self.rank_for(name)
        alpha = _targets.pattern_value(name, self.alpha_pattern, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


LoRAConfig = LoraConfig


def _pissa_niter(init: Any) -> int | None:
    """n for ``init_lora_weights="pissa_niter_<n>"`` (a positive integer), else None."""
    if not isinstance(init, str) or not init.startswith(PISSA_NITER_PREFIX):
        return None
    digits = init[len(PISSA_NITER_PREFIX):]
    return int(digits) if digits.isdigit() and int(digits) > 0 else None


def _decomposes_kernel(config: LoraConfig) -> bool:
    """Whether A and B come from a decomposition of the kernel, which keeps the residual (PiSSA, OLoRA)."""
    return config.init_lora_weights in ("pissa", "olora") or _pissa_niter(config.init_lora_weights) is not None


def _is_loftq(config: LoraConfig) -> bool:
    return config.init_lora_weights == "loftq"


def _loftq_options(init: Any, value: Any) -> dict[str, int]:
    """``loftq_config`` checked and completed with HF PEFT's defaults; ``{}`` unless ``init`` is ``"loftq"``."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):  # HF PEFT's LoftQConfig dataclass, as HF PEFT reads it
        check(hasattr(value, "__dict__"), f"loftq_config must be a dict such as {LOFTQ_DEFAULTS}, got {value!r}")
        value = vars(value)
    if init != "loftq":
        if value:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq' (as in HF PEFT)", stacklevel=3)
        return {}
    unknown = sorted(set(value) - set(LOFTQ_DEFAULTS))
    check(not unknown, f"loftq_config has unknown key(s) {unknown}; it takes {', '.join(LOFTQ_DEFAULTS)}")
    options = {**LOFTQ_DEFAULTS, **value}
    check(is_positive_int(options["loftq_bits"]) and options["loftq_bits"] in LOFTQ_QUANTIZERS,
          f"loftq_bits={options['loftq_bits']!r} is not supported; use 4 (nf4) or 8 (int8)")
    check(is_positive_int(options["loftq_iter"]),
          f"loftq_iter must be a positive integer, got loftq_iter={options['loftq_iter']!r}")
    return {key: int(number) for key, number in options.items()}


def _eva_options(init: Any, value: Any) -> dict[str, Any] | None:
    """``eva_config`` as a dict of ``jaxpeft.eva.EvaConfig``'s options: the defaults (with a warning, as HF PEFT)
    when ``init_lora_weights="eva"`` names none, ``None`` (with a warning if one was given) for other inits."""
    if init != "eva":
        if value:
            warnings.warn("eva_config is ignored unless init_lora_weights='eva'", stacklevel=4)
        return None
    from jaxpeft.eva import EvaConfig

    if value is None:
        warnings.warn("init_lora_weights='eva' without eva_config: using EvaConfig()'s defaults", stacklevel=4)
        value = {}
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    check(isinstance(value, Mapping), f"eva_config must be a jaxpeft.eva.EvaConfig or a dict of its options, got "
                                      f"{type(value).__name__}")
    return dataclasses.asdict(EvaConfig(**value))


# ----- shapes: which kernel axes are inputs and which are outputs -----

def _token_ids(value: Any, where: str) -> list[int]:
    check(not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Sequence | np.ndarray),
          f"{where} must be a list of token ids, got {value!r}")
    ids = list(value)
    check(all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids),
          f"{where} must hold non-negative token ids (integers), got {ids[:8]!r}")
    check(ids and len(set(ids)) == len(ids), f"{where} must list each token id once, and at least one")
    return [int(i) for i in ids]


def _token_index_options(value: Any, modules_to_save: list[str] | None) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` checked: a list of token ids, or ``{embedding name: token ids}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return _token_ids(value, "trainable_token_indices")
    check(value and all(isinstance(name, str) and name for name in value),
          f"trainable_token_indices as a dict maps embedding names to token ids, got {value!r}")
    for name in value:
        check(name not in (modules_to_save or []), f"{name!r} is in both modules_to_save (trained in full) and "
                                                   "trainable_token_indices (some rows trained); keep it in one of "
                                                   "them (as HF PEFT requires)")
    return {name: _token_ids(ids, f"trainable_token_indices[{name!r}]") for name, ids in value.items()}


def _einsum_axes(module: nn.Einsum) -> tuple[str, str, str, str, str]:
    """Splits an Einsum's spec: (input spec, kernel spec, output spec, kernel input letters, kernel output letters)."""
    spec = module.einsum_str.replace(" ", "")
    inputs, out = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    in_letters = "".join(c for c in k_spec if c in x_spec and c not in out)
    out_letters = "".join(c for c in k_spec if c in out and c not in x_spec)
    if k_spec != in_letters + out_letters:
        raise AdapterError(f"LoRA cannot adapt Einsum {spec!r}: its kernel axes must be the contracted ones "
                           "followed by the output ones (e.g. 'btd,dnh->btnh'); exclude this layer")
    return x_spec, k_spec, out, in_letters, out_letters


def kernel_axes(layer: Layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input axes, output axes) of one layer's kernel, as LoRA's A and B see them."""
    shape, module = layer.kernel_shape, layer.module
    if layer.kind in ("dense", "embed"):
        return shape[:1], shape[1:]
    if layer.kind == "dense_general":
        if tuple(module.batch_dims):
            raise AdapterError(f"LoRA cannot adapt DenseGeneral {layer.name} with batch_dims; drop batch_dims or "
                               "exclude the layer")
        n_in = len(module.axis) if isinstance(module.axis, Sequence) else 1
        return shape[:n_in], shape[n_in:]
    if layer.kind == "conv":
        if module.feature_group_count != 1:
            raise AdapterError(f"LoRA cannot adapt grouped Conv {layer.name}; exclude it from target_modules")
        return shape[:-1], shape[-1:]
    _, k_spec, _, in_letters, out_letters = _einsum_axes(module)
    size = dict(zip(k_spec, shape, strict=True))
    return tuple(size[c] for c in in_letters), tuple(size[c] for c in out_letters)


# ----- create -----

def _create_layer(key: jax.Array, config: LoraConfig, layer: Layer, dtype: Any) -> dict[str, jax.Array]:
    if config.use_dora and layer.kind not in DORA_KINDS:
        raise AdapterError(f"DoRA cannot adapt {layer.name} (a {type(layer.module).__name__}); it adapts "
                           f"{', '.join(DORA_KINDS)} layers: exclude it or set use_dora=False")
    if _decomposes_kernel(config) and layer.kind not in PISSA_KINDS:
        raise AdapterError(f"init_lora_weights={config.init_lora_weights!r} cannot initialise {layer.name} (a "
                           f"{type(layer.module).__name__}); it needs {', '.join(PISSA_KINDS)} layers: exclude it or "
                           "use another init_lora_weights")
    if _is_loftq(config) and layer.kind not in LOFTQ_KINDS:
        raise AdapterError(f"LoftQ cannot initialise {layer.name} (a {type(layer.module).__name__}); it needs "
                           f"{', '.join(LOFTQ_KINDS)} layers: exclude it or use another init_lora_weights")
    ranks = {config.rank_for(name) for name in layer.virtual_paths.values()}
    scalings = {index: config.scaling_for(name) for index, name in layer.virtual_paths.items()}
    if len(ranks) > 1:
        raise AdapterError(f"rank_pattern gives the stacked layers {layer.name} different ranks {sorted(ranks)}; "
                           "a scanned stack needs one rank (or load the model without scanned layers)")
    rank = ranks.pop()
    stack = layer.stack_shape
    if layer.kind == "param":  # both factors keep the parameter's axes (1 where they do not vary), then the rank
        roles = dict(enumerate(layer.roles))
        a_shape = stack + _contractions.keepdims_shape(layer.kernel_shape, roles, "out") + (rank,)
        b_shape = stack + _contractions.keepdims_shape(layer.kernel_shape, roles, "in") + (rank,)
        in_axes = tuple(size for size, role in zip(layer.kernel_shape, layer.roles, strict=True) if role == "in")
    else:
        in_axes, out_axes = kernel_axes(layer)
        a_shape, b_shape = stack + in_axes + (rank,), stack + (rank,) + out_axes
    key_a, key_b = jax.random.split(key)
    fan_in = int(np.prod(in_axes))
    if layer.kind == "embed":
        a = jax.random.normal(key_a, a_shape, dtype) if config.init_lora_weights is False else jnp.zeros(a_shape, dtype)
        b = jax.random.normal(key_b, b_shape, dtype)
    else:
        if config.init_lora_weights == "gaussian":
            a = jax.random.normal(key_a, a_shape, dtype) / rank
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
        if config.init_lora_weights is False:
            bound = 1.0 / math.sqrt(rank)
            b = jax.random.uniform(key_b, b_shape, dtype, -bound, bound)
        else:
            b = jnp.zeros(b_shape, dtype)
    scaling = np.zeros(stack, np.float32)
    for index, value in scalings.items():
        scaling[index] = value
    if len(scalings) < int(np.prod(stack)):
        # Layers of a stack that layers_to_transform leaves alone: zero A and B stay zero under any optimizer.
        active = (scaling != 0).reshape(stack + (1,) * (len(a_shape) - len(stack)))
        a = jnp.where(active, a, 0)
        b = jnp.where(active.reshape(stack + (1,) * (len(b_shape) - len(stack))), b, 0)
    leaves = {"lora_A": a, "lora_B": b, "lora_scaling": jnp.asarray(scaling)}
    if config.use_dora:  # the kernel's norms: set by finish()
        magnitude_shape = b_shape[:-1] if layer.kind == "param" else stack + out_axes
        leaves[MAGNITUDE] = jnp.ones(magnitude_shape, dtype)
    return leaves


def create(key: jax.Array, config: LoraConfig, trace: Trace, dtype: Any) -> dict[tuple[tuple[str, ...], str], Any]:
    """LoRA leaves for every layer ``config`` targets in the traced model, and every parameter of
    ``target_parameters``."""
    layers = {}
    if config.target_modules is not None or config.target_parameters is None:
        layers.update(resolve_layers(config, trace, KINDS, method_name="LoRA"))
    if config.target_parameters is not None:
        layers.update(resolve_parameters(config, trace))
    leaves = {}
    for i, (path, layer) in enumerate(sorted(layers.items())):
        for leaf_key, value in _create_layer(jax.random.fold_in(key, i), config, layer, dtype).items():
            leaves[(path, leaf_key)] = value
    if config.trainable_token_indices is not None:
        leaves.update(_create_token_rows(jax.random.fold_in(key, len(layers)), config, trace, dtype, set(layers)))
    return leaves


# ----- trainable_token_indices: embedding rows trained beside the LoRA layers -----

def _input_embedding(trace: Trace) -> str:
    """The dotted name of the model's input embedding: the one named ``embed_tokens``, else the largest table."""
    rows = {".".join(path): layer.kernel_shape[0] for path, layer in trace.layers.items()
            if layer.kind == "embed" and not layer.stack_shape}
    named = [name for name in rows if name.split(".")[-1] == trainable_tokens.DEFAULT_TARGET]
    if len(named) == 1:
        return named[0]
    largest = [name for name in rows if rows[name] == max(rows.values(), default=0)]
    if len(largest) != 1:
        raise AdapterError(f"trainable_token_indices as a list adapts the model's input embedding, but the model has "
                           f"{'no embedding' if not largest else f'several equally large ones ({largest})'}; give "
                           "{embedding name: token ids} instead")
    return largest[0]


def _token_targets(config: LoraConfig, trace: Trace) -> dict[str, list[int]]:
    indices = config.trainable_token_indices
    return dict(indices) if isinstance(indices, Mapping) else {_input_embedding(trace): indices}


def _create_token_rows(key: jax.Array, config: LoraConfig, trace: Trace, dtype: Any, lora_paths: set) -> dict:
    """The trainable rows (placeholders: ``finish`` copies the originals) and their token ids, per embedding."""
    leaves = {}
    for i, (name, indices) in enumerate(sorted(_token_targets(config, trace).items())):
        rows_config = trainable_tokens.TrainableTokensConfig(token_indices=indices, target_modules=[name])
        for (path, _), rows in trainable_tokens.create(jax.random.fold_in(key, i), rows_config, trace, dtype).items():
            if path in lora_paths:
                raise AdapterError(f"{'.'.join(path)} is both a LoRA target and in trainable_token_indices (HF PEFT "
                                   "refuses this too); leave it out of target_modules")
            if (path, TOKEN_ROWS) in leaves:
                raise AdapterError(f"{'.'.join(path)} is matched by two entries of trainable_token_indices; name it "
                                   "once")
            leaves[(path, TOKEN_ROWS)] = rows
            leaves[(path, TOKEN_INDICES)] = jnp.asarray(indices, jnp.int32)
    return leaves


def _copy_token_rows(leaves: dict, flat_params: dict) -> dict:
    """The trainable rows set to the embeddings' original rows: the model starts unchanged."""
    leaves = dict(leaves)
    for path, leaf_key in list(leaves):
        if leaf_key == TOKEN_ROWS:
            leaves[(path, TOKEN_ROWS)] = trainable_tokens.original_rows(
                flat_params, path, leaves[(path, TOKEN_INDICES)], leaves[(path, TOKEN_ROWS)].dtype
            )
    return leaves


def _output_norm(weight: jax.Array, stack_ndim: int, n_out: int) -> jax.Array:
    """The L2 norm of a float32 kernel ``(*stack, *input axes, *output axes)`` over its input axes."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=tuple(range(stack_ndim, weight.ndim - n_out))))


def _pissa_factors(key: jax.Array, config: LoraConfig, weight: jax.Array, scaling: jax.Array, rank: int):
    """PiSSA's A ``(..., n_in, r)`` and B ``(..., r, n_out)`` of float32 matrices ``weight`` ``(..., n_in, n_out)``
    (HF PEFT's ``pissa_init`` on ``W = weight.T``), ``scaling`` broadcast over the leading axes (0: left alone)."""
    if config.init_lora_weights == "olora":
        return _olora_factors(weight, scaling, rank)
    niter = _pissa_niter(config.init_lora_weights)
    if niter is None:
        u, s, vh = jnp.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    else:
        u, s, vh = _randomized_svd(key, weight, rank, niter)
    active = scaling != 0
    root = jnp.where(active[..., None], jnp.sqrt(s / jnp.where(active, scaling, 1.0)[..., None]), 0.0)
    return u * root[..., None, :], root[..., :, None] * vh


def _olora_factors(weight: jax.Array, scaling: jax.Array, rank: int):
    """OLoRA's A and B (HF PEFT's ``olora_init``): the first ``rank`` columns of Q and rows of R in the QR
    decomposition of the torch weight ``W = weight.T``, B = Q_r and A = R_r (not divided by the scaling, as in HF
    PEFT); layers with scaling 0 get zeros."""
    q, r = jnp.linalg.qr(jnp.swapaxes(weight, -1, -2))
    active = (scaling != 0)[..., None, None]
    return jnp.where(active, jnp.swapaxes(r[..., :rank, :], -1, -2), 0.0), jnp.where(
        active, jnp.swapaxes(q[..., :, :rank], -1, -2), 0.0)


def _pissa(key: jax.Array, config: LoraConfig, a: jax.Array, b: jax.Array, scaling: jax.Array,
           kernel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA's (A, B, residual kernel) for a stacked kernel, as HF PEFT's ``pissa_init`` on ``W = kernel.T``."""
    stack, rank = scaling.shape, a.shape[-1]
    n_in, n_out = math.prod(a.shape[len(stack):-1]), math.prod(b.shape[len(stack) + 1:])
    weight = kernel.astype(jnp.float32).reshape(stack + (n_in, n_out))
    new_a, new_b = _pissa_factors(key, config, weight, scaling, rank)
    residual = weight - scaling[..., None, None] * (new_a @ new_b)
    return (new_a.reshape(a.shape).astype(a.dtype), new_b.reshape(b.shape).astype(b.dtype),
            residual.reshape(kernel.shape).astype(kernel.dtype))


def _param_pissa(key: jax.Array, config: LoraConfig, a: jax.Array, b: jax.Array, scaling: jax.Array,
                 weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA for the factors of one parameter (each in its axis order, size 1 where it does not vary, then the
    rank): one SVD per entry of its batch and stacking axes, over its input axes (1 in B) by its output axes (1 in
    A)."""
    ins = [i for i in range(weight.ndim) if b.shape[i] == 1 and a.shape[i] != 1]
    outs = [i for i in range(weight.ndim) if a.shape[i] == 1 and b.shape[i] != 1]
    batch = [i for i in range(weight.ndim) if i not in ins and i not in outs]
    sizes = [weight.shape[i] for i in batch], [weight.shape[i] for i in ins], [weight.shape[i] for i in outs]
    matrices = jnp.transpose(weight.astype(jnp.float32), batch + ins + outs).reshape(
        tuple(sizes[0]) + (math.prod(sizes[1]), math.prod(sizes[2])))
    scaling = jnp.asarray(scaling, jnp.float32)
    scaling = jnp.broadcast_to(scaling.reshape(scaling.shape + (1,) * (len(batch) - scaling.ndim)), sizes[0])
    new_a, new_b = _pissa_factors(key, config, matrices, scaling, a.shape[-1])
    residual = matrices - scaling[..., None, None] * (new_a @ new_b)
    order = np.argsort(batch + ins + outs)
    residual = jnp.transpose(residual.reshape(tuple(sizes[0] + sizes[1] + sizes[2])), order)
    with_rank = list(order) + [weight.ndim]
    new_a = jnp.transpose(new_a.reshape(tuple(sizes[0] + sizes[1]) + (1,) * len(outs) + (-1,)), with_rank)
    new_b = jnp.swapaxes(new_b, -1, -2).reshape(tuple(sizes[0]) + (1,) * len(ins) + tuple(sizes[2]) + (-1,))
    new_b = jnp.transpose(new_b, with_rank)
    return new_a.astype(a.dtype), new_b.astype(b.dtype), residual.astype(weight.dtype)


def _low_rank(matrices: jax.Array, rank: int) -> jax.Array:
    """The best rank-``rank`` approximation of each of the float32 matrices ``(..., m, n)`` (truncated SVD)."""
    u, s, vh = jnp.linalg.svd(matrices, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def loftq_quantize(kernel: jax.Array, bits: int, n_stack: int, n_in: int, dtype: Any = None) -> QuantizedArray:
    """A linen kernel ``(*stack, *input axes, *output axes)`` quantized as LoftQ's ``bits`` ask: nf4 (blocks of
    64, as bitsandbytes) for 4, int8 with one scale per output channel for 8; dequantized as ``dtype`` (default:
    the kernel's)."""
    qconfig = dataclasses.replace(LOFTQ_QUANTIZERS[bits], compute_dtype=dtype or kernel.dtype)
    return quantize_array(kernel, qconfig, stack_axes=n_stack, in_axes=n_in)


@functools.partial(jax.jit, static_argnames=("bits", "rank", "kernel_shape", "n_in", "dtype"))
def loftq_matrices(weight: jax.Array, active: jax.Array, bits: int, n_iter: int | jax.Array, rank: int,
                   kernel_shape: tuple[int, ...], n_in: int, dtype: str) -> tuple[QuantizedArray, jax.Array]:
    """LoftQ's alternation (HF PEFT's ``loftq_init``) on float32 matrices ``weight`` ``(*stack, n_in, n_out)``,
    a reshaped kernel of ``kernel_shape`` and ``dtype``: ``Q = quantize(W - L R)``, then ``L R`` the rank-``rank``
    SVD of ``W - deq(Q)``, ``n_iter`` times from ``L R = 0``. Returns ``Q`` (in the kernel's layout and dtype) and
    the last quantization error ``W - deq(Q)``. Matrices where ``active`` is False keep ``L R = 0``:
    ``Q = quantize(W)``."""
    def quantized_and_error(residual):
        quantized = loftq_quantize(residual.reshape(kernel_shape), bits, weight.ndim - 2, n_in, dtype)
        return quantized, weight - dequantize(quantized, jnp.float32).reshape(weight.shape)

    def step(_, residual):
        error = quantized_and_error(residual)[1]
        return weight - jnp.where(active[..., None, None], _low_rank(error, rank), 0.0)

    return quantized_and_error(jax.lax.fori_loop(0, n_iter - 1, step, weight))


def _loftq(config: LoraConfig, a: jax.Array, b: jax.Array, scaling: jax.Array,
           kernel: jax.Array) -> tuple[jax.Array, jax.Array, QuantizedArray]:
    """LoftQ's (A, B, quantized kernel) for a stacked kernel: ``deq(Q) + scaling * A B`` approximates it. A and B
    split the rank-r SVD of ``W - deq(Q)`` as HF PEFT does (``A = sqrt(S) V^T``, ``B = U sqrt(S)`` in torch's
    layout), divided by ``scaling`` so that the product, not ``A B`` alone, is the correction; 0 where left alone."""
    stack, rank = scaling.shape, a.shape[-1]
    n_in = a.ndim - len(stack) - 1
    weight = kernel.astype(jnp.float32).reshape(stack + (math.prod(a.shape[len(stack):-1]), -1))
    bits, n_iter = config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"]
    quantized, error = loftq_matrices(weight, jnp.asarray(scaling) != 0, bits=bits, n_iter=n_iter, rank=rank,
                                      kernel_shape=tuple(kernel.shape), n_in=n_in, dtype=kernel.dtype.name)
    new_a, new_b = _pissa_factors(None, config, error, scaling, rank)
    return new_a.reshape(a.shape).astype(a.dtype), new_b.reshape(b.shape).astype(b.dtype), quantized


def _randomized_svd(key: jax.Array, weight: jax.Array, rank: int, niter: int):
    """Rank-``rank`` SVD of the (stacked) matrices ``weight`` by subspace iteration (like ``torch.svd_lowrank``)."""
    basis = jnp.linalg.qr(weight @ jax.random.normal(key, weight.shape[:-2] + (weight.shape[-1], rank)))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(weight.mT @ basis)[0]
        basis = jnp.linalg.qr(weight @ basis)[0]
    u, s, vh = jnp.linalg.svd(basis.mT @ weight, full_matrices=False)
    return basis @ u, s, vh


def finish(key: jax.Array, config: LoraConfig, trace: Trace, leaves: dict, flat_params: dict) -> tuple[dict, dict]:
    """The leaves and base params after the steps that need the kernels' values: PiSSA's SVD (which also replaces
    the kernel by its residual), LoftQ (which replaces the kernel by its quantized part) and DoRA's magnitude
    ``||W + scaling * A B||``; the rows of ``trainable_token_indices`` copied from the embeddings. Neither input is
    changed."""
    leaves = _copy_token_rows(leaves, flat_params)
    if not (config.use_dora or _decomposes_kernel(config) or _is_loftq(config)):
        return leaves, flat_params
    flat_params = dict(flat_params)
    for i, path in enumerate(sorted({path for path, key in leaves if key == "lora_A"})):
        follows_parameter = len(path) >= 2 and path[-2] in PARAM_SLOTS
        weight_path = path[:-2] + (path[-1],) if follows_parameter else path + ("kernel",)
        boxed = flat_params[weight_path]
        if _is_loftq(config) and is_quantized(boxed):
            raise AdapterError(f"LoftQ quantizes a float base itself, but the kernel of {'.'.join(path) or 'the model'}"
                               " is already quantized: pass the float model (as HF PEFT requires)")
        kernel = jnp.asarray(nn.meta.unbox(boxed))
        a, b, scaling = (leaves[(path, k)] for k in ("lora_A", "lora_B", "lora_scaling"))
        if follows_parameter:
            if _decomposes_kernel(config):
                a, b, kernel = _param_pissa(jax.random.fold_in(key, i), config, a, b, scaling, kernel)
                leaves[(path, "lora_A")], leaves[(path, "lora_B")] = a, b
                flat_params[weight_path] = (boxed.replace_boxed(kernel) if isinstance(boxed, nn.meta.AxisMetadata)
                                            else kernel)
            if config.use_dora:  # m = ||W + s A B|| over the input axes
                magnitude = leaves[(path, MAGNITUDE)]
                changed = kernel.astype(jnp.float32) + param_delta(a, b, scaling)
                leaves[(path, MAGNITUDE)] = _param_norm(changed, magnitude).astype(magnitude.dtype)
            continue
        if _decomposes_kernel(config):
            a, b, kernel = _pissa(jax.random.fold_in(key, i), config, a, b, scaling, kernel)
            leaves[(path, "lora_A")], leaves[(path, "lora_B")] = a, b
            flat_params[path + ("kernel",)] = (boxed.replace_boxed(kernel) if isinstance(boxed, nn.meta.AxisMetadata)
                                               else kernel)
        elif _is_loftq(config):
            a, b, quantized = _loftq(config, a, b, scaling, kernel)
            leaves[(path, "lora_A")], leaves[(path, "lora_B")] = a, b
            flat_params[path + ("kernel",)] = quantized  # a box itself: it replaces any partitioning box
            kernel = dequantize(quantized)
        if config.use_dora:
            magnitude = leaves[(path, MAGNITUDE)]
            weight = kernel.astype(jnp.float32) + delta_weight(a, b, scaling)
            norm = _output_norm(weight, scaling.ndim, magnitude.ndim - scaling.ndim)
            leaves[(path, MAGNITUDE)] = norm.astype(magnitude.dtype)
    return leaves, flat_params


# ----- forward -----

def _input_rows(module: nn.Module, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """A Dense(General) layer's input as ``(batch, tokens, inputs)``, and the shape of its axes that are kept."""
    axis = getattr(module, "axis", -1)
    axes = tuple(ax % x.ndim for ax in (axis if isinstance(axis, Sequence) else (axis,)))
    kept = tuple(ax for ax in range(x.ndim) if ax not in axes)
    kept_shape = tuple(x.shape[ax] for ax in kept)
    return x.transpose(kept + axes).reshape(kept_shape[:1] + (-1, math.prod(x.shape[ax] for ax in axes))), kept_shape


def _down(kind: str, module: nn.Module, x: jax.Array, a: jax.Array) -> jax.Array:
    """``A(x)``: the layer's input projected to the rank, which becomes the last axis."""
    if kind == "embed":
        return jnp.take(a, x, axis=0)
    if kind in ("dense", "dense_general"):
        # As one 2-D matmul over all tokens: XLA's CPU backend runs those (and their gradients) far faster
        # than dots with several batch or contracting axes.
        rows, kept_shape = _input_rows(module, x)
        return (rows.reshape(-1, rows.shape[-1]) @ a.reshape(-1, a.shape[-1])).reshape(kept_shape + a.shape[-1:])
    if kind == "conv":
        window = nn.Conv(features=a.shape[-1], kernel_size=module.kernel_size, strides=module.strides,
                         padding=module.padding, input_dilation=module.input_dilation,
                         kernel_dilation=module.kernel_dilation, use_bias=False, dtype=x.dtype,
                         precision=module.precision)
        return window.apply({"params": {"kernel": a}}, x)
    x_spec, _, _, in_letters, _ = _einsum_axes(module)
    kept = "".join(c for c in x_spec if c not in in_letters)
    return jnp.einsum(f"{x_spec},{in_letters}{_RANK}->{kept}{_RANK}", x, a)


def _up(kind: str, module: nn.Module, hidden: jax.Array, b: jax.Array) -> jax.Array:
    """``B(hidden)``, shaped like the layer's output."""
    if kind != "einsum":
        rows = hidden.reshape(-1, b.shape[0]) @ b.reshape(b.shape[0], -1)
        return rows.reshape(hidden.shape[:-1] + b.shape[1:])
    x_spec, _, out_spec, in_letters, out_letters = _einsum_axes(module)
    kept = "".join(c for c in x_spec if c not in in_letters)
    return jnp.einsum(f"{kept}{_RANK},{_RANK}{out_letters}->{out_spec}", hidden, b)


def _checked_kernel(module: nn.Module, kind: str, adapter_name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    kernel = nn.meta.unbox(module.get_variable("params", "embedding" if kind == "embed" else "kernel"))
    if a.shape[:-1] + b.shape[1:] != kernel.shape or a.shape[-1] != b.shape[0]:
        raise AdapterError(f"adapter {adapter_name!r} at {'.'.join(module.path)} has lora_A {a.shape} and "
                           f"lora_B {b.shape}, which do not fit the layer's weight {kernel.shape}: the adapter "
                           "was made for another model")
    return kernel


def param_delta(a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
    """``scaling * A B`` in float32 for the factors of one parameter (each in the parameter's axis order, size 1
    where it does not vary, then the rank): the change of the parameter, stacked like ``scaling``."""
    delta = jnp.einsum("...r,...r->...", a.astype(jnp.float32), b.astype(jnp.float32))
    scaling = jnp.asarray(scaling, jnp.float32)
    return scaling.reshape(scaling.shape + (1,) * (delta.ndim - scaling.ndim)) * delta


def _dropped_out(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


LEAVES = ("lora_A", "lora_B", "lora_scaling", MAGNITUDE)


def _through_own_params(next_fun, args, kwargs, module: nn.Module, adapter_name: str, config: LoraConfig,
                        dropout: bool):
    """A call of a module that holds the adapter on its own parameters, run through its jaxpr: each contraction of
    a parameter in ``own_params`` gains ``scaling * B(A(x))``; each parameter of ``target_parameters`` is replaced
    by ``W + scaling * A B`` wherever the call uses it, or, where the call uses it only in dot products (or grouped
    expert matmuls) that its factors fit, takes the same, cheaper, path as ``own_params``:
    ``x (W + s A B) = x W + s B(A(x))``."""
    own = own_matrices(module)
    traced = _contractions.trace_call(next_fun, args, kwargs)
    factored = own_param_leaves(module, adapter_name, LEAVES)
    whole = own_param_leaves(module, adapter_name, LEAVES, TARGET_PARAMS)
    if whole:
        uses = _contractions.factorable_roles(traced, {name: own[name] for name in whole})
        for name in [n for n in whole if n in uses and n not in factored]:
            if all(_factors_fit(whole[name], roles) for roles in uses[name]):
                factored[name] = whole.pop(name)
    replaced = {name: (own[name].astype(jnp.float32) + param_delta(leaves["lora_A"], leaves["lora_B"],
                                                                   leaves["lora_scaling"])).astype(own[name].dtype)
                for name, leaves in whole.items()}

    def add_update(contraction: _contractions.Contraction, invals: list):
        leaves = factored.get(contraction.view.param)
        if leaves is None:
            return None
        base = _contractions.bind(contraction.eqn, invals)[0]
        invals = list(invals)
        x = invals[1 - contraction.weight].astype(base.dtype)
        invals[1 - contraction.weight] = _dropped_out(module, x, config.lora_dropout) if dropout else x
        scaling = leaves["lora_scaling"].astype(base.dtype)
        update = _contractions.low_rank_dot(contraction, invals, leaves["lora_A"].astype(base.dtype),
                                            leaves["lora_B"].astype(base.dtype), scaling).astype(base.dtype)
        if MAGNITUDE not in leaves:
            return base + update
        # DoRA, as for layers: out + (m / ||W + s A B|| - 1) * x W + m / ||W + s A B|| * s x A B, the norm constant
        dropped_base = _contractions.bind(contraction.eqn, invals)[0] if dropout else base
        scale = _contractions.output_scale(contraction, _param_dora_scale(own[contraction.view.param], leaves),
                                           base.ndim).astype(base.dtype)
        return base + (scale - 1) * dropped_base + scale * update

    return _contractions.evaluate_traced(traced, own, add_update, replaced)


def _factors_fit(leaves: dict, roles: dict[int, str]) -> bool:
    """Whether LoRA factors kept for a whole parameter fit a contraction's roles of its axes: A constant along the
    output axes, B along the input axes, both whole along the batch axes."""
    a, b = leaves["lora_A"].shape, leaves["lora_B"].shape
    return all((role != "out" or a[axis] == 1) and (role != "in" or b[axis] == 1)
               and (role != "batch" or a[axis] == b[axis]) for axis, role in roles.items())


def _param_norm(weight: jax.Array, magnitude: jax.Array) -> jax.Array:
    """The L2 norm of a float32 parameter over the axes DoRA's magnitude does not have (its input axes; summing
    over an axis of size 1 changes nothing), kept as axes of size 1."""
    axes = tuple(i for i, size in enumerate(magnitude.shape) if size == 1)
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=axes, keepdims=True))


def _param_dora_scale(weight: jax.Array, leaves: dict) -> jax.Array:
    """``m / ||W + scaling * A B||`` for one parameter (1 where the layer is left alone), shaped like ``m``; the
    norm is a constant for the gradient, as HF PEFT's DoRA has it."""
    changed = weight.astype(jnp.float32) + param_delta(leaves["lora_A"], leaves["lora_B"], leaves["lora_scaling"])
    magnitude = jnp.asarray(leaves[MAGNITUDE], jnp.float32)
    scaling = jnp.asarray(leaves["lora_scaling"])
    active = scaling.reshape(scaling.shape + (1,) * (magnitude.ndim - scaling.ndim)) != 0
    return jnp.where(active, magnitude / jax.lax.stop_gradient(_param_norm(changed, magnitude)), 1.0)


def _holds_param_adapter(module: nn.Module, adapter_name: str) -> bool:
    params = module.variables.get("params", {})
    return any(adapter_name in leaves.get("lora_A", {})
               for slot in PARAM_SLOTS for leaves in params.get(slot, {}).values())


def interceptor(config: LoraConfig, adapter_name: str, dropout: bool):
    """Adds the named adapter's update to each adapted layer's output."""
    busy = []
    own_param_calls = OwnParamCalls()
    dropout = dropout and config.lora_dropout > 0

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if trainable_tokens.holds_rows(module, context.method_name, adapter_name):
            indices = module.get_variable("params", TOKEN_INDICES)[adapter_name]
            return trainable_tokens.call_with_rows(module, context.method_name, args, kwargs, adapter_name, indices)
        if context.method_name != "setup" and module.scope is not None and _holds_param_adapter(module, adapter_name):
            return own_param_calls(module, next_fun, args, kwargs, lambda: _through_own_params(
                next_fun, args, kwargs, module, adapter_name, config, dropout))
        kind = layer_kind(module)
        if (busy or kind is None or context.method_name != "__call__"
                or not module.has_variable("params", "lora_A")):
            return next_fun(*args, **kwargs)
        a_by_name = module.get_variable("params", "lora_A")
        if adapter_name not in a_by_name:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        a = nn.meta.unbox(a_by_name[adapter_name])
        b = nn.meta.unbox(module.get_variable("params", "lora_B")[adapter_name])
        scaling = nn.meta.unbox(module.get_variable("params", "lora_scaling")[adapter_name])
        kernel = _checked_kernel(module, kind, adapter_name, a, b)
        compute_dtype = out.dtype
        if kind != "embed":
            x = x.astype(compute_dtype)
            if dropout:
                keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - config.lora_dropout), 0).astype(compute_dtype)
        busy.append(True)
        try:
            # Scaling the rank-sized hidden activations costs far less than scaling the output.
            hidden = _down(kind, module, x, a.astype(compute_dtype)) * scaling.astype(compute_dtype)
            update = _up(kind, module, hidden, b.astype(compute_dtype))
            if not config.use_dora:
                return out + update
            # HF PEFT's DoRA: out + (m / ||W + s A B|| - 1) * (x W) + m / ||W + s A B|| * s x A B, where x W has
            # no bias and uses the dropped-out x when dropout runs; the norm is a constant for the gradient.
            magnitude = nn.meta.unbox(module.get_variable("params", MAGNITUDE)[adapter_name])
            weight = kernel.astype(jnp.float32) + delta_weight(a, b, scaling)
            norm = jax.lax.stop_gradient(_output_norm(weight, scaling.ndim, magnitude.ndim - scaling.ndim))
            # Layers of a stack that the adapter leaves alone (scaling 0) stay exactly the base layer.
            scale = jnp.where(scaling != 0, magnitude.astype(jnp.float32) / norm, 1.0).astype(compute_dtype)
            if dropout:
                base = next_fun(*((x,) + tuple(args[1:])), **kwargs) if args else next_fun(
                    **{**kwargs, next(iter(kwargs)): x})
            else:
                base = out
            if module.has_variable("params", "bias"):
                base = base - nn.meta.unbox(module.get_variable("params", "bias")).astype(compute_dtype)
        finally:
            busy.pop()
        return out + (scale - 1) * base + scale * update

    return adapt


def mixed_interceptor(configs: dict[str, LoraConfig], index: jax.Array, names: tuple[str, ...], dropout: bool):
    """For a batch whose row ``i`` runs adapter ``names[index[i]]``: each layer adapted by several of ``configs``.

    The layer's output is computed once and every row adds its own adapter's update. In Dense and DenseGeneral
    layers each row gathers its adapter's A and B (padded to the largest rank), so the batch costs about what one
    adapter costs; in other layers the adapters run as one LoRA of their summed rank whose hidden units each row
    keeps only for its own adapter. Returns ``adapt(next_fun, args, kwargs, context, here)``, the layer's output
    for the adapters ``here`` that it holds, or ``None`` where the general path must run it (DoRA, dropout, an
    output without the batch on axis 0).
    """
    batch_size = index.shape[0]

    def adapt(next_fun, args, kwargs, context, here):
        module = context.module
        kind = layer_kind(module)
        if kind is None or context.method_name != "__call__" or not module.has_variable("params", "lora_A"):
            return None
        a_by_name = module.get_variable("params", "lora_A")
        if any(name not in a_by_name or configs[name].use_dora or (dropout and configs[name].lora_dropout > 0)
               for name in here):
            return None
        a = [nn.meta.unbox(a_by_name[name]) for name in here]
        b = [nn.meta.unbox(module.get_variable("params", "lora_B")[name]) for name in here]
        scaling = [nn.meta.unbox(module.get_variable("params", "lora_scaling")[name]) for name in here]
        if any(jnp.ndim(s) for s in scaling):
            return None
        for name, a_i, b_i in zip(here, a, b, strict=True):
            _checked_kernel(module, kind, name, a_i, b_i)
        out = next_fun(*args, **kwargs)
        if jnp.ndim(out) == 0 or jnp.shape(out)[0] != batch_size:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        compute_dtype = out.dtype
        if kind != "embed":
            x = x.astype(compute_dtype)
        # Each row's slot in ``here``; rows of other adapters or of the base model take slot len(here), scaling 0.
        slot_of = np.full(len(names), len(here))
        slot_of[[names.index(name) for name in here]] = np.arange(len(here))
        row_slot = jnp.asarray(slot_of)[index]
        row_scaling = jnp.stack([jnp.asarray(s, jnp.float32) for s in scaling] + [jnp.zeros((), jnp.float32)])[
            row_slot].astype(compute_dtype)
        ranks = [a_i.shape[-1] for a_i in a]
        if kind in ("dense", "dense_general"):
            rows, _ = _input_rows(module, x)
            rank = max(ranks)
            a_of_slot = jnp.stack([jnp.pad(a_i.reshape(rows.shape[-1], -1), ((0, 0), (0, rank - a_i.shape[-1])))
                                   for a_i in a] + [jnp.zeros((rows.shape[-1], rank), a[0].dtype)])
            b_of_slot = jnp.stack([jnp.pad(b_i.reshape(b_i.shape[0], -1), ((0, rank - b_i.shape[0]), (0, 0)))
                                   for b_i in b] + [jnp.zeros((rank, b[0][0].size), b[0].dtype)])
            hidden = jnp.einsum("bti,bir->btr", rows, a_of_slot[row_slot].astype(compute_dtype))
            update = jnp.einsum("btr,bro->bto", hidden * row_scaling[:, None, None],
                                b_of_slot[row_slot].astype(compute_dtype))
            return out + update.reshape(out.shape)
        unit_slot = np.repeat(np.arange(len(here)), ranks)  # the slot of each hidden unit of the summed rank
        unit_scaling = jnp.where(row_slot[:, None] == unit_slot[None, :], row_scaling[:, None], 0)
        hidden = _down(kind, module, x, jnp.concatenate(a, axis=-1).astype(compute_dtype))
        hidden = hidden * unit_scaling.reshape((batch_size,) + (1,) * (hidden.ndim - 2) + (sum(ranks),))
        return out + _up(kind, module, hidden, jnp.concatenate(b, axis=0).astype(compute_dtype))

    return adapt


# ----- merge -----

def delta_weight(a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
    """``scaling * A B`` in float32, shaped ``(*stack, *input axes, *output axes)``: the layer's kernel layout."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    stack = scaling.shape
    rank = a.shape[-1]
    in_axes, out_axes = a.shape[len(stack):-1], b.shape[len(stack) + 1:]
    product = (a.reshape(stack + (-1, rank)) @ b.reshape(stack + (rank, -1))).reshape(stack + in_axes + out_axes)
    return scaling.astype(jnp.float32).reshape(stack + (1,) * (product.ndim - len(stack))) * product


def _follows_parameter(layer_params: dict, a: jax.Array) -> bool:
    """Whether the leaves belong to one parameter (each factor keeps its axes, then the rank) rather than a layer."""
    return len(layer_params) == 1 and a.ndim == jnp.ndim(nn.meta.unbox(next(iter(layer_params.values())))) + 1


def merge_layer(config: LoraConfig, layer_params: dict, leaves: dict, sign: float) -> dict:
    """The layer's kernel (or embedding table, or the one parameter the leaves follow) plus
    ``sign * scaling * A B``, computed in float32; an embedding with ``trainable_token_indices`` rows gets them."""
    if TOKEN_ROWS in leaves:
        if sign < 0:
            raise AdapterError("trainable_token_indices rows cannot be taken out of a merged table without the "
                               "original rows; use jaxpeft.unmerge")
        return trainable_tokens.merged_table(layer_params, leaves[TOKEN_ROWS], leaves[TOKEN_INDICES])
    a, b, scaling = (jnp.asarray(nn.meta.unbox(leaves[k])) for k in ("lora_A", "lora_B", "lora_scaling"))
    if _follows_parameter(layer_params, a):
        kernel_name = next(iter(layer_params))
        kernel = layer_params[kernel_name]
        value = nn.meta.unbox(kernel)
        if MAGNITUDE in leaves and sign < 0:
            raise AdapterError("unmerging a DoRA adapter needs the original kernel; use jaxpeft.unmerge")
        changed = value.astype(jnp.float32) + sign * param_delta(a, b, scaling)
        if MAGNITUDE in leaves:
            changed = _param_dora_scale(value, {**leaves, "lora_A": a, "lora_B": b, "lora_scaling": scaling}) * changed
        changed = changed.astype(value.dtype)
        return {kernel_name: kernel.replace_boxed(changed) if isinstance(kernel, nn.meta.AxisMetadata) else changed}
    else:
        kernel_name = "embedding" if "embedding" in layer_params else "kernel"
        delta = delta_weight(a, b, scaling)
    kernel = layer_params[kernel_name]
    value = nn.meta.unbox(kernel)
    if delta.shape != value.shape:
        raise AdapterError(f"adapter shape {delta.shape} does not fit the layer's {kernel_name} {value.shape}")
    if MAGNITUDE in leaves:
        if sign < 0:
            raise AdapterError("unmerging a DoRA adapter needs the original kernel; use jaxpeft.unmerge")
        merged = _dora_factor(value, delta, leaves, scaling) * (value.astype(jnp.float32) + delta)
    else:
        merged = value.astype(jnp.float32) + sign * delta
    merged = merged.astype(value.dtype)
    return {kernel_name: kernel.replace_boxed(merged) if isinstance(kernel, nn.meta.AxisMetadata) else merged}


def _dora_factor(original: jax.Array, delta: jax.Array, leaves: dict, scaling: jax.Array) -> jax.Array:
    """``m / ||W + scaling * A B||`` (1 where scaling is 0), shaped to multiply the kernel."""
    magnitude = jnp.asarray(nn.meta.unbox(leaves[MAGNITUDE]), jnp.float32)
    n_out = magnitude.ndim - scaling.ndim
    norm = _output_norm(original.astype(jnp.float32) + delta, scaling.ndim, n_out)
    factor = jnp.where(scaling.reshape(scaling.shape + (1,) * n_out) != 0, magnitude / norm, 1.0)
    n_in = delta.ndim - magnitude.ndim
    return factor.reshape(scaling.shape + (1,) * n_in + magnitude.shape[scaling.ndim:])


def unmerge_layer(config: LoraConfig, layer_params: dict, leaves: dict, original_params: dict) -> dict:
    """Takes the adapter out of merged layer params; DoRA divides by the factor merge used, which needs the
    original kernel (``original_params``, the layer's params in the tree that was merged), and so does an embedding
    with ``trainable_token_indices`` rows (its original table)."""
    if TOKEN_ROWS in leaves:
        return {"embedding": original_params["embedding"]}
    if MAGNITUDE not in leaves:
        return merge_layer(config, layer_params, leaves, -1.0)
    a = jnp.asarray(nn.meta.unbox(leaves["lora_A"]))
    if _follows_parameter(layer_params, a):
        name = next(iter(layer_params))
        kernel, original = layer_params[name], jnp.asarray(nn.meta.unbox(original_params[name]))
        b, scaling = (jnp.asarray(nn.meta.unbox(leaves[k])) for k in ("lora_B", "lora_scaling"))
        factor = _param_dora_scale(original, {**leaves, "lora_A": a, "lora_B": b, "lora_scaling": scaling})
        value = nn.meta.unbox(kernel)
        restored = (value.astype(jnp.float32) / factor - param_delta(a, b, scaling)).astype(value.dtype)
        return {name: kernel.replace_boxed(restored) if isinstance(kernel, nn.meta.AxisMetadata) else restored}
    if "kernel" not in original_params:
        raise AdapterError("unmerging a DoRA adapter needs the original kernel: pass the variables that were merged")
    kernel = layer_params["kernel"]
    value = nn.meta.unbox(kernel)
    a, b, scaling = (jnp.asarray(nn.meta.unbox(leaves[k])) for k in ("lora_A", "lora_B", "lora_scaling"))
    delta = delta_weight(a, b, scaling)
    factor = _dora_factor(jnp.asarray(nn.meta.unbox(original_params["kernel"])), delta, leaves, scaling)
    restored = (value.astype(jnp.float32) / factor - delta).astype(value.dtype)
    return {"kernel": kernel.replace_boxed(restored) if isinstance(kernel, nn.meta.AxisMetadata) else restored}


# ----- defaults and HF PEFT tensors -----

def task_defaults(config: LoraConfig, model) -> dict[str, Any]:
    """The architecture's default ``target_modules`` when the config names none (and no ``target_parameters``)."""
    if config.target_modules is None and config.target_parameters is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}


def _lora_layout(kind: str, factor: str, jax_shape: tuple[int, ...], window_ndim: int = 0):
    """(torch shape, to_hf, from_hf) of one layer's ``lora_A`` or ``lora_B``."""
    if kind == "conv" and factor == "lora_A":  # (*window, in, r) -> [r, in, *window]
        n = len(jax_shape)
        return _layouts.transpose_layout(jax_shape, (n - 1, n - 2, *range(n - 2)))
    if kind == "conv":  # (r, out) -> [out, r, 1, ...]: a 1x...x1 convolution
        rank, out = jax_shape
        ones = (1,) * window_ndim
        return (out, rank) + ones, lambda x: x.T.reshape((out, rank) + ones), lambda t: t.reshape(out, rank).T
    if factor == "lora_A":
        return _layouts.matrix_layout(jax_shape, len(jax_shape) - 1, transpose=True)
    return _layouts.matrix_layout(jax_shape, 1, transpose=True)


def _magnitude_layout(kind: str, jax_shape: tuple[int, ...], window_ndim: int):
    """(torch shape, to_hf, from_hf) of one layer's DoRA magnitude ``(*output axes)``."""
    if kind == "conv":  # (out,) -> [1, out, 1, ...]
        return _layouts.reshape_layout(jax_shape, (1,) + tuple(jax_shape) + (1,) * window_ndim)
    return _layouts.plain_layout(jax_shape, flat=True)


def torch_tensors(config: Any, layer: Layer, name: str, shapes: dict[Path, tuple[int, ...]]) -> dict:
    del config, name
    if (TOKEN_ROWS,) in shapes:  # torch PEFT's TrainableTokensWrapper around the embedding
        layout = _layouts.plain_layout(shapes[(TOKEN_ROWS,)], flat=False)
        return {f"token_adapter.{TOKEN_ROWS}": ((TOKEN_ROWS,), layout)}
    a_shape = shapes[("lora_A",)]
    window_ndim = len(a_shape) - 2
    embed = layer.kind == "embed"
    tensors = {
        "lora_embedding_A" if embed else "lora_A.weight": (("lora_A",), _lora_layout(layer.kind, "lora_A", a_shape)),
        "lora_embedding_B" if embed else "lora_B.weight": (
            ("lora_B",), _lora_layout(layer.kind, "lora_B", shapes[("lora_B",)], window_ndim)),
    }
    if (MAGNITUDE,) in shapes:
        tensors[MAGNITUDE] = ((MAGNITUDE,), _magnitude_layout(layer.kind, shapes[(MAGNITUDE,)], window_ndim))
    return tensors


def _param_factor_layout(roles: tuple[str, ...], factor: str, jax_shape: tuple[int, ...]):
    """(torch shape, to_hf, from_hf) of LoRA's A or B on one parameter, as HF PEFT's ``ParamWrapper`` keeps them:
    A ``[experts * r, in]`` (rows expert by expert), B ``[out, r * experts]`` (columns rank by rank); without
    leading expert axes, a Linear's ``[r, in]`` and ``[out, r]``. jaxpeft keeps both in the parameter's axis order
    (size 1 where they do not vary), then the rank."""
    dropped = "out" if factor == "lora_A" else "in"
    kept = [i for i, role in enumerate(roles) if role != dropped]
    groups = {role: [kept.index(i) for i, r in enumerate(roles) if r == role and i in kept]
              for role in ("batch", "in", "out")}
    rank_axis = len(kept)
    order = (groups["batch"] + [rank_axis] + groups["in"] if factor == "lora_A"
             else groups["out"] + [rank_axis] + groups["batch"])
    squeezed = tuple(jax_shape[i] for i in kept) + (jax_shape[-1],)
    moved = tuple(squeezed[i] for i in order)
    split = 1 + len(groups["batch"]) if factor == "lora_A" else len(groups["out"])
    hf_shape = (math.prod(moved[:split]), math.prod(moved[split:]))
    inverse = tuple(np.argsort(order))

    def to_hf(x):
        return np.transpose(x.reshape(squeezed), order).reshape(hf_shape)

    def from_hf(t):
        return np.transpose(np.asarray(t).reshape(moved), inverse).reshape(jax_shape)

    return hf_shape, to_hf, from_hf


def torch_param_tensors(layer: Layer, shapes: dict[Path, tuple[int, ...]]) -> dict:
    return {f"{factor}.weight": ((factor,), _param_factor_layout(layer.roles, factor, shapes[(factor,)]))
            for factor in ("lora_A", "lora_B")}


METHOD = register(Method(
    config_class=LoraConfig, leaf_keys=("lora_A", "lora_B", "lora_scaling"),
    optional_leaf_keys=(MAGNITUDE, TOKEN_ROWS, TOKEN_INDICES), constant_keys=("lora_scaling", TOKEN_INDICES),
    create=create, finish=finish, interceptor=interceptor,
    mixed_interceptor=mixed_interceptor, merge_layer=merge_layer, unmerge_layer=unmerge_layer,
    task_defaults=task_defaults, torch_tensors=torch_tensors, torch_param_tensors=torch_param_tensors,
    leaf_layouts={"lora_A": ("stack", "in", None), "lora_B": ("stack", None, "out"), "lora_scaling": ("stack",),
                  MAGNITUDE: ("stack", "out"), TOKEN_ROWS: (None, "out"), TOKEN_INDICES: (None,)}))
