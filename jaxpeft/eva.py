"""EVA: LoRA's A initialised from the principal directions of each layer's inputs (Paischer et al., 2024).

HF PEFT's ``init_lora_weights="eva"`` with ``LoraConfig(eva_config=EvaConfig(...))``: a few batches run through the
base model, each adapted layer's inputs (the tokens the attention mask, and with ``use_label_mask`` the labels,
keep) are collected, and their principal components (right-singular vectors of the centered inputs) become the rows
of HF's ``lora_A.weight`` ``[r, in]``; B stays zero, so the model starts unchanged. Ranks are redistributed: each
layer offers up to ``round(r * rho)`` components, all layers' components are ranked by explained variance ratio,
and the ``sum(r)`` best are kept, so a layer ends with between 0 and ``r * rho`` ranks. The new ranks go to the
config's ``rank_pattern`` (and, with ``adjust_scaling_factors``, ``alpha_pattern`` keeps ``alpha / r`` unchanged),
as HF PEFT records them; a layer that gets rank 0 is dropped from ``target_modules``. Layers that receive the very
same input (q, k and v; gate and up) share one decomposition, as in HF PEFT.

jaxpeft's leaves: ``lora_A/<adapter>`` ``(*input axes, r)`` is the transpose of HF's ``[r, in]`` rows, so it
holds the components as columns; ``lora_B`` is zero.

Differences from HF PEFT, on purpose: jaxpeft takes one exact SVD of all given batches' collected inputs, where HF
PEFT cycles its dataloader through an incremental PCA (a randomized ``svd_lowrank`` per step) until the components'
cosine similarity between steps reaches ``tau``. On one batch (or repeated identical batches) both give the same
subspace and explained variance ratios, up to the randomized SVD's error; on several different batches HF PEFT's
incremental PCA, truncated to ``r * rho`` components, is an approximation of the exact one computed here. ``tau``
is therefore accepted and unused. ``whiten`` divides each component by the square root of its singular value of
the centered inputs (HF PEFT uses the incremental PCA's running singular values, which grow with the number of
passes). Only unscanned models are supported (inside ``nn.scan`` each layer's input is one slice of a scanned
array, out of reach of an interceptor's return value), and only Dense and DenseGeneral layers (HF PEFT leaves
Embedding and Conv layers at LoRA's default initialisation, as jaxpeft does, with a warning).

Example:
    >>> import numpy as np, transformers, jaxpeft
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> from jaxpeft.eva import EvaConfig, initialize_lora_eva_weights
    >>> base = AutoModelForCausalLM.from_config(transformers.LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    >>> model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    >>> batch = {"input_ids": np.arange(40).reshape(2, 20) % 50, "attention_mask": np.ones((2, 20), int)}
    >>> initialize_lora_eva_weights(model, [batch], eva_config=EvaConfig(rho=2.0))
    >>> sum(a.shape[-1] for p, a in jaxpeft.tree.flatten(model.params).items() if p[-2] == "lora_A")  # 2 + 2 moved
    4
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import tree
from jaxpeft._tracing import Layer, trace_layers
from jaxpeft.config import check, is_finite_number
from jaxpeft.core import AdapterError

Path = tuple[str, ...]
EVA_KINDS = ("dense", "dense_general")


@dataclasses.dataclass
class EvaConfig:
    """EVA's options, with HF PEFT's names and defaults (``peft.EvaConfig``).

    Attributes:
        rho: how far ranks may move between layers (>= 1): a layer can get up to ``round(r * rho)`` ranks; 1 keeps
            every layer at r.
        tau: HF PEFT's cosine-similarity threshold for stopping its incremental SVD; jaxpeft's SVD is exact, so it
            is accepted and unused.
        use_label_mask: leave out the positions whose ``labels`` equal ``label_mask_value`` (when the batch has
            labels), besides the padding the attention mask leaves out.
        label_mask_value: the label of ignored positions.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale ``lora_alpha`` with the new rank (``alpha * new_r / r`` in
            ``alpha_pattern``), so that each layer's ``alpha / r`` stays as configured.

    Example:
        >>> EvaConfig(rho=1.0).rho
        1.0
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self):
        check(is_finite_number(self.rho) and self.rho >= 1, f"EvaConfig rho must be >= 1, got rho={self.rho!r}")
        check(is_finite_number(self.tau) and 0 <= self.tau <= 1,
              f"EvaConfig tau must be between 0 and 1, got tau={self.tau!r}")


@dataclasses.dataclass(frozen=True)
class EvaLayer:
    """One layer's EVA result: ``components`` ``[rank, in]`` (HF's ``lora_A.weight``; rank may be 0) and the
    explained variance ratio of each kept component."""

    path: Path
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def rank(self) -> int:
        return self.components.shape[0]


