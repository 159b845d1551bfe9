"""Mixture-of-experts decoders in Flax linen: Qwen3-MoE (``qwen3_moe``) and Mixtral (``mixtral``).

Attention, norms, RoPE, the key/value cache and the heads are the Llama family's (``llama.py``): q/k/v/o
``nn.Dense``, grouped-query attention, Qwen3's per-head q/k RMSNorm, a sliding window where the config sets one.
A sparse layer's feed-forward block ``mlp`` is transformers 5's, with the same names and layouts:

- ``mlp.gate``, the router: one raw parameter ``weight`` ``(experts, hidden)``;
- ``mlp.experts``: two fused raw parameters in torch's ``(out, in)`` layout, ``gate_up_proj``
  ``(experts, 2 * expert_intermediate, hidden)`` (each expert's gate rows, then its up rows) and ``down_proj``
  ``(experts, hidden, expert_intermediate)``.

So checkpoints map 1:1 and so will HF PEFT ``target_parameters`` adapter files (``mlp.experts.gate_up_proj``).
Their logical axes are ``exp`` (the experts axis), ``mlp`` and ``embed``; ``jaxpeft.sharding.DEFAULT_RULES`` has
no rule for ``exp``, so experts stay whole on every device unless a rule maps ``exp`` to a mesh axis.

Routing is transformers': softmax of the router logits (float32), the top ``num_experts_per_tok``, renormalised
to sum to 1 (Mixtral always, Qwen3-MoE when ``norm_topk_prob``). The experts run as grouped matrix products: the
``tokens * top_k`` token/expert pairs are sorted by expert and ``jax.lax.ragged_dot_general`` multiplies each
group by its expert's weights, read in place (static shapes, jit-friendly; on GPU and TPU the work is
proportional to the routed tokens, the CPU lowering computes every group densely). Qwen3-MoE layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step``, have the Llama MLP instead.

Every head also returns ``router_logits`` ``(sparse_layers, batch, seq, experts)`` (transformers'
``output_router_logits``); ``load_balancing_loss`` is transformers' auxiliary loss on them. Checkpoints in the
transformers 4.x layout (one ``experts.N.gate_proj`` / ``up_proj`` / ``down_proj`` per expert; Mixtral's
``block_sparse_moe.experts.N.w1`` / ``w3`` / ``w2``) are fused on load, as transformers 5 does, and
``save_pretrained`` writes that per-expert layout, as transformers 5's ``save_pretrained`` does by default.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
    ...     num_experts_per_tok=2, vocab_size=100)
    >>> model = AutoModelForCausalLM.from_config(config, scan_layers=True)
    >>> out = model(input_ids=[[1, 2, 3]])
    >>> out.logits.shape, out.router_logits.shape
    ((1, 3, 100), (2, 1, 3, 4))
    >>> model.params["params"]["model"]["layers"]["mlp"]["experts"]["gate_up_proj"].shape  # (layers, experts, ...)
    (2, 4, 32, 32)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models import activations, attention, hub, llama
from jaxpeft.models.family import ModelFamily

MODEL_TYPES = ("qwen3_moe", "mixtral")
# Modules whose parameters keep their torch names and layouts (raw parameters, not nn.Linear).
RAW_PARAMETER_MODULES = ("gate", "experts")
# transformers 4.x per-expert tensor names: model type -> (gate, up, down) projection names.
PER_EXPERT_NAMES = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
# transformers 4.x name of the sparse block where it differed from ``mlp``.
OLD_BLOCK_NAMES = {"mixtral": "block_sparse_moe"}
_PER_EXPERT_TENSOR = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<projection>[^.]+)\.weight$")
# lhs (rows, in) x rhs (experts, out, in) -> (rows, out): contract lhs axis 1 with rhs axis 2, rows ragged.
_ROWS_TIMES_TORCH_LAYOUT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


# ------------------------------------------------------------------------------------------- the config


def expert_intermediate_size(config) -> int:
    """The width of one expert's MLP (Qwen3-MoE's ``moe_intermediate_size``, Mixtral's ``intermediate_size``)."""
    if config.model_type == "qwen3_moe":
        return config.moe_intermediate_size
    return config.intermediate_size


