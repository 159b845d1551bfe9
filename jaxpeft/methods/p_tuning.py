"""P-tuning: a prompt in front of the input embeddings, computed by a small encoder (Liu et al., 2021).

The base model never changes. The prompt is ``encoder(embedding)``: an embedding table of ``num_virtual_tokens``
rows (``token_dim`` wide) goes through HF PEFT's prompt encoder, and the result is used as prompt tuning uses its
table (``jaxpeft.methods.prompt_tuning``: leading ones in the attention mask, the virtual positions in the outputs,
extra cache slots in ``generate``). The encoders, as HF PEFT builds them:

- ``"MLP"``: Linear(token_dim, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, token_dim),
  whatever ``encoder_num_layers`` says (HF PEFT warns and ignores it too);
- ``"LSTM"``: a bidirectional LSTM of ``encoder_num_layers`` layers (torch's gates i, f, g, o, two biases, forward
  and reverse halves concatenated; ``encoder_dropout`` between layers when the call passes a ``'dropout'`` rng) ->
  Linear(2 hidden, 2 hidden) -> ReLU -> Linear(2 hidden, token_dim).

``hidden`` is ``encoder_hidden_size`` (``token_dim`` when unset, as HF PEFT fills it).

Leaves, for adapter ``name``, at the top of ``params`` (float32, torch layouts: a Linear's weight is
``(out, in)``):

- ``p_tuning_prompt_embeddings/<name>``: ``(num_virtual_tokens, token_dim)``, the prompt itself: HF PEFT's saved
  ``prompt_embeddings`` tensor. Present instead of all others in inference mode and after loading a saved adapter;
- ``p_tuning_embedding/<name>``: ``(num_virtual_tokens, token_dim)``, HF PEFT's ``embedding.weight``;
- ``p_tuning_mlp_head_{0,2,4}_{weight,bias}/<name>``: HF PEFT's ``mlp_head.{0,2,4}.{weight,bias}`` (no ``4``
  with ``"LSTM"``);
- with ``"LSTM"``, per layer ``l`` and direction ``d`` (0 forward, 1 reverse): ``p_tuning_lstm_weight_ih_l0``
  ``(2, 4 hidden, token_dim)``, ``p_tuning_lstm_weight_ih_rest`` ``(layers - 1, 2, 4 hidden, 2 hidden)`` (only with
  more than one layer), ``p_tuning_lstm_weight_hh`` ``(layers, 2, 4 hidden, hidden)``, ``p_tuning_lstm_bias_ih``
  and ``p_tuning_lstm_bias_hh`` ``(layers, 2, 4 hidden)``: torch's ``weight_ih_l{l}[_reverse]`` and so on, stacked.
  ``encoder_leaves_from_torch`` turns a torch ``PromptEncoder``'s state dict into these leaves.

The file format is HF PEFT's: one tensor ``prompt_embeddings``, the encoder's output (the encoder is not saved).
Loading mirrors torch PEFT, which loads it into the embedding table and uses that table as the prompt: the loaded
adapter holds ``p_tuning_prompt_embeddings`` (it may still be trained, as a table).

Differences from HF PEFT: encoder-decoder models (``SEQ_2_SEQ_LM``) are not supported. P-tuning cannot be merged
into the weights: ``merge``/``merge_and_unload`` raise ``AdapterError``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.config import PeftConfig, check, is_positive_int, strict_options
from jaxpeft.core import AdapterError
from jaxpeft.method import Method, register
from jaxpeft.methods import prompt_tuning
from jaxpeft.tree import flatten, unflatten_like

TABLE = "p_tuning_prompt_embeddings"
EMBEDDING = "p_tuning_embedding"
MLP_KEYS = tuple(f"p_tuning_mlp_head_{index}_{kind}" for index in (0, 2, 4) for kind in ("weight", "bias"))
LSTM_KEYS = ("p_tuning_lstm_weight_ih_l0", "p_tuning_lstm_weight_ih_rest", "p_tuning_lstm_weight_hh",
             "p_tuning_lstm_bias_ih", "p_tuning_lstm_bias_hh")
LEAF_KEYS = (TABLE, EMBEDDING) + MLP_KEYS + LSTM_KEYS
HF_TENSOR = "prompt_embeddings"
ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # HF PEFT's default encoder_num_layers, the only depth its MLP has
HIGHEST = jax.lax.Precision.HIGHEST


@strict_options
@dataclasses.dataclass
class PromptEncoderConfig(PeftConfig):
    """P-tuning options, with HF PEFT's names and defaults.

    Attributes:
        num_virtual_tokens: how many virtual tokens go in front of the input.
        token_dim: the size of the model's word embeddings; filled from the model's config by ``get_peft_model``,
            or taken from its word embedding (``nn.Embed``) by ``init_adapters``.
        num_transformer_submodules: 1 (2 would be encoder-decoder models, which jaxpeft does not have).
        num_attention_heads, num_layers: the model's, filled by ``get_peft_model`` as HF PEFT does; unused.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        encoder_reparameterization_type: the prompt encoder, ``"MLP"`` (three Linear layers with ReLU between) or
            ``"LSTM"`` (a bidirectional LSTM, then two Linear layers).
        encoder_hidden_size: the encoder's hidden size; ``token_dim`` when unset.
        encoder_num_layers: the LSTM's layers (the MLP always has HF PEFT's fixed depth; other values warn).
        encoder_dropout: dropout between the LSTM's layers, in training calls.

    Example:
        >>> import transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=50, bos_token_id=0, eos_token_id=0))
        >>> config = PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM")
        >>> model = jaxpeft.get_peft_model(base, config)
        >>> model.print_trainable_parameters()  # 4 * 16 + (16 * 8 + 8) + (8 * 8 + 8) + (8 * 16 + 16)
        trainable params: 416 || all params: 20,912 || trainable%: 1.9893
        >>> model(input_ids=[[1, 2, 3]]).logits.shape  # the 4 virtual positions come first
        (1, 7, 50)
    """

    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = MLP_LAYERS
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.num_virtual_tokens),
              f"PromptEncoderConfig needs num_virtual_tokens as a positive int, got {self.num_virtual_tokens!r}; "
              "e.g. num_virtual_tokens=20")
        self.num_virtual_tokens = int(self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            check(value is None or is_positive_int(value), f"{name} must be a positive int or None, got {value!r}")
        check(is_positive_int(self.encoder_num_layers),
              f"encoder_num_layers must be a positive int, got {self.encoder_num_layers!r}")
        check(self.num_transformer_submodules in (None, 1, 2),
              f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}")
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        check(kind.upper() in ENCODER_TYPES, f"encoder_reparameterization_type={kind!r} is unknown; use MLP or LSTM")
        self.encoder_reparameterization_type = kind.upper()
        dropout = self.encoder_dropout
        check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
              f"encoder_dropout must be a number in [0, 1), got {dropout!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            check(all(isinstance(m, str) for m in self.modules_to_save), "modules_to_save must hold module names")

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    @property
    def hidden_size(self) -> int | None:
        return self.encoder_hidden_size or self.token_dim


# ----- filling the config from the model (get_peft_model) -----

def prepare(config: PromptEncoderConfig, model) -> PromptEncoderConfig:
    """Prompt tuning's fill-in (``token_dim``, ``num_layers``, ...), then ``encoder_hidden_size = token_dim`` if
    unset, as HF PEFT does."""
    config = prompt_tuning.prepare(config, model)
    if config.encoder_hidden_size is None and config.token_dim is not None:
        config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
    return config


# ----- create -----

def _linear_shapes(sizes: list[int]) -> dict[str, tuple[tuple[int, ...], float]]:
    """The MLP head's leaves as ``{key: (shape, bound)}``: torch ``Linear``'s U(-1/sqrt(n_in), 1/sqrt(n_in))."""
    shapes = {}
    for step, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        bound = 1.0 / math.sqrt(n_in)
        shapes[MLP_KEYS[2 * step]], shapes[MLP_KEYS[2 * step + 1]] = ((n_out, n_in), bound), ((n_out,), bound)
    return shapes


def _lstm_shapes(token_dim: int, hidden: int, layers: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """The LSTM's leaves as ``{key: (shape, bound)}``: torch ``LSTM``'s U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    bound = 1.0 / math.sqrt(hidden)
    shapes = {LSTM_KEYS[0]: (2, 4 * hidden, token_dim), LSTM_KEYS[2]: (layers, 2, 4 * hidden, hidden),
              LSTM_KEYS[3]: (layers, 2, 4 * hidden), LSTM_KEYS[4]: (layers, 2, 4 * hidden)}
    if layers > 1:
        shapes[LSTM_KEYS[1]] = (layers - 1, 2, 4 * hidden, 2 * hidden)
    return {key: (shape, bound) for key, shape in shapes.items()}


