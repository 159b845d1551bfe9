"""AdaLoRA: LoRA in SVD form whose rank budget is moved between layers during training (Zhang et al., 2023).

With ``W [out, in]`` the layer's weight as torch holds it, AdaLoRA adds

    ΔW = B (A ⊙ E) * lora_alpha / (init_r + 1e-5)

(HF PEFT's ``scaling / (ranknum + 1e-5)``; ``ranknum`` is ``init_r`` in every layer, also after a load that
resized the layer, and HF PEFT does not save it), so the layer computes ``x·W + dropout(x)·ΔW``. Leaves kept in an
adapted layer's parameters, for adapter ``name``, in torch's layout, after the layer's stack axes under ``nn.scan``:

- ``adalora_A/<name>``: ``(*stack, init_r, in)``, the right singular vectors (HF PEFT's ``lora_A``);
- ``adalora_E/<name>``: ``(*stack, init_r, 1)``, the singular values (``lora_E``); the rank allocator zeroes rows;
- ``adalora_B/<name>``: ``(*stack, out, init_r)``, the left singular vectors (``lora_B``);
- ``adalora_active/<name>``: ``(*stack,)`` float32, 1 where the layer is adapted, 0 where ``layers_to_transform``
  leaves a layer of a scanned stack alone; a constant.

Every layer keeps ``init_r`` rows, as HF PEFT's layers do in training: ranks the allocator took away are rows of
``E`` at zero. ``rank_pattern`` (``{"<HF module name>.lora_E": [kept, ...]}``, what the allocator leaves, as HF
PEFT writes it) says which rows the adapter files hold: saving keeps those rows (HF PEFT's resized tensors, with
``<module>.lora_A``/``lora_E``/``lora_B`` names), loading puts them back in place with zeros elsewhere, so the
model computes what HF PEFT's resized one does. ``init_lora_weights=True`` starts ``E`` at zero and ``A``, ``B``
from ``N(0, 0.02²)``; ``False`` draws all three from ``N(0, 1)`` (HF PEFT's ``torch.randn``).

``jaxpeft.Trainer`` drives the rank allocator through the method's hooks: ``loss_term`` adds ``orth_reg_weight``
times ``orthogonal_regularization`` to the training loss, ``allocate_ranks`` wraps the optimizer in the allocator
(an optax transformation: its state is in the optimizer state, so checkpoints and resumption keep it) and
``trained_config`` sets ``rank_pattern`` before the adapter is saved. For a loop of your own, the same pieces are
pure functions: ``allocate_ranks``, or ``init_allocator`` and ``update_and_allocate`` (after each optimizer step, as
HF PEFT's ``update_and_allocate``), ``orthogonal_regularization`` and ``rank_pattern`` (the config's
``rank_pattern`` after allocation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import _layouts
from jaxpeft.config import (
    PeftConfig,
    check,
    is_finite_number,
    is_positive_int,
    layer_indices,
    plain_number,
    strict_options,
)
from jaxpeft.core import AdapterError
from jaxpeft.method import register
from jaxpeft.methods._reweight import reweight_method

FACTORS = ("adalora_A", "adalora_E", "adalora_B")
ACTIVE = "adalora_active"
HF_NAMES = {"adalora_A": "lora_A", "adalora_E": "lora_E", "adalora_B": "lora_B"}
HIGHEST = jax.lax.Precision.HIGHEST


@strict_options
@dataclasses.dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA options, with HF PEFT's names and defaults.

    Attributes:
        target_r: the average rank per layer the allocator ends with (the budget is ``target_r`` times the number
            of adapted layers).
        init_r: the rank every layer starts with.
        tinit: steps of warmup before any rank is taken away.
        tfinal: steps at the end that train with the final ranks fixed.
        deltaT: the allocator masks every ``deltaT`` steps while the budget decreases.
        beta1: EMA factor of the sensitivity ``|p * grad|``.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: weight of the orthogonal regularization of ``A`` and ``B`` in the loss.
        total_step: the number of training steps (required, as in HF PEFT): the budget decreases from ``tinit`` to
            ``total_step - tfinal``.
        rank_pattern: ``{"<HF module name>.lora_E": [bool, ...]}``, the ranks the allocator kept (written by
            training; adapter files hold only those rows).
        lora_alpha: scaling numerator: the update is scaled by ``lora_alpha / init_r``.
        lora_dropout: dropout probability on the adapter's input (``'dropout'`` rng stream).
        target_modules: module names or dotted path suffixes (list), a full-match regex on the dotted path
            (string), or ``"all-linear"`` (every Dense/DenseGeneral/Einsum except the output head).
        exclude_modules: the same forms, for modules to leave alone.
        layers_to_transform: layer indices (the first numbered path segment) to adapt, with list targets.
        layers_pattern: the name of the layer list whose index counts (e.g. ``"layers"``); needs
            ``layers_to_transform``.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (the biases of adapted layers).
        init_lora_weights: True (``E`` zero: the model starts unchanged) or False (all factors random).
        fan_in_fan_out: HF PEFT's flag for GPT-2's ``Conv1D``; jaxpeft's models know their layouts, so it changes
            nothing here.
        r: LoRA's rank, which HF PEFT's AdaLoRA ignores (``init_r`` is the rank); accepted and ignored likewise.
        use_rslora: ignored, as by HF PEFT's AdaLoRA (its scaling is ``lora_alpha / init_r``).
        alpha_pattern: ignored, as by HF PEFT's AdaLoRA.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.adalora import AdaLoraConfig
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((1, 4))
        >>> config = AdaLoraConfig(init_r=3, target_r=1, total_step=10, target_modules=["layers_0"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> layer = variables["params"]["layers_0"]
        >>> [(k, layer[k]["default"].shape) for k in ("adalora_A", "adalora_E", "adalora_B")]
        [('adalora_A', (3, 4)), ('adalora_E', (3, 1)), ('adalora_B', (8, 3))]
        >>> bool(jnp.array_equal(jaxpeft.rewrite(model.apply, config)(variables, x), model.apply(variables, x)))
        True
    """

    peft_type: ClassVar[str] = "ADALORA"
    option_hints: ClassVar[dict[str, str]] = {"rank": "init_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                              "delta_t": "deltaT"}

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (HF PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    bias: str = "none"
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    r: int = 8
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.init_r), f"init_r must be a positive integer, got init_r={self.init_r!r}")
        for name in ("target_r", "tinit", "tfinal"):
            value = getattr(self, name)
            check(is_positive_int(value) or value == 0 and not isinstance(value, bool),
                  f"{name} must be a non-negative integer, got {name}={value!r}")
        check(is_positive_int(self.deltaT), f"deltaT must be a positive integer, got deltaT={self.deltaT!r}")
        check(is_positive_int(self.total_step), f"AdaLoRA needs total_step, the number of training steps (a positive "
                                                f"integer), got total_step={self.total_step!r}")
        self.init_r, self.target_r, self.tinit, self.tfinal, self.deltaT, self.total_step = (
            int(self.init_r), int(self.target_r), int(self.tinit), int(self.tfinal), int(self.deltaT),
            int(self.total_step))
        check(self.tinit < self.total_step - self.tfinal,
              f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in total_step={self.total_step}; "
              "decrease tinit or tfinal, or increase total_step")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(is_finite_number(value) and 0 < value < 1, f"{name} must be in (0, 1), got {name}={value!r}")
            setattr(self, name, plain_number(value))
        check(is_finite_number(self.orth_reg_weight) and self.orth_reg_weight >= 0,
              f"orth_reg_weight must be >= 0, got orth_reg_weight={self.orth_reg_weight!r}")
        check(is_finite_number(self.lora_alpha) and self.lora_alpha > 0,
              f"lora_alpha must be positive and finite, got lora_alpha={self.lora_alpha!r}")
        check(is_finite_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
              f"lora_dropout must be in [0, 1), got lora_dropout={self.lora_dropout!r}")
        self.orth_reg_weight, self.lora_alpha, self.lora_dropout = (
            plain_number(self.orth_reg_weight), plain_number(self.lora_alpha), plain_number(self.lora_dropout))
        check(self.bias in ("none", "all", "lora_only"),
              f"bias={self.bias!r} is unknown; use one of none, all, lora_only")
        check(self.init_lora_weights in (True, False, "gaussian"),
              f"init_lora_weights={self.init_lora_weights!r} is not supported by AdaLoRA; use True or False")
        self.rank_pattern = _checked_rank_pattern(self.rank_pattern, self.init_r)
        check(isinstance(self.alpha_pattern or {}, Mapping), "alpha_pattern must be a dict")
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                value = sorted(value) if name in ("target_modules", "exclude_modules") else list(value)
                check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
                setattr(self, name, value)
        check(not self.layers_pattern or self.layers_to_transform is not None,
              "layers_pattern needs layers_to_transform (as in HF PEFT); give the layer indices to adapt")
        if self.layers_to_transform is not None:
            self.layers_to_transform = layer_indices("layers_to_transform", self.layers_to_transform)
            check(not isinstance(self.target_modules, str),
                  f"layers_to_transform cannot be used with target_modules={self.target_modules!r}, a string (as in HF "
                  "PEFT); list the module names instead, e.g. target_modules=['q_proj', 'v_proj']")

    def kept_ranks(self, name: str) -> np.ndarray | None:
        """The rows ``rank_pattern`` keeps in the module at dotted path ``name`` (a bool ``[init_r]``), or None."""
        kept = (self.rank_pattern or {}).get(f"{name}.lora_E")
        return None if kept is None else np.asarray(kept, bool)


