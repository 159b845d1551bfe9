"""Prefix tuning: learned keys and values in front of every attention layer (Li & Liang, 2021).

The base model never changes. The rewritten apply turns the adapter's leaves into per-layer key/values and calls the
model with ``prefix_key_values=(keys, values)``, each ``(num_layers, batch, num_virtual_tokens, kv_heads,
head_dim)``: every attention layer attends them before the sequence's own keys and values, whatever the attention
mask says. HF PEFT does the same through transformers' key/value cache, and jaxpeft matches its numbers:

- HF PEFT's table ``(num_virtual_tokens, num_layers * 2 * token_dim)`` is read, per virtual token, as
  ``(num_layers, 2, heads, head_dim)``: layer ``l`` takes index ``(l, 0)`` as its key and ``(l, 1)`` as its value.
  With grouped-query attention ``heads`` is ``num_key_value_heads`` and ``token_dim = head_dim * heads``
  (``get_peft_model`` sets both, as HF PEFT does);
- with ``prefix_projection`` the table is computed: embedding ``(num_virtual_tokens, token_dim)`` ->
  Dense(``encoder_hidden_size``) -> tanh -> Dense(``num_layers * 2 * token_dim``);
- the real tokens come after the prefix, as transformers places them after a cache holding it: ``position_ids``
  that the caller passes are shifted by ``num_virtual_tokens`` (HF PEFT's rule, so ``generate`` numbers the prompt
  ``num_virtual_tokens + 0, 1, ...`` from its first real token); without them, a decoder of ``jaxpeft.models``
  (any head of a family that has a causal LM; their own default ignores the prefix) gets ``num_virtual_tokens +
  cache index + 0, 1, ...``, and any other model keeps its own default (BERT and RoBERTa count from the prefix
  length already; torch DistilBERT has no cache, and jaxpeft's counts from 0).

Leaves, for adapter ``name``, at the top of ``params`` (float32):

- ``prefix_kv_table/<name>``: ``(num_virtual_tokens, num_layers * 2 * token_dim)``, HF PEFT's ``prompt_embeddings``
  as is. Present without ``prefix_projection``, and after loading any saved adapter;
- with ``prefix_projection``: ``prefix_embedding/<name>`` ``(num_virtual_tokens, token_dim)``,
  ``prefix_mlp_in_kernel/<name>`` ``(token_dim, encoder_hidden_size)``, ``prefix_mlp_in_bias/<name>``,
  ``prefix_mlp_out_kernel/<name>`` ``(encoder_hidden_size, num_layers * 2 * token_dim)`` and
  ``prefix_mlp_out_bias/<name>`` (the transposes of torch's ``Linear`` weights).

The file format is HF PEFT's: one tensor ``prompt_embeddings``, the table. With ``prefix_projection`` that is the
projected table; the embedding and the MLP are not saved. Loading mirrors torch PEFT, which loads prompt learning
adapters for inference only and then builds the table form: the loaded adapter holds ``prefix_kv_table``, whatever
``prefix_projection`` says (in jaxpeft it may still be trained, as a table).

A linen model of your own works with prefix tuning when its ``__call__`` takes ``prefix_key_values=(keys, values)``
as above (the arrays are float32: cast them to the compute dtype) and every attention layer ``l`` puts
``keys[l]``, ``values[l]`` in front of its own keys and values, always attended and not rotated, as
``jaxpeft.models`` does. If it takes ``position_ids``, pass them by keyword (or positionally, in the order of its
``__call__``): they are shifted as above. Set ``num_layers``, ``token_dim`` and ``num_attention_heads`` (the
key/value heads) in the config when you call ``init_adapters`` yourself; ``get_peft_model`` fills them from a
``jaxpeft.models`` model's transformers config.

Differences from HF PEFT: a Mistral/Qwen sliding window never hides the prefix (transformers counts the prefix in
the window, which matters once prefix and sequence outgrow it); encoder-decoder models (``SEQ_2_SEQ_LM``,
``num_transformer_submodules=2``) are not supported. Prefix tuning cannot be merged into the weights:
``merge``/``merge_and_unload`` raise ``AdapterError``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._tracing import Trace
from jaxpeft.config import (
    ConfigError,
    PeftConfig,
    check,
    is_positive_int,
    model_dimensions,
    strict_options,
)
from jaxpeft.core import AdapterError, virtual_token_advice
from jaxpeft.method import Method, register
from jaxpeft.tree import flatten, unflatten_like

TABLE = "prefix_kv_table"
EMBEDDING = "prefix_embedding"
MLP_IN_KERNEL = "prefix_mlp_in_kernel"
MLP_IN_BIAS = "prefix_mlp_in_bias"
MLP_OUT_KERNEL = "prefix_mlp_out_kernel"
MLP_OUT_BIAS = "prefix_mlp_out_bias"
PROJECTION_KEYS = (EMBEDDING, MLP_IN_KERNEL, MLP_IN_BIAS, MLP_OUT_KERNEL, MLP_OUT_BIAS)
LEAF_KEYS = (TABLE,) + PROJECTION_KEYS
HF_TENSOR = "prompt_embeddings"
DIMENSIONS = ("num_layers", "token_dim", "num_attention_heads")


def _accepts_prefix_length(cls):
    """Class decorator: ``prefix_length=`` (a tutorial spelling) is taken as ``num_virtual_tokens``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, prefix_length: int | None = None, **kwargs):
        if prefix_length is not None:
            given = kwargs.get("num_virtual_tokens")
            if given is not None and given != prefix_length:
                raise ConfigError(f"prefix_length={prefix_length} and num_virtual_tokens={given} disagree; "
                                  "pass only one of them")
            kwargs["num_virtual_tokens"] = prefix_length
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accepts_prefix_length
@strict_options
@dataclasses.dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning options, with HF PEFT's names and defaults.

    Attributes:
        num_virtual_tokens: how many key/value positions go in front of every attention layer (``prefix_length``
            is accepted as another name for it).
        token_dim: ``head_dim * key/value heads`` of the model (its hidden size unless it uses grouped-query
            attention); ``get_peft_model`` fills it from the model's config, as HF PEFT does.
        num_attention_heads: the model's key/value heads (its attention heads unless it uses grouped-query
            attention); filled by ``get_peft_model``.
        num_layers: the model's attention layers; filled by ``get_peft_model``.
        num_transformer_submodules: 1 (2 would be encoder-decoder models, which jaxpeft does not have).
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        init_weights: None (the table, or the projection's embedding, standard normal; the projection's Dense
            layers as torch's ``Linear``) or ``"zero"`` (the table, or the last Dense layer, zero: the prefix
            keys and values start at zero).
        encoder_hidden_size: the width of the projection's hidden layer (default ``token_dim``).
        prefix_projection: compute the table with an MLP from a smaller embedding (see the module docstring).

    Example:
        >>> import transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
        >>> gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2,
        ...     vocab_size=50))
        >>> model = jaxpeft.get_peft_model(gpt2, PrefixTuningConfig(prefix_length=4, task_type="text-generation"))
        >>> config = model.peft_config["default"]
        >>> config.num_virtual_tokens, config.num_layers, config.token_dim, config.num_attention_heads
        (4, 2, 16, 2)
        >>> model.print_trainable_parameters()  # 4 tokens x 2 layers x (key + value) x 16
        trainable params: 256 || all params: 24,032 || trainable%: 1.0652
        >>> model(input_ids=[[1, 2, 3]]).logits.shape
        (1, 3, 50)
        >>> model.generate([[1, 2, 3]], max_new_tokens=2).shape
        (1, 5)
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.num_virtual_tokens),
              f"PrefixTuningConfig needs num_virtual_tokens (or prefix_length) as a positive int, got "
              f"{self.num_virtual_tokens!r}; e.g. num_virtual_tokens=20")
        self.num_virtual_tokens = int(self.num_virtual_tokens)
        for name in DIMENSIONS + ("encoder_hidden_size",):
            value = getattr(self, name)
            check(value is None or is_positive_int(value),
                  f"{name} must be a positive int or None, got {name}={value!r}")
        check(self.num_transformer_submodules in (None, 1),
              f"num_transformer_submodules={self.num_transformer_submodules!r}: prefix tuning of encoder-decoder "
              "models is not supported; leave it unset (or 1)")
        check(self.task_type != "SEQ_2_SEQ_LM", "prefix tuning of encoder-decoder models (task_type SEQ_2_SEQ_LM) "
                                                "is not supported; use a decoder or encoder model")
        check(self.init_weights in (None, "zero"),
              f"init_weights must be None (random) or 'zero', got init_weights={self.init_weights!r}")
        check(isinstance(self.prefix_projection, bool),
              f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        check(self.token_dim is None or self.num_attention_heads is None
              or self.token_dim % self.num_attention_heads == 0,
              f"token_dim={self.token_dim} must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            check(all(isinstance(m, str) for m in self.modules_to_save), "modules_to_save must hold module names")

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def table_width(self) -> int:
        """Columns of the table: ``num_layers * 2 * token_dim``."""
        return self.num_layers * 2 * self.token_dim


def _require_dimensions(config: PrefixTuningConfig) -> None:
    missing = [name for name in DIMENSIONS if getattr(config, name) is None]
    if missing:
        raise ConfigError(f"PrefixTuningConfig needs {', '.join(missing)} here (get_peft_model fills them from a "
                          "jaxpeft.models model); set them, e.g. num_layers=12, token_dim=768, num_attention_heads=12 "
                          "(with grouped-query attention: token_dim=head_dim*kv_heads, num_attention_heads=kv_heads)")


# ----- filling the config from the model (get_peft_model) -----

def prepare(config: PrefixTuningConfig, model) -> PrefixTuningConfig:
    """``config`` with what HF PEFT fills from the model's transformers config (options already set are kept,
    except that grouped-query attention always sets ``token_dim`` and ``num_attention_heads`` to the key/value
    heads', as in HF PEFT), and ``encoder_hidden_size`` defaulting to ``token_dim``."""
    model_config = model.config
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    found = model_dimensions(model_config)
    num_layers = config.num_layers or found["num_layers"]
    token_dim = config.token_dim or found["token_dim"]
    heads = config.num_attention_heads or found["num_attention_heads"]
    for name, value in (("num_layers", num_layers), ("token_dim", token_dim), ("num_attention_heads", heads)):
        if value is None:
            raise ConfigError(f"cannot find {name} in the model's config ({type(model_config).__name__}); set "
                              f"PrefixTuningConfig({name}=...)")
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if kv_heads is not None:
        head_dim = getattr(model_config, "head_dim", None) or token_dim // heads
        token_dim, heads = head_dim * kv_heads, kv_heads
    return dataclasses.replace(config, num_layers=num_layers, token_dim=token_dim, num_attention_heads=heads,
                               num_transformer_submodules=config.num_transformer_submodules or 1,
                               encoder_hidden_size=config.encoder_hidden_size or token_dim)


# ----- create -----

def _uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    """torch ``Linear``'s default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def create(key: jax.Array, config: PrefixTuningConfig, trace: Trace, dtype: Any) -> dict:
    """The table, or with ``prefix_projection`` the embedding and the MLP, initialised as torch PEFT does."""
    del trace  # the prefix's shape comes from the config alone
    _require_dimensions(config)
    dtype = jnp.dtype(dtype)
    zero = config.init_weights == "zero"
    tokens, width = config.num_virtual_tokens, config.table_width
    if not config.prefix_projection:
        table = jnp.zeros((tokens, width), dtype) if zero else jax.random.normal(key, (tokens, width), dtype)
        return {((), TABLE): table}
    hidden = config.encoder_hidden_size or config.token_dim
    keys = jax.random.split(key, 5)

    def last_layer(key, shape):
        return jnp.zeros(shape, dtype) if zero else _uniform(key, shape, hidden, dtype)

    leaves = {
        EMBEDDING: jax.random.normal(keys[0], (tokens, config.token_dim), dtype),
        MLP_IN_KERNEL: _uniform(keys[1], (config.token_dim, hidden), config.token_dim, dtype),
        MLP_IN_BIAS: _uniform(keys[2], (hidden,), config.token_dim, dtype),
        MLP_OUT_KERNEL: last_layer(keys[3], (hidden, width)),
        MLP_OUT_BIAS: last_layer(keys[4], (width,)),
    }
    return {((), leaf_key): value for leaf_key, value in leaves.items()}


# ----- forward -----

def _leaf(params: Any, leaf_key: str, adapter_name: str) -> jax.Array | None:
    by_name = params.get(leaf_key) if hasattr(params, "get") else None
    if by_name is None or adapter_name not in by_name:
        return None
    return jnp.asarray(nn.meta.unbox(by_name[adapter_name]), jnp.float32)


def prefix_table(config: PrefixTuningConfig, variables: Any, adapter_name: str = "default") -> jax.Array:
    """The adapter's table ``(num_virtual_tokens, num_layers * 2 * token_dim)``, float32: the stored one, or the
    projection's output (HF PEFT's ``prompt_embeddings``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = PrefixTuningConfig(num_virtual_tokens=2, num_layers=3, token_dim=8, num_attention_heads=2,
        ...                             prefix_projection=True, encoder_hidden_size=5)
        >>> leaves = create(jax.random.key(0), config, None, "float32")
        >>> variables = {"params": {leaf_key: {"default": value} for (_, leaf_key), value in leaves.items()}}
        >>> prefix_table(config, variables).shape
        (2, 48)
    """
    params = variables["params"]
    table = _leaf(params, TABLE, adapter_name)
    if table is None:
        embedding, in_kernel, in_bias, out_kernel, out_bias = (_leaf(params, k, adapter_name) for k in PROJECTION_KEYS)
        if any(leaf is None for leaf in (embedding, in_kernel, in_bias, out_kernel, out_bias)):
            raise AdapterError(f"the variables hold no prefix tuning adapter {adapter_name!r} (neither {TABLE} nor "
                               "the prefix_projection leaves); create it with init_adapters or get_peft_model")
        highest = jax.lax.Precision.HIGHEST
        hidden = jnp.tanh(jnp.matmul(embedding, in_kernel, precision=highest) + in_bias)
        table = jnp.matmul(hidden, out_kernel, precision=highest) + out_bias
    _require_dimensions(config)
    expected = (config.num_virtual_tokens, config.table_width)
    if table.shape != expected:
        raise AdapterError(f"prefix tuning adapter {adapter_name!r} gives a table of shape {table.shape}; its config "
                           f"needs {expected} (num_virtual_tokens, num_layers * 2 * token_dim)")
    return table


def prefix_key_values(config: PrefixTuningConfig, variables: Any, adapter_name: str = "default",
                      batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(keys, values)``, each ``(num_layers, batch_size, num_virtual_tokens, heads, head_dim)`` float32: what the
    rewritten apply passes to the model as ``prefix_key_values``.

    Example:
        >>> import jax.numpy as jnp
        >>> config = PrefixTuningConfig(num_virtual_tokens=2, num_layers=3, token_dim=8, num_attention_heads=2)
        >>> table = jnp.arange(2 * 48.0).reshape(2, 48)  # per token: layer 0 key, layer 0 value, layer 1 key, ...
        >>> keys, values = prefix_key_values(config, {"params": {"prefix_kv_table": {"default": table}}},
        ...                                  batch_size=4)
        >>> keys.shape
        (3, 4, 2, 2, 4)
        >>> keys[1, 0, 0, 0].tolist(), values[1, 0, 0, 0].tolist()  # layer 1, token 0, head 0
        ([16.0, 17.0, 18.0, 19.0], [24.0, 25.0, 26.0, 27.0])
    """
    table = prefix_table(config, variables, adapter_name)
    per_token = table.reshape(config.num_virtual_tokens, config.num_layers, 2, config.num_attention_heads,
                              config.head_dim)
    shape = (config.num_layers, batch_size, config.num_virtual_tokens, config.num_attention_heads, config.head_dim)

    def stacked(index):
        return jnp.broadcast_to(per_token[:, :, index].transpose(1, 0, 2, 3)[:, None], shape)

    return stacked(0), stacked(1)


def _module(apply_fn) -> nn.Module | None:
    while isinstance(apply_fn, functools.partial):
        apply_fn = apply_fn.func
    module = getattr(apply_fn, "__self__", None)
    return module if isinstance(module, nn.Module) else None


def _decoder_family(module: nn.Module | None):
    """The ``jaxpeft.models`` family of ``module`` when it is a head of a family that has a causal LM (GPT-2, Llama,
    ...), else None."""
    from jaxpeft.models.auto import family_for

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        family = family_for(model_type)
    except ValueError:
        return None
    is_decoder = "causal_lm" in family.modules and type(module) in tuple(family.modules.values())
    return family if is_decoder else None


def _check_shifted_positions(module: nn.Module, family, num_virtual: int, seq_len: int, cache: Any) -> None:
    """Refuses, at trace time, positions shifted past the virtual tokens that run beyond a learned position table
    (positions stay below the sequence's length, or below the cache's slots when generating)."""
    from jaxpeft.models.attention import cache_length

    if family.position_table is None:
        return
    table_size = getattr(module.config, family.position_table)
    num_positions = seq_len if cache is None else cache_length(cache)
    if num_virtual + num_positions > table_size:
        raise AdapterError(f"prefix tuning numbers the input's positions after its {num_virtual} virtual tokens: "
                           f"{num_virtual + num_positions} positions, but the model has {table_size} "
                           f"({family.position_table}); {virtual_token_advice(table_size, num_virtual)}")


def _named_inputs(module: nn.Module | None, args: tuple, kwargs: dict) -> dict:
    """The call's inputs by name (positional ones named after the module's ``__call__`` parameters)."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(type(module).__call__).parameters)[1:] if module is not None else ["input_ids"]
    if len(args) > len(names):
        raise AdapterError("prefix tuning needs the inputs after input_ids as keywords (attention_mask=..., ...)")
    named = dict(zip(names, args, strict=False))
    both = sorted(set(named) & set(kwargs))
    if both:
        raise TypeError(f"got multiple values for {both}")
    return {**named, **kwargs}


def _sequence_shape(inputs: dict) -> tuple[int, int]:
    for name, ndim in (("input_ids", 2), ("inputs_embeds", 3)):
        value = inputs.get(name)
        if value is not None:
            shape = np.shape(value)
            if len(shape) != ndim:
                raise AdapterError(f"{name} must have {ndim} axes (batch, seq{', hidden' if ndim == 3 else ''}), "
                                   f"got shape {shape}")
            return int(shape[0]), int(shape[1])
    raise AdapterError("prefix tuning needs input_ids or inputs_embeds to know the batch size")


def call(config: PrefixTuningConfig, adapter_name: str, apply_fn, variables: Any, args: tuple, kwargs: dict,
         dropout: bool):
    """Runs ``apply_fn`` with the adapter's ``prefix_key_values`` and the positions after the prefix (see the
    module docstring)."""
    del dropout  # prefix tuning has no dropout of its own; the model's runs as asked
    if kwargs.get("method") not in (None, "__call__"):
        return apply_fn(variables, *args, **kwargs)
    module = _module(apply_fn)
    inputs = _named_inputs(module, args, kwargs)
    if inputs.get("prefix_key_values") is not None:
        raise AdapterError("the call already passes prefix_key_values; a prefix tuning adapter supplies them (run "
                           "with adapter_name=None to pass your own)")
    batch_size, seq_len = _sequence_shape(inputs)
    num_virtual = config.num_virtual_tokens
    family, cache = _decoder_family(module), inputs.get("cache")
    if family is not None:
        _check_shifted_positions(module, family, num_virtual, seq_len, cache)
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = jnp.asarray(inputs["position_ids"]) + num_virtual
    elif family is not None:
        start = num_virtual + (0 if cache is None else cache.index)
        inputs["position_ids"] = jnp.broadcast_to(start + jnp.arange(seq_len), (batch_size, seq_len))
    inputs["prefix_key_values"] = prefix_key_values(config, variables, adapter_name, batch_size)
    return apply_fn(variables, **inputs)


# ----- the HF PEFT file format -----

def hf_tensors(config: PrefixTuningConfig, variables: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``{"prompt_embeddings": (num_virtual_tokens, num_layers * 2 * token_dim)}``: the table (projected, with
    ``prefix_projection``), what torch PEFT saves."""
    table = prefix_table(config, variables, adapter_name)
    return {HF_TENSOR: np.asarray(jax.device_get(table), np.float32)}


def leaves_from_hf(config: PrefixTuningConfig, tensors: dict, variables: Any, adapter_name: str) -> Any:
    """``variables`` with the adapter's ``prefix_kv_table`` taken from HF PEFT's ``prompt_embeddings``, in place of
    any leaves the adapter had: the table form, also for a ``prefix_projection`` adapter, as torch PEFT loads it.

    Example:
        >>> import numpy as np
        >>> config = PrefixTuningConfig(num_virtual_tokens=2, num_layers=3, token_dim=8, num_attention_heads=2)
        >>> variables = leaves_from_hf(config, {"prompt_embeddings": np.ones((2, 48))}, {"params": {}}, "default")
        >>> variables["params"]["prefix_kv_table"]["default"].shape
        (2, 48)
    """
    if HF_TENSOR not in tensors:
        raise AdapterError(f"the adapter's tensors lack {HF_TENSOR!r} (they hold {sorted(tensors)[:4]}); it is not a "
                           "prefix tuning adapter")
    _require_dimensions(config)
    value = np.asarray(tensors[HF_TENSOR])
    expected = (config.num_virtual_tokens, config.table_width)
    if value.shape != expected:
        raise AdapterError(f"{HF_TENSOR} has shape {value.shape}; this config needs {expected} "
                           "(num_virtual_tokens, num_layers * 2 * token_dim)")
    flat = {path: leaf for path, leaf in flatten(variables["params"]).items()
            if not (len(path) == 2 and path[0] in LEAF_KEYS and path[1] == adapter_name)}
    flat[(TABLE, adapter_name)] = jnp.asarray(value, jnp.float32)
    params = unflatten_like(flat, variables["params"])
    return {**variables, "params": params} if isinstance(variables, dict) else variables.copy({"params": params})


METHOD = register(Method(
    config_class=PrefixTuningConfig, leaf_keys=LEAF_KEYS, create=create, prepare=prepare, call=call,
    hf_tensors=hf_tensors, leaves_from_hf=leaves_from_hf, cli_name="prefix"))