# ----- collecting layer inputs -----

def token_mask(batch: Mapping[str, Any], eva_config: EvaConfig) -> np.ndarray:
    """``(batch, seq)`` booleans: the positions whose inputs enter the SVD (HF PEFT's language-modelling rule)."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    if eva_config.use_label_mask and batch.get("labels") is not None:
        mask &= np.asarray(batch["labels"]) != eva_config.label_mask_value
    return mask


def _input_rows(layer: Layer, x: jax.Array) -> jax.Array:
    """A Dense(General) layer's input as ``(*kept axes, inputs)``, inputs flattened as the kernel's input axes."""
    axis = getattr(layer.module, "axis", -1) if layer.kind == "dense_general" else -1
    axes = tuple(ax % x.ndim for ax in (axis if isinstance(axis, Sequence) else (axis,)))
    kept = tuple(ax for ax in range(x.ndim) if ax not in axes)
    return x.transpose(kept + axes).reshape(tuple(x.shape[ax] for ax in kept) + (-1,))


def _collector(apply_fn, layers: dict[Path, Layer], extra_inputs: Mapping[str, Any]):
    """A jitted ``(variables, inputs) -> {path: (*kept axes, n_in) float32}``: each layer's first call's input
    (``extra_inputs``, such as ``deterministic=True``, stay Python values)."""

    def capture(captured):
        def intercept(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and module.scope is not None:
                path = tuple(module.path)
                if path in layers and path not in captured:
                    x = args[0] if args else next(iter(kwargs.values()))
                    captured[path] = _input_rows(layers[path], x).astype(jnp.float32)
            return next_fun(*args, **kwargs)
        return intercept

    @jax.jit
    def collect(variables, inputs):
        captured = {}
        with nn.intercept_methods(capture(captured)):
            apply_fn(variables, **inputs, **extra_inputs)
        return captured

    return collect


def collect_inputs(apply_fn, variables: Any, layers: dict[Path, Layer], batches: Iterable[Mapping[str, Any]],
                   eva_config: EvaConfig, extra_inputs: Mapping[str, Any] | None = None) -> dict[Path, np.ndarray]:
    """``{layer path: (tokens, n_in)}``: every batch's kept tokens' inputs to each layer, batches concatenated."""
    collect = _collector(apply_fn, layers, dict(extra_inputs or {}))
    rows: dict[Path, list[np.ndarray]] = {path: [] for path in layers}
    for batch in batches:
        mask = token_mask(batch, eva_config)
        inputs = {key: jnp.asarray(value) for key, value in batch.items() if key != "labels"}
        captured = collect(variables, inputs)
        for path in layers:
            if path not in captured:
                raise AdapterError(f"EVA: layer {'.'.join(path)} was not called by the model; exclude it")
            x = np.asarray(captured[path], np.float64)
            if x.shape[:-1] != mask.shape:
                raise AdapterError(f"EVA: the input of {'.'.join(path)} has shape {x.shape}, not (batch, seq, "
                                   "features); exclude this layer")
            rows[path].append(x[mask])
    if not all(rows.values()):
        raise ValueError("EVA needs at least one batch; pass a list of batches (dicts with input_ids)")
    return {path: np.concatenate(parts) for path, parts in rows.items()}


# ----- SVD and rank redistribution -----

def principal_components(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components ``[k, n_in]``, explained variance ratios ``[k]``, singular values ``[k]``) of the centered rows
    of ``x``; each component's sign puts its largest entry positive (HF PEFT's ``svd_flip`` on V)."""
    centered = x - x.mean(axis=0)
    _, s, vh = np.linalg.svd(centered, full_matrices=False)
    vh, s = vh[:n_components], s[:n_components]
    signs = np.sign(vh[np.arange(len(vh)), np.abs(vh).argmax(axis=1)])
    total = np.square(centered).sum()
    return vh * signs[:, None], np.square(s) / total, s


def _equal_input_groups(inputs: dict[Path, np.ndarray]) -> dict[Path, Path]:
    """``{layer: the first layer (in call order) whose input equals its own}``, for layers sharing an input."""
    equal_to: dict[Path, Path] = {}
    firsts: list[Path] = []
    for path, x in inputs.items():
        same = next((p for p in firsts if inputs[p].shape == x.shape and np.array_equal(inputs[p], x)), None)
        if same is None:
            firsts.append(path)
        else:
            equal_to[path] = same
    return equal_to