def _checked_rank_pattern(pattern: Any, init_r: int) -> dict[str, list[bool]] | None:
    """``rank_pattern`` with HF PEFT's in-training keys (``<module>.lora_E.<adapter>``) cut after ``lora_E``."""
    if not pattern:
        return None
    check(isinstance(pattern, Mapping), f"rank_pattern must be a dict {{'<module>.lora_E': [bool, ...]}}, got "
                                        f"{pattern!r}")
    out = {}
    for key, kept in pattern.items():
        parts = str(key).split(".")
        check("lora_E" in parts, f"rank_pattern key {key!r} must name a module's lora_E, e.g. "
                                 "'model.layers.0.self_attn.q_proj.lora_E' (AdaLoRA's rank_pattern is the "
                                 "allocator's mask, not LoRA's {regex: rank})")
        cut = len(parts) - parts[::-1].index("lora_E")
        kept = list(np.asarray(kept).reshape(-1)) if not isinstance(kept, (list, tuple)) else list(kept)
        check(len(kept) == init_r and all(isinstance(v, (bool, np.bool_)) or v in (0, 1) for v in kept),
              f"rank_pattern[{key!r}] must be init_r={init_r} booleans, got {kept!r}")
        out[".".join(parts[:cut])] = [bool(v) for v in kept]
    return out


