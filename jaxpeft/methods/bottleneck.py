"""Bottleneck adapters: small ``down -> non-linearity -> up`` networks added to a transformer's sub-layers
(Houlsby et al., 2019; Pfeiffer et al., 2021; the parallel adapter of He et al., 2022).

Where they attach. An adapter sits on the output projection of a sub-layer, a Dense layer, and changes that
layer's output ``h``, before the model's dropout, residual add and LayerNorm:

- sequential (``"houlsby"``, ``"pfeiffer"``): ``h + scaling * up(act(down(h)))``;
- parallel (``"parallel"``): ``h + scaling * up(act(down(x)))``, where ``x`` is the sub-layer's input, the first
  argument of the module that the adapter reads (see below).

``"houlsby"`` (the default) adapts the attention and the feed-forward outputs (``mh_adapter`` and
``output_adapter``), ``"pfeiffer"`` and ``"parallel"`` the feed-forward output only. The output projections are
found by name, with the same dotted names as Hugging Face (``ATTACH_POINTS``): GPT-2 ``attn.c_proj``/``mlp.c_proj``,
Llama, Mistral and Qwen ``self_attn.o_proj``/``mlp.down_proj``, BERT and RoBERTa ``attention.output.dense``/
``output.dense``, DistilBERT ``attention.out_lin``/``ffn.lin2``; the longest matching name ending wins, so BERT's
``attention.output.dense`` is an attention point and not a feed-forward one.

Your own models. Name the output projections with ``attention_modules=[...]`` and ``feedforward_modules=[...]``
(names or dotted endings, or a full-match regex), or put adapters exactly on ``target_modules=[...]``. A parallel
adapter reads the input of the module that holds its output projection (``mlp.c_proj`` reads ``mlp``'s input);
where that is not the sub-layer's input, say which module to read with ``parallel_inputs``: ``{"ffn_out":
"ffn_in"}`` replaces the name ending ``ffn_out`` by ``ffn_in`` (the built-in BERT rule is ``{"output.dense":
"intermediate"}``). Adapters attach to ``nn.Dense`` and ``nn.DenseGeneral`` layers with one output axis, and to
any other module whose call returns one array (a library's own einsum layer, a whole feed-forward block): ``hidden``
is the last axis of that output.

Leaves kept in an adapted layer's parameters, for adapter ``name``, with ``hidden`` the layer's output size and
``bottleneck = hidden / reduction_factor``:

- ``adapter_down_kernel/<name>``: ``(*stack, hidden, bottleneck)``, kaiming-uniform (``U(+-1/sqrt(hidden))``, torch
  ``nn.Linear``'s default; with the zero biases and up projection, AdapterHub's ``init_weights="mam_adapter"``);
- ``adapter_down_bias/<name>``: ``(*stack, bottleneck)``, zeros;
- ``adapter_up_kernel/<name>``: ``(*stack, bottleneck, hidden)``, zeros, so the adapted model starts equal to the
  base;
- ``adapter_up_bias/<name>``: ``(*stack, hidden)``, zeros;
- ``adapter_scaling/<name>``: ``(*stack,)`` float32, ``scaling`` on the adapted layers and 0 on the layers of a
  scanned stack that the config leaves alone. A constant, never trained.

Kernels are ``[in, out]`` (the transpose of torch's ``nn.Linear.weight``); all leaves are float32, the adapter
computes in the layer's output dtype. ``*stack`` is ``(num_layers,)`` under ``nn.scan`` and empty otherwise.

Dropout (``dropout``) drops the adapter's output before it is added. Bottleneck adapters are non-linear and cannot
be merged into the base weights: ``merge``/``merge_and_unload`` raise an ``AdapterError``. Differences from
AdapterHub's adapters: the adapter reads the output projection's output before the model's dropout (AdapterHub's
after it, which is the same in evaluation), and the original LayerNorm always comes after the adapter
(AdapterHub's ``original_ln_before=False``; its ``"pfeiffer"`` reads after the LayerNorm). ``peft_type`` is jaxpeft's
own ``"BOTTLENECK"``: HF PEFT has no bottleneck adapters.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
    >>> from jaxpeft.methods.bottleneck import AdapterConfig
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = x + nn.Dense(8, name="attn_out")(x)
    ...         return x + nn.Dense(8, name="ffn_out")(nn.relu(nn.Dense(32, name="ffn_in")(x)))
    >>> model, x = Block(), jnp.ones((1, 8))
    >>> config = AdapterConfig(preset="pfeiffer", reduction_factor=4, feedforward_modules=["ffn_out"])
    >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, model.init(jax.random.key(1), x),
    ...                                   x)
    >>> variables["params"]["ffn_out"]["adapter_down_kernel"]["default"].shape
    (8, 2)
    >>> bool(jnp.array_equal(jaxpeft.rewrite(model.apply, config)(variables, x), model.apply(variables, x)))
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _targets
from jaxpeft._tracing import Layer, Trace
from jaxpeft.config import (
    PeftConfig,
    check,
    is_finite_number,
    layer_indices,
    plain_number,
    strict_options,
)
from jaxpeft.core import AdapterError, check_layers_exist
from jaxpeft.method import Method, register

Path = tuple[str, ...]
KINDS = ("dense", "dense_general")
TRAINABLE_KEYS = ("adapter_down_kernel", "adapter_down_bias", "adapter_up_kernel", "adapter_up_bias")
SCALING_KEY = "adapter_scaling"

# Output projection name ending -> (sub-layer, the module whose input a parallel adapter reads, named by replacing
# that ending).
ATTACH_POINTS: dict[str, tuple[str, str]] = {
    "attn.c_proj": ("attention", "attn"),  # GPT-2
    "mlp.c_proj": ("feedforward", "mlp"),
    "self_attn.o_proj": ("attention", "self_attn"),  # Llama, Mistral, Qwen
    "mlp.down_proj": ("feedforward", "mlp"),
    "attention.output.dense": ("attention", "attention"),  # BERT, RoBERTa
    "output.dense": ("feedforward", "intermediate"),
    "attention.out_lin": ("attention", "attention"),  # DistilBERT
    "ffn.lin2": ("feedforward", "ffn"),
}

# AdapterHub's configurations (``DoubleSeqBnConfig``, ``SeqBnConfig``, ``ParBnConfig``): the defaults of the options
# a config leaves at None.
PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": dict(mh_adapter=True, output_adapter=True, is_parallel=False, reduction_factor=16,
                    non_linearity="swish", scaling=1.0),
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, is_parallel=False, reduction_factor=16,
                     non_linearity="relu", scaling=1.0),
    "parallel": dict(mh_adapter=False, output_adapter=True, is_parallel=True, reduction_factor=2,
                     non_linearity="relu", scaling=4.0),
}
PRESET_ALIASES = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

Patterns = str | Sequence[str] | None


@strict_options
@dataclasses.dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapter options, with AdapterHub's names. Options left at None take the preset's value.

    Attributes:
        preset: ``"houlsby"`` (after attention and feed-forward, swish, reduction 16), ``"pfeiffer"`` (after
            feed-forward, relu, reduction 16) or ``"parallel"`` (beside feed-forward, relu, reduction 2, scaling 4);
            AdapterHub's ``"double_seq_bn"``, ``"seq_bn"``, ``"par_bn"`` are the same.
        reduction_factor: hidden size / bottleneck size; must divide the hidden size.
        non_linearity: ``"relu"``, ``"gelu"``, ``"gelu_new"`` (tanh approximation), ``"silu"``/``"swish"``, ``"tanh"``.
        mh_adapter: an adapter after the attention output projection.
        output_adapter: an adapter after the feed-forward output projection.
        is_parallel: adapters read the sub-layer's input and add to its output (He et al.) instead of reading
            the output.
        scaling: factor on the adapter's output.
        dropout: dropout probability on the adapter's output (``'dropout'`` rng stream).
        init_weights: True (zero up projection: the model starts equal to the base) or False (random: for tests).
        attention_modules / feedforward_modules: the output projections of attention / feed-forward, as names or
            dotted name endings (list) or a full-match regex (string); None: the built-in names (``ATTACH_POINTS``).
        target_modules: the same forms: adapters on exactly these layers, instead of by sub-layer.
        exclude_modules: the same forms, for layers to leave alone.
        parallel_inputs: ``{output projection name ending: replacement}`` naming the module whose input a parallel
            adapter reads, for models where it is not the module holding the output projection.
        layers_to_transform: layer indices (the first number in the dotted name, or the one after
            ``layers_pattern``) that get adapters; None: all.
        leave_out: layer indices that get no adapters (AdapterHub's option; the same indices as
            ``layers_to_transform``).
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``).
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.

    Example:
        >>> import transformers, jaxpeft
        >>> from jaxpeft.methods.bottleneck import AdapterConfig
        >>> from jaxpeft.models import AutoModelForSequenceClassification
        >>> base = AutoModelForSequenceClassification.from_config(transformers.DistilBertConfig(
        ...     vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37))
        >>> model = jaxpeft.get_peft_model(base, AdapterConfig(reduction_factor=2, non_linearity="relu"))
        >>> model.print_trainable_parameters()  # 2 layers x 2 adapters x (32*16 + 16 + 16*32 + 32) + the heads
        trainable params: 5,410 || all params: 39,726 || trainable%: 13.6183
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    option_hints: ClassVar[dict[str, str]] = {"config": "preset", "architecture": "preset", "activation":
                                              "non_linearity", "adapter_dropout": "dropout"}

    preset: str = "houlsby"
    reduction_factor: float | None = None
    non_linearity: str | None = None
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    is_parallel: bool | None = None
    scaling: float | None = None
    dropout: float = 0.0
    init_weights: bool = True
    attention_modules: Patterns = None
    feedforward_modules: Patterns = None
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    parallel_inputs: Mapping[str, str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    leave_out: Sequence[int] | None = None
    layers_pattern: Patterns = None
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        preset = PRESET_ALIASES.get(str(self.preset).lower(), str(self.preset).lower())
        check(preset in PRESETS, f"preset={self.preset!r} is unknown; use one of {', '.join(PRESETS)}")
        self.preset = preset
        for name, value in PRESETS[preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        rf = self.reduction_factor
        check(is_finite_number(rf) and rf >= 1, f"reduction_factor must be a number >= 1 and finite (hidden size / "
                                                f"bottleneck size), got reduction_factor={rf!r}")
        self.non_linearity = str(self.non_linearity).lower()
        check(self.non_linearity in ACTIVATIONS, f"non_linearity={self.non_linearity!r} is unknown; use one of "
                                                 f"{', '.join(ACTIVATIONS)}")
        for name in ("mh_adapter", "output_adapter", "is_parallel", "init_weights"):
            check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        check(is_finite_number(self.scaling), f"scaling must be a finite number, got scaling={self.scaling!r}")
        check(is_finite_number(self.dropout) and 0 <= self.dropout < 1,
              f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        self.reduction_factor, self.scaling, self.dropout = (plain_number(v) for v in (rf, self.scaling, self.dropout))
        for name in ("attention_modules", "feedforward_modules", "target_modules", "exclude_modules",
                     "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                value = list(value)
                check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
                setattr(self, name, value)
        if self.target_modules is not None:
            check(self.attention_modules is None and self.feedforward_modules is None,
                  "pass either target_modules (adapters on exactly those layers) or attention_modules/"
                  "feedforward_modules (adapters by sub-layer), not both")
        else:
            check(self.mh_adapter or self.output_adapter,
                  "mh_adapter and output_adapter are both False, so no adapter would be added; set one to True")
        if self.parallel_inputs is not None:
            check(isinstance(self.parallel_inputs, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.parallel_inputs.items()),
                "parallel_inputs must map output projection name endings to module names, e.g. {'ffn_out': 'ffn_in'}")
            self.parallel_inputs = dict(self.parallel_inputs)
        if self.layers_to_transform is not None:
            self.layers_to_transform = layer_indices("layers_to_transform", self.layers_to_transform)
        if self.leave_out is not None:
            leave_out = layer_indices("leave_out", self.leave_out)
            self.leave_out = [leave_out] if isinstance(leave_out, int) else leave_out


# ----- which layers get adapters -----

def _roles(config: AdapterConfig) -> dict[str, Patterns]:
    """``{sub-layer role: patterns}``; None patterns mean the built-in ``ATTACH_POINTS``."""
    if config.target_modules is not None:
        return {"target": config.target_modules}
    roles = {}
    if config.mh_adapter:
        roles["attention"] = config.attention_modules
    if config.output_adapter:
        roles["feedforward"] = config.feedforward_modules
    return roles


def _built_in_role(name: str) -> str | None:
    """The sub-layer of the longest ``ATTACH_POINTS`` name ending that ``name`` has, if any."""
    endings = [ending for ending in ATTACH_POINTS if _targets.matches(name, [ending])]
    return ATTACH_POINTS[max(endings, key=len)][0] if endings else None


def _option_name(role: str) -> str:
    return "target_modules" if role == "target" else f"{role}_modules"


def _matched_roles(roles: dict[str, Patterns], name: str) -> list[str]:
    hits = [role for role, patterns in roles.items() if patterns is not None and _targets.matches(name, patterns)]
    built_in = _built_in_role(name)
    if built_in in roles and roles[built_in] is None:
        hits.append(built_in)
    return hits


def _check_patterns(trace: Trace, roles: dict[str, Patterns]) -> None:
    """Errors for listed names that match no module, and for named modules an adapter cannot attach to."""
    layers = attachable_layers(trace)
    for role, patterns in roles.items():
        if patterns is None:
            continue
        entries = [patterns] if isinstance(patterns, str) else patterns
        for entry in entries:
            form = entry if isinstance(patterns, str) else [entry]
            matched = [(path, name) for path, virtual in trace.module_virtual_paths.items() if path
                       for name in virtual.values() if _targets.matches(name, form)]
            if not matched:
                raise AdapterError(f"{_option_name(role)} entry {entry!r} matched no module; modules that exist: "
                                   f"{trace.existing_paths()}")
            if isinstance(patterns, str) and any(path in layers for path, _ in matched):
                continue  # a regex may also match the containers of the layers it names
            for path, name in matched:
                if path not in layers:
                    kind = trace.module_types[path]
                    raise AdapterError(f"{_option_name(role)} matched {name!r} (a {kind} whose output is not one "
                                       "array); bottleneck adapters add to a module's output: name a module that "
                                       "returns one array, e.g. the sub-layer's output projection")


def attachable_layers(trace: Trace) -> dict[Path, Layer]:
    """The modules an adapter can attach to: Dense and DenseGeneral layers, and any other module (not a stock
    layer) whose call returns one array, as a layer of kind ``"output"``."""
    found = {path: layer for path, layer in trace.layers.items() if layer.kind in KINDS}
    for path, output in trace.module_outputs.items():
        if path and path not in trace.layers:
            found[path] = Layer(path, "output", None, tuple(output.shape), output.dtype, 0, trace.stack_shape(path),
                                trace.module_virtual_paths[path], False)
    return found


def select_layers(config: AdapterConfig, trace: Trace) -> dict[Path, Layer]:
    """The layers that get adapters, each with the stack indices it applies to (``Layer.virtual_paths``)."""
    roles = _roles(config)
    check_layers_exist(config, trace)
    _check_patterns(trace, roles)
    selected: dict[Path, Layer] = {}
    found: dict[str, list[str]] = {role: [] for role in roles}
    for path, layer in attachable_layers(trace).items():
        hits = {}
        for index, name in layer.virtual_paths.items():
            if (_targets.matches(name, config.exclude_modules)
                    or _targets.is_saved_module(name, config.modules_to_save)):
                continue
            matched = _matched_roles(roles, name)
            if len(matched) > 1:
                raise AdapterError(f"{name!r} matches both {' and '.join(map(_option_name, matched))}; narrow them")
            if matched:
                found[matched[0]].append(name)
                left_out = bool(config.leave_out) and _targets.in_layers(name, config.leave_out, config.layers_pattern)
                if not left_out and _targets.in_layers(name, config.layers_to_transform, config.layers_pattern):
                    hits[index] = name
        if hits:
            selected[path] = dataclasses.replace(layer, virtual_paths=hits)
    missing = [role for role, names in found.items() if not names]
    if missing:
        built_in = ", ".join(f"{ending!r}" for ending, (role, _) in ATTACH_POINTS.items() if role in missing)
        fixes = [f"{_option_name(role)}=[...]" + (" (or mh_adapter=False)" if role == "attention" else "")
                 for role in missing]
        raise AdapterError(f"found no {' or '.join(missing)} output projection by name (built-in names: "
                           f"{built_in}); name them with {' and '.join(fixes)}, or use target_modules=[...]; "
                           f"modules that exist: {trace.existing_paths()}")
    if not selected:
        raise AdapterError(f"layers_to_transform={config.layers_to_transform!r} and leave_out={config.leave_out!r} "
                           f"left no layer to adapt (of {', '.join(n for names in found.values() for n in names[:4])}"
                           ", ...)")
    return selected


def parallel_input_path(config: AdapterConfig, path: Path) -> Path:
    """The path of the module whose first argument a parallel adapter at ``path`` reads."""
    name = ".".join(path)
    for table in (config.parallel_inputs or {}, {k: v for k, (_, v) in ATTACH_POINTS.items()}):
        endings = [ending for ending in table if _targets.matches(name, [ending])]
        if endings:
            ending = max(endings, key=len)
            return path[:len(path) - len(ending.split("."))] + tuple(table[ending].split("."))
    return path[:-1]


# ----- create -----

def _hidden_size(layer: Layer) -> int:
    if layer.kind == "output":  # kernel_shape holds the output's shape
        return int(layer.kernel_shape[-1])
    module = layer.module
    features = module.features
    if layer.kind == "dense_general":
        if tuple(module.batch_dims):
            raise AdapterError(f"bottleneck adapters cannot attach to DenseGeneral {layer.name} with batch_dims")
        features = tuple(features) if isinstance(features, Sequence) else (features,)
        if len(features) != 1:
            raise AdapterError(f"bottleneck adapters attach to layers with one output axis; {layer.name} has "
                               f"{features}: choose the layer after it")
        features = features[0]
    return int(features)


def _bottleneck_size(config: AdapterConfig, layer: Layer, hidden: int) -> int:
    size = hidden / config.reduction_factor
    if size != int(size) or size < 1:
        divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
        raise AdapterError(f"reduction_factor={config.reduction_factor} does not divide the hidden size {hidden} of "
                           f"{layer.name}; use one of {divisors}")
    return int(size)


def _create_layer(key: jax.Array, config: AdapterConfig, layer: Layer, dtype: Any) -> dict[str, jax.Array]:
    hidden = _hidden_size(layer)
    size = _bottleneck_size(config, layer, hidden)
    stack = layer.stack_shape
    shapes = {"adapter_down_kernel": stack + (hidden, size), "adapter_down_bias": stack + (size,),
              "adapter_up_kernel": stack + (size, hidden), "adapter_up_bias": stack + (hidden,)}
    fan_in = {"adapter_down_kernel": hidden, "adapter_down_bias": hidden, "adapter_up_kernel": size,
              "adapter_up_bias": size}
    drawn = ("adapter_down_kernel",) if config.init_weights else TRAINABLE_KEYS
    # One draw for the whole layer, then torch nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per leaf.
    sizes = [math.prod(shapes[k]) for k in drawn]
    noise = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
    leaves = {k: jnp.zeros(shape, dtype) for k, shape in shapes.items()}
    for k, start, n in zip(drawn, np.cumsum([0] + sizes[:-1]), sizes, strict=True):
        leaves[k] = noise[start:start + n].reshape(shapes[k]) / math.sqrt(fan_in[k])
    scaling = np.zeros(stack, np.float32)
    for index in layer.virtual_paths:
        scaling[index] = config.scaling
    leaves[SCALING_KEY] = jnp.asarray(scaling)
    return leaves


def create(key: jax.Array, config: AdapterConfig, trace: Trace, dtype: Any) -> dict[tuple[Path, str], Any]:
    """Adapter leaves for every output projection the config selects in the traced model."""
    layers = select_layers(config, trace)
    leaves = {}
    for i, (path, layer) in enumerate(sorted(layers.items())):
        if config.is_parallel:
            source = parallel_input_path(config, path)
            if source not in trace.module_types:
                raise AdapterError(f"the parallel adapter at {layer.name} would read the input of "
                                   f"{'.'.join(source)}, which the model does not call; name the module to read with "
                                   "parallel_inputs={...}")
        for leaf_key, value in _create_layer(jax.random.fold_in(key, i), config, layer, dtype).items():
            leaves[(path, leaf_key)] = value
    return leaves


# ----- forward -----

def _first_argument(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)


def interceptor(config: AdapterConfig, adapter_name: str, dropout: bool):
    """Adds the named adapter's bottleneck output to each adapted layer's output."""
    dropout = dropout and config.dropout > 0
    activation = ACTIVATIONS[config.non_linearity]
    # Parallel adapters read a module's input: the first argument of each module's latest call, by module path.
    # Every module the adapter reads is called before the layer that adds to its output, in the same trace.
    module_inputs: dict[Path, Any] = {}

    def adapt(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if config.is_parallel:
            module_inputs[path] = _first_argument(args, kwargs)
        down_by_name = module.variables.get("params", {}).get("adapter_down_kernel", {})
        if adapter_name not in down_by_name:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        name = ".".join(path)
        x = out
        if config.is_parallel:
            source = parallel_input_path(config, path)
            x = module_inputs.get(source)
            if x is None and not any(path[:i] in module_inputs for i in range(len(path))):
                raise AdapterError(f"the parallel adapter at {name} saw no call of the modules around it: parallel "
                                   "adapters read another module's input, which a mixed-adapter batch (AdapterMix) "
                                   "does not show them; run this adapter on its own batch")
            if x is None:
                raise AdapterError(f"the parallel adapter at {name} reads the input of {'.'.join(source)}, which "
                                   "was not called before it; name the module to read with parallel_inputs={...}")
        leaves = [nn.meta.unbox(module.get_variable("params", key)[adapter_name]) for key in TRAINABLE_KEYS]
        down_kernel, down_bias, up_kernel, up_bias = leaves
        if down_kernel.shape[0] != x.shape[-1] or up_kernel.shape[-1] != out.shape[-1]:
            raise AdapterError(f"adapter {adapter_name!r} at {name} maps {down_kernel.shape[0]} -> "
                               f"{up_kernel.shape[-1]} features, but reads {x.shape[-1]} and adds to "
                               f"{out.shape[-1]}: the adapter was made for another model")
        scaling = nn.meta.unbox(module.get_variable("params", SCALING_KEY)[adapter_name])
        dtype = out.dtype
        hidden = activation(x.astype(dtype) @ down_kernel.astype(dtype) + down_bias.astype(dtype))
        update = hidden @ up_kernel.astype(dtype) + up_bias.astype(dtype)
        if dropout:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, update.shape)
            update = jnp.where(keep, update / (1.0 - config.dropout), 0).astype(dtype)
        return out + scaling.astype(dtype) * update

    return adapt


# No merge_layer: the adapter is non-linear, so ``merge`` raises an AdapterError.
METHOD = register(Method(
    config_class=AdapterConfig, leaf_keys=TRAINABLE_KEYS + (SCALING_KEY,), constant_keys=(SCALING_KEY,),
    create=create, interceptor=interceptor, cli_name="adapter", leaf_layouts={
        "adapter_down_kernel": ("stack", "out", None), "adapter_down_bias": ("stack", None),
        "adapter_up_kernel": ("stack", None, "out"), "adapter_up_bias": ("stack", "out"), SCALING_KEY: ("stack",)}))