def distribute_ranks(ratios: dict[Path, np.ndarray], budget: int, equal_to: dict[Path, Path]) -> dict[Path, int]:
    """HF PEFT's redistribution: the ``budget`` largest explained variance ratios among all layers' offered
    components (layers that share an input offer the same ones), counted per layer; a layer sharing another's
    input never gets more than that one. Ties rank the deciding layers first, then call order."""
    order = [p for p in ratios if p not in equal_to] + [p for p in ratios if p in equal_to]
    owners = [path for path in order for _ in ratios[path]]
    values = np.concatenate([ratios[path] for path in order])
    chosen = np.argsort(-values, kind="stable")[:budget]
    counts = {path: 0 for path in ratios}
    for i in chosen:
        counts[owners[i]] += 1
    for path, rep in equal_to.items():
        if counts[rep] < counts[path]:
            counts[rep], counts[path] = counts[path], counts[rep]
    return counts


def eva_state(apply_fn, variables: Any, layers: dict[Path, Layer], ranks: dict[Path, int],
              batches: Iterable[Mapping[str, Any]], eva_config: EvaConfig | None = None,
              extra_inputs: Mapping[str, Any] | None = None) -> dict[Path, EvaLayer]:
    """Each layer's EVA components (HF PEFT's ``get_eva_state_dict``) for the base model
    ``apply_fn(variables, **batch)``: ``layers`` (from ``jaxpeft._tracing.trace_layers``) with their configured
    ``ranks``; batches are dicts of ``input_ids``, ``attention_mask`` and optionally ``labels`` (dropped before the
    call); ``extra_inputs`` go to every call (``deterministic=True``)."""
    eva_config = eva_config or EvaConfig()
    for layer in layers.values():
        if layer.stack_shape:
            raise AdapterError(f"EVA supports unscanned models only; {layer.name} is in a scanned stack: load the "
                               "model with scan_layers=False")
        if layer.kind not in EVA_KINDS:
            raise AdapterError(f"EVA initialises Dense and DenseGeneral layers, not {layer.name} ({layer.kind})")
    inputs = collect_inputs(apply_fn, variables, layers, batches, eva_config, extra_inputs)
    equal_to = _equal_input_groups(inputs)
    offered = {path: round(ranks[path] * eva_config.rho) for path in layers}
    for path, rep in equal_to.items():
        offered[rep] = max(offered[rep], offered[path])
    for path, rep in equal_to.items():
        offered[path] = offered[rep]
    decompositions = {}
    for path, x in inputs.items():
        if path in equal_to:
            continue
        n_tokens, n_in = x.shape
        if offered[path] > min(n_tokens, n_in):
            raise AdapterError(f"EVA: {'.'.join(path)} needs {offered[path]} components (r * rho) but has "
                               f"{n_in} inputs and {n_tokens} tokens; give more tokens or lower r or rho")
        decompositions[path] = principal_components(x, offered[path])
    ratios = {path: decompositions[equal_to.get(path, path)][1] for path in layers}
    new_ranks = distribute_ranks(ratios, sum(ranks[path] for path in layers), equal_to)
    state = {}
    for path, rank in new_ranks.items():
        components, ratio, singular = decompositions[equal_to.get(path, path)]
        kept = components[:rank]
        if eva_config.whiten:
            kept = kept / np.sqrt(singular[:rank])[:, None]
        state[path] = EvaLayer(path, kept.astype(np.float32), ratio[:rank].astype(np.float32))
    return state


# ----- a jaxpeft PeftModel -----

def _adapted_layers(model, adapter_name: str) -> tuple[dict[Path, Layer], dict[Path, str]]:
    """(the adapter's layers EVA initialises, in call order; ``{path: dotted name}`` of every layer holding it)."""
    from jaxpeft.peft_model import _sample_inputs

    base = model.base_model
    trace = trace_layers(base.apply_fn, base.params, (), _sample_inputs(base))
    held = {path[1:-2] for path in tree.flatten(model.params)
            if path[0] == "params" and path[-2:] == ("lora_A", adapter_name)}
    layers = {path: layer for path, layer in trace.layers.items() if path in held and layer.kind in EVA_KINDS}
    names = {path: layer.virtual_paths.get((), layer.name) for path, layer in layers.items()}
    names.update({path: ".".join(path) for path in sorted(held - set(layers))})
    return layers, names


def _config_after(config, names: dict[Path, str], state: dict[Path, EvaLayer], eva_config: EvaConfig):
    """The LoRA config with EVA's ranks in ``rank_pattern`` and scalings in ``alpha_pattern`` (keyed by full module
    name, as HF PEFT writes them), and rank-0 layers dropped from ``target_modules``."""
    from jaxpeft._targets import pattern_value

    rank_pattern, alpha_pattern, kept = {}, {}, []
    for path, name in names.items():
        rank, alpha = config.rank_for(name), pattern_value(name, config.alpha_pattern, config.lora_alpha)
        if path in state:
            new_rank = state[path].rank
            if new_rank == 0:
                continue
            if new_rank != rank and eva_config.adjust_scaling_factors:
                alpha = alpha * new_rank / rank
            rank = new_rank
        kept.append(name)
        if rank != config.r:
            rank_pattern[name] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    if not kept:
        raise AdapterError("EVA gave every layer rank 0; raise r or lower rho")
    targets = config.target_modules if len(kept) == len(names) else kept
    return dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, target_modules=targets)