# ----- the layer: leaves, ΔW, and HF PEFT's tensors -----

def layer_leaves(key: jax.Array, config: AdaLoraConfig, name: str, n_out: int, n_in: int,
                 dtype: Any) -> dict[str, jax.Array]:
    """One layer's AdaLoRA leaves (torch layout, no stack axes); rows ``rank_pattern`` drops start with ``E`` 0."""
    r = config.init_r
    keys = jax.random.split(key, 3)
    std = 0.02 if config.init_lora_weights else 1.0
    leaves = {"adalora_A": std * jax.random.normal(keys[0], (r, n_in), jnp.float32),
              "adalora_E": (0 if config.init_lora_weights else 1) * jax.random.normal(keys[1], (r, 1), jnp.float32),
              "adalora_B": std * jax.random.normal(keys[2], (n_out, r), jnp.float32)}
    kept = config.kept_ranks(name)
    if kept is not None:
        leaves["adalora_E"] = jnp.where(jnp.asarray(kept)[:, None], leaves["adalora_E"], 0)
    return {k: v.astype(dtype) for k, v in leaves.items()}


def sizes(config: AdaLoraConfig, leaves: dict[str, jax.Array]) -> tuple[int, int]:
    del config
    return leaves["adalora_B"].shape[0], leaves["adalora_A"].shape[1]


def delta(config: AdaLoraConfig, leaves: dict[str, jax.Array], weight: jax.Array) -> jax.Array:
    """ΔW ``[out, in]`` (float32), in HF PEFT's order: ``B (A ⊙ E) * scaling / (ranknum + 1e-5)``."""
    del weight
    a, e, b = (leaves[k].astype(jnp.float32) for k in FACTORS)
    ranknum = np.float32(config.init_r) + np.float32(1e-5)
    return jnp.matmul(b, a * e, precision=HIGHEST) * config.lora_alpha / ranknum


def _row_layout(leaf_shape: tuple[int, ...], kept: np.ndarray | None, axis: int):
    """(torch shape, to_hf, from_hf) of a factor whose rank axis is ``axis``: only the kept rows in the file."""
    if kept is None:
        return _layouts.plain_layout(leaf_shape, flat=False)
    index = np.flatnonzero(kept)
    hf_shape = tuple(len(index) if i == axis else n for i, n in enumerate(leaf_shape))

    def from_hf(tensor):
        full = np.zeros(leaf_shape, np.asarray(tensor).dtype)
        if axis == 0:
            full[index] = tensor
        else:
            full[:, index] = tensor
        return full

    return hf_shape, lambda x: np.take(x, index, axis=axis), from_hf