def normalizes_top_k(config) -> bool:
    """Whether the chosen experts' probabilities are renormalised to sum to 1 (Mixtral: always)."""
    return bool(config.norm_topk_prob) if config.model_type == "qwen3_moe" else True


def sparse_layers(config) -> tuple[bool, ...]:
    """Per layer, whether it has the MoE block (else the dense MLP), by transformers' rule for the model type.

    Example:
        >>> import transformers
        >>> sparse_layers(transformers.Qwen3MoeConfig(num_hidden_layers=4, decoder_sparse_step=2))
        (False, True, False, True)
    """
    layers = range(config.num_hidden_layers)
    if config.model_type != "qwen3_moe":
        return tuple(True for _ in layers)
    dense = set(config.mlp_only_layers or ())
    step = config.decoder_sparse_step
    return tuple(i not in dense and config.num_experts > 0 and (i + 1) % step == 0 for i in layers)


def check_config(config, scan_layers: bool) -> None:
    """One-line errors for what this implementation does not cover (the Llama family's checks included)."""
    llama.check_config(config)
    if any(sparse_layers(config)) and not 0 < config.num_experts_per_tok <= config.num_experts:
        raise ValueError(
            f"num_experts_per_tok ({config.num_experts_per_tok}) must be between 1 and num_experts "
            f"({config.num_experts})."
        )
    dense = [i for i, sparse in enumerate(sparse_layers(config)) if not sparse]
    if scan_layers and 0 < len(dense) < config.num_hidden_layers:
        raise ValueError(
            f"scan_layers=True needs layers of one kind, but layers {dense} have a dense MLP and the others "
            "experts (mlp_only_layers / decoder_sparse_step); load with scan_layers=False."
        )


# ----------------------------------------------------------------------------------- routing and experts


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(top_k_weights, top_k_index)``, each ``(..., top_k)``: softmax in float32, the ``top_k`` most probable
    experts, their probabilities renormalised to sum to 1 when ``normalize``.

    Example:
        >>> weights, index = route(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), top_k=2, normalize=True)
        >>> index.tolist(), [round(float(w), 3) for w in weights[0]]
        ([[1, 2]], [0.667, 0.333])
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, index = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, index