def _uniform_leaves(key: jax.Array, shapes: dict, dtype: Any) -> dict[str, jax.Array]:
    """Uniform leaves cut from one draw (one random program to compile, not one per shape)."""
    sizes = [math.prod(shape) for shape, _ in shapes.values()]
    draw = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    offsets = np.cumsum([0] + sizes)
    return {leaf_key: jnp.asarray(draw[start:end].reshape(shape) * bound, dtype)
            for (leaf_key, (shape, bound)), start, end in zip(shapes.items(), offsets[:-1], offsets[1:], strict=True)}


def create(key: jax.Array, config: PromptEncoderConfig, trace, dtype: Any) -> dict:
    """The embedding (standard normal) and the encoder (torch's initialisations); in inference mode only the
    prompt table, as HF PEFT builds no encoder then. ``trace`` None: the sizes come from the config alone."""
    if config.total_virtual_tokens != config.num_virtual_tokens or config.task_type == "SEQ_2_SEQ_LM":
        raise AdapterError("p-tuning of encoder-decoder models (SEQ_2_SEQ_LM, num_transformer_submodules=2) is not "
                           "supported; use a decoder or encoder model")
    token_dim = prompt_tuning._token_dim(config, trace) if trace is not None else config.token_dim
    if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != MLP_LAYERS \
            and not config.inference_mode:
        warnings.warn(f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP encoder (as in HF "
                      f"PEFT): it has exactly {MLP_LAYERS} hidden layers", stacklevel=2)
    dtype = jnp.dtype(dtype)
    embedding_key, encoder_key = jax.random.split(key)
    embedding = jax.random.normal(embedding_key, (config.num_virtual_tokens, token_dim), dtype)
    if config.inference_mode:
        return {((), TABLE): embedding}
    hidden = config.encoder_hidden_size or token_dim
    if config.encoder_reparameterization_type == "MLP":
        shapes = _linear_shapes([token_dim, hidden, hidden, token_dim])
    else:
        shapes = {**_lstm_shapes(token_dim, hidden, config.encoder_num_layers),
                  **_linear_shapes([2 * hidden, 2 * hidden, token_dim])}
    leaves = {EMBEDDING: embedding, **_uniform_leaves(encoder_key, shapes, dtype)}
    return {((), leaf_key): value for leaf_key, value in leaves.items()}


# ----- the encoder -----

def _lstm_layer(inputs: jax.Array, weight_ih, weight_hh, bias_ih, bias_hh) -> jax.Array:
    """One bidirectional torch LSTM layer over ``inputs`` ``(tokens, features)``: ``(tokens, 2 hidden)``, forward
    then reverse. The weights have a leading direction axis; both directions run in one scan, the reverse one on
    the flipped sequence."""
    hidden = weight_hh.shape[-1]
    projected = jnp.einsum("ti,dgi->dtg", inputs, weight_ih, precision=HIGHEST) + (bias_ih + bias_hh)[:, None]
    projected = jnp.stack([projected[0], projected[1, ::-1]], axis=1)  # (tokens, direction, 4 hidden)

    def step(carry, x_gates):
        h, c = carry
        gates = x_gates + jnp.einsum("dh,dgh->dg", h, weight_hh, precision=HIGHEST)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((2, hidden), inputs.dtype)
    _, outputs = jax.lax.scan(step, (zeros, zeros), projected)
    return jnp.concatenate([outputs[:, 0], outputs[::-1, 1]], axis=-1)


def _lstm(leaves: dict, inputs: jax.Array, dropout_rate: float, dropout_key: jax.Array | None) -> jax.Array:
    """torch's bidirectional multi-layer LSTM (dropout on every layer's output but the last's)."""
    layers = leaves[LSTM_KEYS[2]].shape[0]
    for layer in range(layers):
        weight_ih = leaves[LSTM_KEYS[0]] if layer == 0 else leaves[LSTM_KEYS[1]][layer - 1]
        inputs = _lstm_layer(inputs, weight_ih, *(leaves[key][layer] for key in LSTM_KEYS[2:]))
        if dropout_key is not None and dropout_rate > 0 and layer < layers - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, layer), 1 - dropout_rate, inputs.shape)
            inputs = jnp.where(keep, inputs / (1 - dropout_rate), 0)
    return inputs