def torch_tensors(config: AdaLoraConfig, layer: Any, name: str, shapes: dict) -> dict:
    """HF PEFT's ``<module>.lora_A``/``lora_E``/``lora_B``, with only the rows ``rank_pattern`` keeps."""
    del layer
    kept = config.kept_ranks(name)
    return {HF_NAMES[leaf]: ((leaf,), _row_layout(shapes[(leaf,)], kept, 1 if leaf == "adalora_B" else 0))
            for leaf in FACTORS}


def task_defaults(config: AdaLoraConfig, model) -> dict[str, Any]:
    """HF PEFT's AdaLoRA targets are its LoRA targets: the architecture's defaults when the config names none."""
    if config.target_modules is None:
        return {"target_modules": list(model.family.default_lora_targets)}
    return {}




# ----- the rank allocator (HF PEFT's RankAllocator), as pure functions for the training loop -----

def _key_parts(keypath) -> tuple[str, ...]:
    return tuple(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in keypath)


def _adapter_leaf(parts: tuple[str, ...], adapter_name: str) -> tuple[str, str] | None:
    """``(module, leaf key)`` of an AdaLoRA leaf at path ``parts`` (module: its path joined by ``/``, without a
    leading ``params``), or None."""
    for i in range(len(parts) - 1):
        if parts[i] in FACTORS + (ACTIVE,) and parts[i + 1] == adapter_name:
            module = parts[1:i] if parts[:1] == ("params",) else parts[:i]
            return "/".join(module), parts[i]
    return None


def _leaves(tree: Any, adapter_name: str) -> dict[str, dict[str, jax.Array]]:
    """``{module: {leaf key: array}}`` of the adapter's AdaLoRA leaves in ``tree`` (params, variables, or a part of
    them such as the trainable half or its gradients)."""
    out: dict[str, dict[str, jax.Array]] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        found = _adapter_leaf(_key_parts(keypath), adapter_name)
        if found is not None:
            out.setdefault(found[0], {})[found[1]] = leaf
    return out


def _factors(tree: Any, adapter_name: str, what: str) -> dict[str, dict[str, jax.Array]]:
    leaves = _leaves(tree, adapter_name)
    factors = {module: {k: leaves[module][k] for k in FACTORS if k in leaves[module]} for module in leaves}
    if not factors or any(len(f) != len(FACTORS) for f in factors.values()):
        raise AdapterError(f"{what} holds no complete AdaLoRA leaves ({', '.join(FACTORS)}) of adapter "
                           f"{adapter_name!r}; pass the params (or their gradients) of that adapter")
    return factors


def _with_e(tree: Any, adapter_name: str, new_e: dict[str, jax.Array]) -> Any:
    """``tree`` with each module's ``adalora_E`` replaced by ``new_e[module]``."""
    def replace(keypath, leaf):
        found = _adapter_leaf(_key_parts(keypath), adapter_name)
        if found is None or found[1] != "adalora_E":
            return leaf
        return new_e[found[0]].astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(replace, tree)


def init_allocator(config: AdaLoraConfig, params: Any, adapter_name: str = "default") -> dict[str, Any]:
    """The allocator's state for the adapter in ``params`` (a pytree of arrays, to checkpoint with the optimizer's):
    the sensitivity and uncertainty EMAs of every factor, the kept ranks ``mask`` (``[*stack, init_r]`` per
    module), which stack entries are adapted, the current ``budget`` and whether ranks were ``allocated`` yet."""
    active = _active_entries(params, adapter_name)
    state = _fresh_state(_factors(params, adapter_name, "params"), active)
    state["budget"] = jnp.asarray(budgets(config, state)[0], jnp.int32)
    return state