def _grouped_linear(rows: jax.Array, weight: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``rows`` ``(n, in)``, sorted into consecutive groups of ``group_sizes``, each times its expert's
    ``weight[e]`` ``(out, in)`` (torch layout, read in place): ``(n, out)``."""
    return jax.lax.ragged_dot_general(rows, weight, group_sizes, _ROWS_TIMES_TORCH_LAYOUT)


def expert_mlp(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation) -> jax.Array:
    """The routed experts' gated MLPs, weighted and summed per token: ``(tokens, hidden)``.

    ``hidden`` is ``(tokens, hidden)``, ``top_k_index`` / ``top_k_weights`` ``(tokens, top_k)``, the weights as
    ``Experts`` holds them. The ``tokens * top_k`` (token, expert) rows are sorted by expert so that each expert's
    rows are consecutive, and ``jax.lax.ragged_dot_general`` multiplies each group by its expert's weights.

    Example:
        >>> e, h, i = 3, 4, 2
        >>> out = expert_mlp(jnp.ones((5, h)), jnp.array([[0, 2]] * 5), jnp.full((5, 2), 0.5),
        ...                  jnp.ones((e, 2 * i, h)), jnp.ones((e, h, i)), jax.nn.relu)
        >>> out.shape, float(out[0, 0])  # relu(4) * 4 summed over 2 units: 32, averaged over two experts
        ((5, 4), 32.0)
    """
    num_tokens, top_k = top_k_index.shape
    expert_of_row = top_k_index.reshape(-1)
    order = jnp.argsort(expert_of_row, stable=True)
    group_sizes = jnp.bincount(expert_of_row, length=gate_up_proj.shape[0]).astype(jnp.int32)
    rows = hidden[order // top_k]
    gate, up = jnp.split(_grouped_linear(rows, gate_up_proj, group_sizes), 2, axis=-1)
    out = _grouped_linear(activation(gate) * up, down_proj, group_sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(num_tokens, top_k, -1)
    return jnp.einsum("tkh,tk->th", unsorted.astype(jnp.float32), top_k_weights.astype(jnp.float32))


def load_balancing_loss(router_logits: jax.Array, top_k: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (the Switch Transformer auxiliary loss) on router logits
    ``(layers, batch, seq, experts)`` as the MoE heads return them; ``attention_mask`` ``(batch, seq)`` leaves
    padding out. transformers adds ``config.router_aux_loss_coef`` times it to the language-model loss when
    ``output_router_logits`` is set (``router_aux_loss``).

    Example:
        >>> uniform = jnp.zeros((2, 1, 3, 4))  # every expert equally likely: the loss is 1 per chosen expert
        >>> float(load_balancing_loss(uniform, top_k=2))
        2.0
    """
    if router_logits is None:
        return jnp.zeros((), jnp.float32)
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    chosen = jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], num_experts, dtype=jnp.float32).sum(axis=-2)
    if attention_mask is None:
        attention_mask = jnp.ones(router_logits.shape[1:3], jnp.float32)
    weight = (jnp.asarray(attention_mask) != 0).astype(jnp.float32)[None, :, :, None]
    num_rows = router_logits.shape[0] * jnp.sum(weight)
    tokens_per_expert = jnp.sum(chosen * weight, axis=(0, 1, 2)) / num_rows
    prob_per_expert = jnp.sum(probs * weight, axis=(0, 1, 2)) / num_rows
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_aux_loss(router_logits: jax.Array, config, attention_mask: jax.Array | None = None) -> jax.Array:
    """``config.router_aux_loss_coef * load_balancing_loss(...)``: what transformers adds to the loss.

    Example:
        >>> import transformers
        >>> config = transformers.MixtralConfig(router_aux_loss_coef=0.01, num_experts_per_tok=2)
        >>> round(float(router_aux_loss(jnp.zeros((1, 1, 2, 8)), config)), 4)
        0.02
    """
    loss = load_balancing_loss(router_logits, config.num_experts_per_tok, attention_mask)
    return config.router_aux_loss_coef * loss


# ------------------------------------------------------------------------------------------- the modules


class TopKRouter(nn.Module):
    """The router ``gate``: ``(router_logits, top_k_weights, top_k_index)`` for ``(tokens, hidden)`` inputs, as
    transformers' ``TopKRouter``; its ``weight`` is ``(experts, hidden)``, torch's layout."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        config = self.config
        init = attention.logical(nn.initializers.normal(config.initializer_range), "exp", "embed")
        weight = self.param("weight", init, (config.num_experts, config.hidden_size), self.param_dtype)
        router_logits = jnp.einsum("th,eh->te", hidden.astype(self.dtype), weight.astype(self.dtype))
        top_k_weights, top_k_index = route(router_logits, config.num_experts_per_tok, normalizes_top_k(self.config))
        if config.model_type == "qwen3_moe":  # transformers rounds Qwen3-MoE's weights to the compute dtype
            top_k_weights = top_k_weights.astype(self.dtype)
        return router_logits, top_k_weights, top_k_index


class Experts(nn.Module):
    """The experts ``experts``: fused raw ``gate_up_proj`` / ``down_proj`` in torch's layout (module docstring),
    read here directly; ``__call__(hidden, top_k_index, top_k_weights)`` as transformers' ``Experts.forward``."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, top_k_index, top_k_weights):
        config = self.config
        experts, width, inner = config.num_experts, config.hidden_size, expert_intermediate_size(config)
        init = nn.initializers.normal(config.initializer_range)
        gate_up_init = attention.logical(init, "exp", "mlp", "embed")
        gate_up_proj = self.param("gate_up_proj", gate_up_init, (experts, 2 * inner, width), self.param_dtype)
        down_proj = self.param("down_proj", attention.logical(init, "exp", "embed", "mlp"), (experts, width, inner),
                               self.param_dtype)
        out = expert_mlp(hidden.astype(self.dtype), top_k_index, top_k_weights, gate_up_proj.astype(self.dtype),
                         down_proj.astype(self.dtype), activations.activation_function(config.hidden_act))
        return out.astype(self.dtype)