def _mlp(leaves: dict, inputs: jax.Array) -> jax.Array:
    steps = [index for index in (0, 2, 4) if f"p_tuning_mlp_head_{index}_weight" in leaves]
    for position, index in enumerate(steps):
        weight, bias = leaves[f"p_tuning_mlp_head_{index}_weight"], leaves[f"p_tuning_mlp_head_{index}_bias"]
        inputs = jnp.matmul(inputs, weight.T, precision=HIGHEST) + bias
        if position < len(steps) - 1:
            inputs = jax.nn.relu(inputs)
    return inputs


def _adapter_leaves(variables: Any, adapter_name: str) -> dict[str, jax.Array]:
    params = variables["params"]
    return {key: jnp.asarray(nn.meta.unbox(params[key][adapter_name]), jnp.float32)
            for key in LEAF_KEYS if key in params and adapter_name in params[key]}


def prompt_table(config: PromptEncoderConfig, variables: Any, adapter_name: str = "default",
                 dropout_key: jax.Array | None = None) -> jax.Array:
    """The prompt ``(num_virtual_tokens, token_dim)``, float32: the stored table, or the encoder's output for the
    embedding (HF PEFT's ``prompt_embeddings``); ``dropout_key`` runs the LSTM's ``encoder_dropout``.

    Example:
        >>> import jax
        >>> config = PromptEncoderConfig(num_virtual_tokens=3, token_dim=8, encoder_reparameterization_type="LSTM",
        ...                              encoder_hidden_size=5)
        >>> leaves = create(jax.random.key(0), config, None, "float32")
        >>> variables = {"params": {leaf_key: {"default": value} for (_, leaf_key), value in leaves.items()}}
        >>> prompt_table(config, variables).shape
        (3, 8)
    """
    leaves = _adapter_leaves(variables, adapter_name)
    if TABLE in leaves:
        return leaves[TABLE]
    if EMBEDDING not in leaves or MLP_KEYS[0] not in leaves:
        raise AdapterError(f"the variables hold no p-tuning adapter {adapter_name!r}; create it with init_adapters "
                           "or get_peft_model")
    embedding = leaves[EMBEDDING]
    if LSTM_KEYS[0] in leaves:
        embedding = _lstm(leaves, embedding, config.encoder_dropout, dropout_key)
    return _mlp(leaves, embedding)