def _with_components(params: Any, state: dict[Path, EvaLayer], adapter_name: str) -> Any:
    """``params`` with each layer's ``lora_A`` set to its EVA components (transposed to ``(*input axes, r)``)."""
    flat = tree.flatten(params)
    for path, layer in state.items():
        if layer.rank == 0:
            continue
        key = ("params",) + path + ("lora_A", adapter_name)
        boxed = flat[key]
        old = nn.meta.unbox(boxed)
        new = jnp.asarray(layer.components.T.reshape(old.shape), old.dtype)
        flat[key] = boxed.replace_boxed(new) if isinstance(boxed, nn.meta.AxisMetadata) else new
    return tree.unflatten_like(flat, params)


def _config_eva(config) -> EvaConfig:
    """The ``EvaConfig`` a LoRA config carries (``LoraConfig.eva_config`` holds its options as a dict)."""
    options = getattr(config, "eva_config", None)
    return EvaConfig(**options) if isinstance(options, Mapping) else options or EvaConfig()


def get_eva_state_dict(model, batches: Iterable[Mapping[str, Any]], eva_config: EvaConfig | None = None,
                       adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """HF PEFT's ``get_eva_state_dict`` for a jaxpeft ``PeftModel`` with a LoRA adapter: ``{module name:
    components [rank, in]}`` (rank 0 included), computed on the base model."""
    from jaxpeft.peft_model import _sample_inputs

    name = adapter_name or model.active_adapter
    model._check_name(name)
    config = model.peft_config[name]
    check(config.peft_type == "LORA", f"EVA initialises LoRA adapters; {name!r} is {config.peft_type}")
    eva_config = eva_config or _config_eva(config)
    layers, names = _adapted_layers(model, name)
    state = _state_of(model, layers, names, config, batches, eva_config, _sample_inputs)
    return {names[path]: layer.components for path, layer in state.items()}


def _state_of(model, layers, names, config, batches, eva_config, sample_inputs) -> dict[Path, EvaLayer]:
    base = model.base_model
    extra = {k: v for k, v in sample_inputs(base).items() if k not in ("input_ids", "attention_mask")}
    ranks = {path: config.rank_for(names[path]) for path in layers}
    return eva_state(base.apply_fn, tree.strip_adapters(model.params), layers, ranks, batches, eva_config, extra)


def initialize_lora_eva_weights(model, batches: Iterable[Mapping[str, Any]], eva_config: EvaConfig | None = None,
                                adapter_name: str | None = None, seed: int = 0) -> None:
    """HF PEFT's ``initialize_lora_eva_weights`` for a jaxpeft ``PeftModel`` (changed in place): the adapter
    (default: the active one) is rebuilt with EVA's per-layer ranks (``rank_pattern``, ``alpha_pattern``,
    ``target_modules`` of its config, as HF PEFT records them), its ``lora_A`` set to the components and
    ``lora_B`` zero. ``batches``: a list of dicts with ``input_ids``, ``attention_mask`` and optional ``labels``.
    Layers EVA does not initialise (Embed, Conv, own parameters) keep LoRA's default initialisation."""
    from jaxpeft.methods.lora import _decomposes_kernel, _is_loftq
    from jaxpeft.peft_model import _sample_inputs

    name = adapter_name or model.active_adapter
    model._check_name(name)
    config = model.peft_config[name]
    check(config.peft_type == "LORA", f"EVA initialises LoRA adapters; {name!r} is {config.peft_type}")
    check(config.init_lora_weights in (True, "eva") and not _decomposes_kernel(config) and not _is_loftq(config),
          f"EVA replaces init_lora_weights={config.init_lora_weights!r}; build the adapter with "
          "init_lora_weights=True (or 'eva')")
    eva_config = eva_config or _config_eva(config)
    layers, names = _adapted_layers(model, name)
    skipped = [names[path] for path in names if path not in layers]
    if skipped:
        warnings.warn(f"EVA leaves {skipped} at LoRA's default initialisation (it initialises Dense layers only)",
                      stacklevel=2)
    state = _state_of(model, layers, names, config, batches, eva_config, _sample_inputs)
    new_config = _config_after(config, names, state, eva_config)
    active = model.active_adapter
    model.delete_adapter(name)
    model.add_adapter(name, new_config, seed=seed)
    model.params = _with_components(model.params, state, name)
    model._runners.clear()
    model.set_adapter(active if active is not None else name)