class SparseMoeBlock(nn.Module):
    """The ``mlp`` of a sparse layer: ``(output, router_logits)`` for ``(batch, seq, hidden)`` inputs.

    Mixtral's ``router_jitter_noise`` scales the inputs by uniform noise in training (``deterministic=False``,
    from the ``dropout`` rng), as transformers.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic: bool = True):
        batch, seq_len, width = hidden.shape
        jitter = getattr(self.config, "router_jitter_noise", 0.0) or 0.0
        if not deterministic and jitter > 0:
            noise = jax.random.uniform(self.make_rng("dropout"), hidden.shape, minval=1 - jitter, maxval=1 + jitter)
            hidden = hidden * noise.astype(hidden.dtype)
        tokens = hidden.reshape(batch * seq_len, width)
        kwargs = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        router_logits, top_k_weights, top_k_index = TopKRouter(**kwargs, name="gate")(tokens)
        out = Experts(**kwargs, name="experts")(tokens, top_k_index, top_k_weights)
        return out.reshape(batch, seq_len, width), router_logits.reshape(batch, seq_len, -1)


class MoeDecoderLayer(llama.LlamaDecoderLayer):
    """A Llama decoder layer whose ``mlp`` is a ``SparseMoeBlock`` where ``sparse_layers`` says so; returns
    ``(hidden, (layer_cache, router_logits))``, the router logits ``None`` in a dense layer."""

    emits_router_logits: ClassVar[bool] = True

    def feed_forward(self, hidden, deterministic):
        if not self.is_sparse():
            return super().feed_forward(hidden, deterministic)
        return SparseMoeBlock(self.config, self.dtype, self.param_dtype, name="mlp")(hidden, deterministic)

    def is_sparse(self) -> bool:
        kinds = sparse_layers(self.config)
        if len(set(kinds)) == 1:  # always so in a scanned stack (check_config)
            return kinds[0]
        return kinds[int(self.name)]  # an unrolled stack names its layers "0", "1", ... (attention.UnrolledLayers)


class MoeModel(llama.LlamaModel):
    """The decoder stack; ``ModelOutput(last_hidden_state=..., cache=..., router_logits=...)``, the router logits
    ``(sparse_layers, batch, seq, experts)`` (None without sparse layers). Other inputs as ``LlamaModel``."""

    decoder_layer_cls: ClassVar[type] = MoeDecoderLayer

    def setup(self):
        check_config(self.config, self.scan_layers)
        super().setup()

    def run_layers(self, hidden, mask, rope, cache_index, deterministic, layers_cache, prefix_key_values):
        if layers_cache is None and not self.scan_layers:
            # An unrolled stack returns its layers' second outputs only when given per-layer caches.
            layers_cache = (None,) * self.config.num_hidden_layers
        hidden, outputs = self.layers(hidden, mask, rope, cache_index, deterministic, layers_cache, prefix_key_values)
        if self.scan_layers:
            layers_cache, router_logits = outputs
        else:
            layers_cache = tuple(layer_cache for layer_cache, _ in outputs)
            per_layer = [logits for _, logits in outputs if logits is not None]
            router_logits = jnp.stack(per_layer) if per_layer else None
        return hidden, layers_cache, {"router_logits": router_logits}


class MoeForCausalLM(llama.LlamaForCausalLM):
    """The MoE decoder with ``lm_head`` (or tied embeddings); its output also holds ``router_logits``."""

    base_model_cls: ClassVar[type] = MoeModel


class MoeForSequenceClassification(llama.LlamaForSequenceClassification):
    """The MoE decoder with a ``score`` layer on the last non-pad token; its output also holds ``router_logits``."""

    base_model_cls: ClassVar[type] = MoeModel


# ---------------------------------------------------------------------------------- checkpoint tensors


def name_map(config) -> hub.NameMap:
    """The Llama family's name map, with the router and experts keeping torch's names and layouts."""
    llama_names = llama.name_map(config)

    def module_kind(name: str) -> str:
        return "raw" if name in RAW_PARAMETER_MODULES else llama_names.module_kind(name)

    return dataclasses.replace(llama_names, module_kind=module_kind)


def fuse_expert_tensors(tensors: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Checkpoint tensors with transformers 4.x per-expert weights fused into transformers 5's layout, as
    transformers 5's loader converts them (``conversion_mapping.py``): Mixtral's ``block_sparse_moe`` becomes
    ``mlp``; per layer, the experts' gate and up weights are stacked and concatenated into ``gate_up_proj``
    ``(experts, 2 * intermediate, hidden)`` and their down weights stacked into ``down_proj``. A layer whose
    per-expert set is incomplete is left as it is (the loader then names what is missing).

    Example:
        >>> import transformers
        >>> config = transformers.MixtralConfig(num_local_experts=2, hidden_size=4, intermediate_size=3)
        >>> old = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": np.zeros((3, 4) if w != "w2" else (4, 3))
        ...        for e in range(2) for w in ("w1", "w2", "w3")}
        >>> {name: array.shape for name, array in fuse_expert_tensors(old, config).items()}
        {'model.layers.0.mlp.experts.gate_up_proj': (2, 6, 4), 'model.layers.0.mlp.experts.down_proj': (2, 4, 3)}
    """
    old_block = OLD_BLOCK_NAMES.get(config.model_type)
    if old_block is not None:
        tensors = {name.replace(f".{old_block}.", ".mlp."): array for name, array in tensors.items()}
    names = PER_EXPERT_NAMES[config.model_type]
    found: dict[str, dict[tuple[str, int], str]] = {}
    for name in tensors:
        match = _PER_EXPERT_TENSOR.match(name)
        if match and match["projection"] in names:
            found.setdefault(match["experts"], {})[match["projection"], int(match["index"])] = name
    fused = dict(tensors)
    expected = {(projection, e) for projection in names for e in range(config.num_experts)}
    for experts, per_expert in found.items():
        if set(per_expert) != expected:
            continue

        def stacked(projection, per_expert=per_expert):
            return np.stack([tensors[per_expert[projection, e]] for e in range(config.num_experts)])

        gate, up, down = names
        fused[f"{experts}.gate_up_proj"] = np.concatenate([stacked(gate), stacked(up)], axis=1)
        fused[f"{experts}.down_proj"] = stacked(down)
        for name in per_expert.values():
            del fused[name]
    return fused