# ----- forward -----

def call(config: PromptEncoderConfig, adapter_name: str, apply_fn, variables: Any, args: tuple, kwargs: dict,
         dropout: bool):
    """Computes the prompt and runs prompt tuning's call with it as the prompt table."""
    if kwargs.get("method") not in (None, "__call__"):
        return apply_fn(variables, *args, **kwargs)
    dropout_key = None
    if dropout and config.encoder_dropout > 0:
        dropout_key = jax.random.fold_in(kwargs["rngs"]["dropout"], 0x70747567)  # apart from the model's dropout
    table = prompt_table(config, variables, adapter_name, dropout_key)
    params = {**variables["params"], prompt_tuning.LEAF_KEY: {adapter_name: table}}
    return prompt_tuning.call(config, adapter_name, apply_fn, {**variables, "params": params}, args, kwargs, dropout)


# ----- the HF PEFT file format, and torch's training state -----

def hf_tensors(config: PromptEncoderConfig, variables: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``{"prompt_embeddings": (num_virtual_tokens, token_dim)}``: the encoder's output, what torch PEFT saves."""
    return {HF_TENSOR: np.asarray(jax.device_get(prompt_table(config, variables, adapter_name)), np.float32)}


def leaves_from_hf(config: PromptEncoderConfig, tensors: dict, variables: Any, adapter_name: str) -> Any:
    """``variables`` with the adapter's ``p_tuning_prompt_embeddings`` taken from HF PEFT's ``prompt_embeddings``,
    in place of any leaves the adapter had (the table form, as torch PEFT loads it)."""
    if HF_TENSOR not in tensors:
        raise AdapterError(f"the adapter's tensors lack {HF_TENSOR!r} (they hold {sorted(tensors)[:4]}); it is not a "
                           "p-tuning adapter")
    value = np.asarray(tensors[HF_TENSOR])
    if value.ndim != 2 or value.shape[0] != config.total_virtual_tokens or (
            config.token_dim is not None and value.shape[1] != config.token_dim):
        raise AdapterError(f"{HF_TENSOR} has shape {value.shape}; this config needs ({config.total_virtual_tokens}, "
                           f"{config.token_dim}) (num_virtual_tokens, token_dim)")
    flat = {path: leaf for path, leaf in flatten(variables["params"]).items()
            if not (len(path) == 2 and path[0] in LEAF_KEYS and path[1] == adapter_name)}
    flat[(TABLE, adapter_name)] = jnp.asarray(value, jnp.float32)
    params = unflatten_like(flat, variables["params"])
    return {**variables, "params": params} if isinstance(variables, dict) else variables.copy({"params": params})


def encoder_leaves_from_torch(config: PromptEncoderConfig, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """The leaves (``{leaf key: array}``) of a torch PEFT ``PromptEncoder``'s ``state_dict()`` (``embedding.weight``,
    ``mlp_head.0.weight``, ``lstm_head.weight_ih_l0_reverse``, ...), e.g. to go on training a torch model's encoder.
    """
    state = {name: np.asarray(value, np.float32) for name, value in state.items()}
    try:
        leaves = {EMBEDDING: state["embedding.weight"]}
        for key in MLP_KEYS:
            index, kind = key.removeprefix("p_tuning_mlp_head_").split("_")
            if f"mlp_head.{index}.{kind}" in state:
                leaves[key] = state[f"mlp_head.{index}.{kind}"]
        if config.encoder_reparameterization_type == "LSTM":
            leaves.update(_lstm_from_torch(state, config.encoder_num_layers))
    except KeyError as error:
        raise AdapterError(f"the torch prompt encoder state lacks {error.args[0]!r}; pass PromptEncoder.state_dict() "
                           "of a model built with inference_mode=False") from None
    return leaves


def _lstm_from_torch(state: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    def stacked(name: str, layer: int) -> np.ndarray:
        return np.stack([state[f"lstm_head.{name}_l{layer}{suffix}"] for suffix in ("", "_reverse")])

    leaves = {LSTM_KEYS[0]: stacked("weight_ih", 0)}
    if layers > 1:
        leaves[LSTM_KEYS[1]] = np.stack([stacked("weight_ih", layer) for layer in range(1, layers)])
    for leaf_key, name in zip(LSTM_KEYS[2:], ("weight_hh", "bias_ih", "bias_hh"), strict=True):
        leaves[leaf_key] = np.stack([stacked(name, layer) for layer in range(layers)])
    return leaves


METHOD = register(Method(
    config_class=PromptEncoderConfig, leaf_keys=LEAF_KEYS, create=create, prepare=prepare, call=call,
    hf_tensors=hf_tensors, leaves_from_hf=leaves_from_hf, cli_name="p_tuning"))