def _active_entries(params: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``{module: bool [*stack]}``: the stack entries the adapter adapts (its ``adalora_active`` constant; all of
    them where ``params`` lacks it)."""
    leaves = _leaves(params, adapter_name)
    return {m: np.asarray(leaves[m][ACTIVE]) != 0 if ACTIVE in leaves[m] else
            np.ones(np.shape(leaves[m]["adalora_E"])[:-2], bool) for m in _factors(params, adapter_name, "params")}


def _fresh_state(factors: dict[str, dict[str, Any]], active: Mapping[str, Any]) -> dict[str, Any]:
    """EMAs at zero, every rank kept, nothing allocated yet (``budget`` left to the caller)."""
    def zeros():  # new arrays for each EMA: a train step that donates the state must not see one buffer twice
        return {m: {k: jnp.zeros(v.shape, jnp.float32) for k, v in f.items()} for m, f in factors.items()}

    mask = {m: jnp.ones(f["adalora_E"].shape[:-1], bool) for m, f in factors.items()}
    return {"sensitivity": zeros(), "uncertainty": zeros(), "mask": mask,
            "active": {m: jnp.asarray(on) for m, on in active.items()}, "allocated": jnp.asarray(False)}


def budgets(config: AdaLoraConfig, state: dict[str, Any]) -> tuple[int, int]:
    """``(initial, target)`` total ranks: the ranks of the adapted layers, and ``target_r`` times their number."""
    counts = {m: int(np.asarray(on).sum()) for m, on in state["active"].items()}
    initial = sum(counts[m] * state["mask"][m].shape[-1] for m in counts)
    return initial, config.target_r * sum(counts.values())


def budget_schedule(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """HF PEFT's schedule: ``(budget, whether to mask at this step)``; the budget stays ``initial`` until
    ``tinit``, falls as a cubic to ``target`` at ``total_step - tfinal`` (masking every ``deltaT`` steps), then
    stays ``target``."""
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        return initial, False
    if step > end:
        return target, True
    remaining = 1 - (step - config.tinit) / (end - config.tinit)
    return int((initial - target) * remaining ** 3 + target), step % config.deltaT == 0


@jax.jit
def _update_importance(sensitivity, uncertainty, params, grads, betas):
    """The EMAs of the sensitivity ``|p * grad|`` (``beta1``) and of its distance to the EMA (``beta2``)."""
    (beta1, rest1), (beta2, rest2) = betas

    def one(s, u, p, g):
        importance = jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32))
        s = beta1 * s + rest1 * importance
        return s, beta2 * u + rest2 * jnp.abs(importance - s)

    pairs = jax.tree_util.tree_map(one, sensitivity, uncertainty, params, grads)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    return (jax.tree_util.tree_map(lambda x: x[0], pairs, is_leaf=is_pair),
            jax.tree_util.tree_map(lambda x: x[1], pairs, is_leaf=is_pair))


@jax.jit
def _mask_to_budget(sensitivity, uncertainty, active, e_leaves, k):
    """Keeps the rank triplets scoring above the ``k``-th smallest score of all layers; ``E`` 0 elsewhere."""
    scores = {}
    for m, s in sensitivity.items():
        u = uncertainty[m]
        a = jnp.mean(s["adalora_A"] * u["adalora_A"], axis=-1)
        b = jnp.mean(s["adalora_B"] * u["adalora_B"], axis=-2)
        e = (s["adalora_E"] * u["adalora_E"])[..., 0]
        scores[m] = jnp.where(active[m][..., None], e + (a + b), jnp.inf)  # layers left alone never count
    every = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
    threshold = jnp.where(k > 0, every[jnp.maximum(k - 1, 0)], -jnp.inf)
    keep = {m: s > threshold for m, s in scores.items()}
    return keep, {m: jnp.where(keep[m][..., None], e, 0).astype(e.dtype) for m, e in e_leaves.items()}


def update_and_allocate(config: AdaLoraConfig, state: dict[str, Any], params: Any, grads: Any, step: int,
                        adapter_name: str = "default") -> tuple[Any, dict[str, Any]]:
    """One step of HF PEFT's ``AdaLoraModel.update_and_allocate``: returns ``(params, state)``.

    Call it after each optimizer update with the updated ``params`` (any tree holding the adapter's ``adalora_A``,
    ``adalora_E`` and ``adalora_B``: the variables, their ``params``, or the trainable half) and the ``grads`` of
    that update (the same structure), and ``step`` the 0-based number of that update (HF PEFT's ``global_step``).
    Before ``total_step - tfinal`` it updates the importance EMAs and, on the schedule's masking steps, zeroes the
    rows of ``E`` that score lowest over all layers down to the budget; at ``total_step - tfinal`` it masks to the
    final budget and resets the EMAs; after, it zeroes the rows of the final mask again. Not jitted as a whole (the
    schedule is Python arithmetic on ``step``, as in HF PEFT); its array work is.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods import adalora
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8)])
        >>> x = jnp.ones((2, 4))
        >>> config = adalora.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4,
        ...                                target_modules=["layers_0", "layers_2"], init_lora_weights=False)
        >>> params = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                model.init(jax.random.key(1), x), x)["params"]
        >>> apply = jaxpeft.rewrite(model.apply, config)
        >>> def loss(params):
        ...     out = apply({"params": params}, x)
        ...     return jnp.mean(out ** 2) + config.orth_reg_weight * adalora.orthogonal_regularization(params)
        >>> state = adalora.init_allocator(config, params)
        >>> for step in range(config.total_step + 1):
        ...     grads = jax.grad(loss)(params)
        ...     params = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)  # the optimizer
        ...     params, state = adalora.update_and_allocate(config, state, params, grads, step)
        >>> int(state["budget"]), sorted(int(m.sum()) for m in state["mask"].values())  # 2 layers, target_r=2
        (4, [1, 3])
    """
    step = int(step)
    end = config.total_step - config.tfinal
    e_leaves = {m: f["adalora_E"] for m, f in _factors(params, adapter_name, "params").items()}
    if step > end:
        return _with_e(params, adapter_name, {m: jnp.where(state["mask"][m][..., None], e, 0)
                                              for m, e in e_leaves.items()}), state
    state = dict(state)
    if step < end:
        betas = ((np.float32(config.beta1), np.float32(1 - config.beta1)),
                 (np.float32(config.beta2), np.float32(1 - config.beta2)))
        state["sensitivity"], state["uncertainty"] = _update_importance(
            state["sensitivity"], state["uncertainty"], _factors(params, adapter_name, "params"),
            _factors(grads, adapter_name, "grads"), betas)
    initial, target = budgets(config, state)
    budget, mask_now = budget_schedule(config, step, initial, target)
    state["budget"] = jnp.asarray(budget, jnp.int32)
    if not (mask_now or step == end):
        return params, state
    state["mask"], new_e = _mask_to_budget(state["sensitivity"], state["uncertainty"], state["active"], e_leaves,
                                           jnp.asarray(initial - budget, jnp.int32))
    state["allocated"] = jnp.asarray(True)
    if step == end:
        state["sensitivity"] = state["uncertainty"] = jax.tree_util.tree_map(jnp.zeros_like, state["sensitivity"])
    return _with_e(params, adapter_name, new_e), state


class AllocatorState(NamedTuple):
    """The state of ``allocate_ranks``' optimizer: the wrapped optimizer's, the number of updates done (HF PEFT's
    ``global_step`` of the next one) and the allocator's (``init_allocator``'s dict)."""

    inner: Any
    count: jax.Array
    allocator: dict[str, Any]


def _schedule_table(config: AdaLoraConfig, initial: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """``budget_schedule`` for steps ``0 ... total_step - tfinal``, as arrays to index with a traced step: HF PEFT
    computes the cubic in float64, which float32 on the device would round differently at some steps."""
    steps = range(config.total_step - config.tfinal + 1)
    table = [budget_schedule(config, step, initial, target) for step in steps]
    return np.asarray([budget for budget, _ in table], np.int32), np.asarray([now for _, now in table], bool)


def _allocation_step(config: AdaLoraConfig, state: dict[str, Any], params: Any, grads: Any, step: jax.Array,
                     schedule: tuple[int, np.ndarray, np.ndarray], adapter_name: str) -> tuple[dict, dict]:
    """``update_and_allocate`` on a traced ``step``, with ``schedule`` the initial budget and ``_schedule_table``:
    returns ``(new state, {module: bool [*stack, init_r, 1], the rows of E to zero})``."""
    end = config.total_step - config.tfinal
    betas = ((np.float32(config.beta1), np.float32(1 - config.beta1)),
             (np.float32(config.beta2), np.float32(1 - config.beta2)))
    factors = _factors(params, adapter_name, "params")
    e_leaves = {m: f["adalora_E"] for m, f in factors.items()}
    sensitivity, uncertainty = _update_importance(state["sensitivity"], state["uncertainty"], factors,
                                                  _factors(grads, adapter_name, "grads"), betas)
    keep_old = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(step < end, n, o), new, old)  # noqa: E731
    sensitivity, uncertainty = keep_old(sensitivity, state["sensitivity"]), keep_old(uncertainty, state["uncertainty"])
    initial, budgets_by_step, mask_by_step = schedule[0], jnp.asarray(schedule[1]), jnp.asarray(schedule[2])
    index = jnp.minimum(step, end)
    budget = jnp.where(step <= end, budgets_by_step[index], state["budget"])
    remask = (step <= end) & (mask_by_step[index] | (step == end))
    keep, _ = _mask_to_budget(sensitivity, uncertainty, state["active"], e_leaves, initial - budget)
    mask = {m: jnp.where(remask, keep[m], state["mask"][m]) for m in keep}
    reset = step == end
    zero_at_end = lambda tree: jax.tree_util.tree_map(lambda x: jnp.where(reset, 0, x), tree)  # noqa: E731
    new_state = {**state, "sensitivity": zero_at_end(sensitivity), "uncertainty": zero_at_end(uncertainty),
                 "mask": mask, "budget": budget.astype(jnp.int32), "allocated": state["allocated"] | remask}
    zeroed = {m: (remask | (step > end)) & ~mask[m][..., None] for m in mask}
    return new_state, zeroed


def allocate_ranks(config: AdaLoraConfig, optimizer: optax.GradientTransformation, params: Any,
                   adapter_name: str = "default") -> optax.GradientTransformation:
    """``optimizer`` followed by HF PEFT's ``update_and_allocate``, as one jittable optax transformation.

    ``update(grads, state, params)`` runs ``optimizer``, updates the importance EMAs from the updated parameters
    and ``grads`` and, on the schedule's steps, zeroes the rows of ``E`` that score lowest, returning updates that
    ``optax.apply_updates`` turns into exactly what ``update_and_allocate`` returns after that optimizer step (the
    ``n``-th update is HF PEFT's ``global_step`` ``n``, counting from 0). The allocator's state is part of the
    optimizer state (``AllocatorState``), so checkpoints keep it. The transformation works on any tree holding the
    adapter's factors, e.g. the trainable subtree (frozen leaves ``None``) that ``jaxpeft.training`` optimizes.
    ``params`` (the whole variables, with the adapter's ``adalora_active`` constants) says which layers of a
    scanned stack are adapted, and so the budget; ``trained_config`` gives the ``rank_pattern`` to save.

    Example:
        >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods import adalora
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8)])
        >>> x = jnp.ones((2, 4))
        >>> config = adalora.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4,
        ...                                target_modules=["layers_0", "layers_2"], init_lora_weights=False)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> apply = jaxpeft.rewrite(model.apply, config)
        >>> optimizer = adalora.allocate_ranks(config, optax.sgd(1e-3), variables)
        >>> loss = lambda params: jnp.mean(apply({"params": params}, x) ** 2)
        >>> params, opt_state = variables["params"], optimizer.init(variables["params"])
        >>> @jax.jit
        ... def step(params, opt_state):
        ...     updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
        ...     return optax.apply_updates(params, updates), opt_state
        >>> for _ in range(config.total_step + 1):
        ...     params, opt_state = step(params, opt_state)
        >>> int(opt_state.allocator["budget"]), sorted(int(m.sum()) for m in opt_state.allocator["mask"].values())
        (4, [1, 3])
    """
    active = _active_entries(params, adapter_name)
    shapes = {m: {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in f.items()}
              for m, f in _factors(params, adapter_name, "params").items()}
    adapted = sum(int(on.sum()) for on in active.values())
    initial = adapted * config.init_r
    schedule = (initial, *_schedule_table(config, initial, adapted * config.target_r))

    def init(params):  # the allocator's shapes are those of ``variables``' factors (optax may pass placeholders)
        allocator = _fresh_state(shapes, active)
        allocator["budget"] = jnp.asarray(initial, jnp.int32)
        return AllocatorState(optimizer.init(params), jnp.zeros((), jnp.int32), allocator)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("allocate_ranks needs the parameters in update(grads, state, params): the allocator "
                             "scores the updated parameters")
        updates, inner = optimizer.update(grads, state.inner, params)
        stepped = optax.apply_updates(params, updates)
        allocator, zeroed = _allocation_step(config, state.allocator, stepped, grads, state.count, schedule,
                                             adapter_name)
        old_e = {m: f["adalora_E"] for m, f in _factors(params, adapter_name, "params").items()}
        # a zeroed row's update is -E, so that E + update is exactly 0
        new_updates = {m: jnp.where(zeroed[m], -old_e[m], u["adalora_E"])
                       for m, u in _factors(updates, adapter_name, "updates").items()}
        return _with_e(updates, adapter_name, new_updates), AllocatorState(inner, state.count + 1, allocator)

    return optax.GradientTransformation(init, update)


def trained_config(config: AdaLoraConfig, opt_state: Any, apply_fn: Any, variables: Any, sample_args: tuple,
                   sample_kwargs: Mapping, adapter_name: str = "default") -> AdaLoraConfig:
    """``config`` with the ``rank_pattern`` of the ``allocate_ranks`` state found in ``opt_state`` (unchanged
    before the first allocation), so that the saved adapter holds only the kept rows, as HF PEFT's.
    ``apply_fn(variables, *sample_args, **sample_kwargs)`` is traced to name the layers (see ``rank_pattern``)."""
    del adapter_name
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState))
             if isinstance(s, AllocatorState)]
    if not found:
        return config
    pattern = rank_pattern(found[0].allocator, apply_fn, variables, *sample_args, **sample_kwargs)
    return config if pattern is None else dataclasses.replace(config, rank_pattern=pattern)


def orthogonal_regularization(params: Any, adapter_name: str = "default") -> jax.Array:
    """HF PEFT's orthogonal regularization of the adapter's factors: the mean over every adapted layer's ``A`` and
    ``B`` of ``‖A Aᵀ - I‖_F`` and ``‖Bᵀ B - I‖_F``. The training loss adds ``orth_reg_weight`` times it."""
    total, count = jnp.float32(0), jnp.float32(0)
    for leaves in _leaves(params, adapter_name).values():
        a, b = (leaves[k].astype(jnp.float32) for k in ("adalora_A", "adalora_B"))
        eye = jnp.eye(a.shape[-2], dtype=jnp.float32)
        gram_a = jnp.einsum("...ri,...si->...rs", a, a, precision=HIGHEST) - eye
        gram_b = jnp.einsum("...or,...os->...rs", b, b, precision=HIGHEST) - eye
        norms = jnp.sqrt(jnp.sum(gram_a ** 2, axis=(-2, -1))) + jnp.sqrt(jnp.sum(gram_b ** 2, axis=(-2, -1)))
        on = (jnp.asarray(leaves[ACTIVE]) != 0) if ACTIVE in leaves else jnp.ones(norms.shape, bool)
        total = total + jnp.sum(jnp.where(on, norms, 0))
        count = count + 2 * jnp.sum(on)
    return total / jnp.maximum(count, 1)


def rank_pattern(state: dict[str, Any], apply_fn: Any, variables: Any, *sample_args: Any,
                 **sample_kwargs: Any) -> dict[str, list[bool]] | None:
    """The config's ``rank_pattern`` after allocation (None before the first), ``{"<HF module name>.lora_E":
    [kept, ...]}`` as HF PEFT writes it: set it (``dataclasses.replace(config, rank_pattern=...)``) before saving,
    and the files hold only the kept rows. ``apply_fn(variables, *sample_args, **sample_kwargs)`` is traced (not
    run) to name the layers."""
    from jaxpeft._tracing import trace_layers
    from jaxpeft.tree import strip_adapters

    if not bool(state["allocated"]):
        return None
    trace = trace_layers(apply_fn, strip_adapters(variables), sample_args, sample_kwargs)
    pattern = {}
    for module, keep in state["mask"].items():
        keep, active = np.asarray(keep), np.asarray(state["active"][module])
        for index, name in trace.module_virtual_paths[tuple(module.split("/"))].items():
            if active[index]:
                pattern[f"{name}.lora_E"] = keep[index].tolist()
    return pattern


def loss_term(config: AdaLoraConfig, params: Any, adapter_name: str = "default") -> jax.Array:
    """What HF PEFT's ``AdaLoraModel.forward`` adds to the loss: ``orth_reg_weight`` times
    ``orthogonal_regularization``."""
    return config.orth_reg_weight * orthogonal_regularization(params, adapter_name)


METHOD = register(reweight_method(
    AdaLoraConfig, FACTORS, layer_leaves, sizes, active_key=ACTIVE, method_name="AdaLoRA", delta=delta,
    dropout_rate=lambda config: config.lora_dropout, task_defaults=task_defaults, torch_tensors=torch_tensors,
    loss_term=loss_term, wrap_optimizer=allocate_ranks, trained_config=trained_config))