def split_expert_tensors(tensors: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """The inverse of ``fuse_expert_tensors``: fused experts written one tensor per expert and projection (and
    Mixtral's ``mlp`` as ``block_sparse_moe``), as transformers 5's ``save_pretrained`` writes them by default."""
    gate, up, down = PER_EXPERT_NAMES[config.model_type]
    split = {}
    for name, array in tensors.items():
        experts, _, leaf = name.rpartition(".")
        if not experts.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj"):
            split[name] = array
        elif leaf == "gate_up_proj":
            inner = array.shape[1] // 2
            for e in range(array.shape[0]):
                split[f"{experts}.{e}.{gate}.weight"] = array[e, :inner]
                split[f"{experts}.{e}.{up}.weight"] = array[e, inner:]
        else:
            split.update({f"{experts}.{e}.{down}.weight": array[e] for e in range(array.shape[0])})
    old_block = OLD_BLOCK_NAMES.get(config.model_type)
    if old_block is not None:
        split = {name.replace(".mlp.", f".{old_block}."): array for name, array in split.items()}
    return split


def params_from_hf(tensors, config, head, scan_layers):
    return hub.hf_tensors_to_params(fuse_expert_tensors(tensors, config), name_map(config), head, scan_layers)


def params_to_hf(variables, config, head, scan_layers):
    return split_expert_tensors(hub.params_to_hf_tensors(variables, name_map(config), head, scan_layers), config)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    modules={"base": MoeModel, "causal_lm": MoeForCausalLM, "seq_cls": MoeForSequenceClassification},
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    default_lora_targets=("q_proj", "v_proj"),
    ignore_unexpected=(r"^lm_head\.", r"^score\.", r"rotary_emb\.inv_freq$"),
)
