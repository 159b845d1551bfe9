"""Prompt tuning: learned embeddings put in front of the input embeddings (Lester et al., 2021).

The base model never changes. The rewritten apply embeds the tokens with the model's own word embedding, puts the
``num_virtual_tokens`` learned rows in front, and calls the model with ``inputs_embeds``, as HF PEFT does:

- the attention mask gets ``num_virtual_tokens`` leading ones, BERT's ``token_type_ids`` leading zeros (dropped, as
  in HF PEFT, for ``CAUSAL_LM`` and ``FEATURE_EXTRACTION``); ``position_ids`` are ignored with a warning, as in HF
  PEFT: positions count from the first virtual token;
- the outputs include the virtual positions: ``CAUSAL_LM`` and ``TOKEN_CLS`` logits are
  ``(batch, num_virtual_tokens + seq, ...)``; ``extend_labels`` gives the matching labels (``-100`` in front). An
  encoder classifier pools the first virtual token (BERT's pooler, DistilBERT's first position), a decoder
  classifier the last position (transformers cannot see padding in ``inputs_embeds``);
- in ``generate`` the virtual tokens fill ``num_virtual_tokens`` extra key/value cache slots in front of the
  caller's: the first call with a cache (its ``attention_mask`` spans the caller's slots) adds the slots and runs the
  virtual tokens with the prompt; later calls (the cache is then ``num_virtual_tokens`` slots longer than the mask)
  run only the new tokens. Positions are cache slots, as in HF PEFT; generated ids never include virtual tokens.

Leaf, for adapter ``name``, at the top of ``params``:

- ``prompt_embeddings/<name>``: ``(num_virtual_tokens * num_transformer_submodules, token_dim)`` float32, HF PEFT's
  ``prompt_embeddings`` tensor as is.

A linen model of your own works when (the convention of ``jaxpeft.models``):

- its ``__call__`` takes ``inputs_embeds=`` (batch, seq, token_dim) in place of ``input_ids`` (passed as None), and
  ``attention_mask=`` (batch, seq) if it masks at all;
- it has a method ``embed_input_ids(input_ids)`` returning the embeddings that ``inputs_embeds`` replaces (the
  rewritten apply calls ``apply_fn(variables, input_ids, method="embed_input_ids")``);
- its word embedding is an ``nn.Embed`` (named ``word_embeddings``, ``wte``, ``embed_tokens``, ... or else the
  largest ``nn.Embed``): ``token_dim`` and the ``TEXT``/``SAMPLE_VOCAB`` initialisations come from it;
- for ``generate``, it follows ``jaxpeft.models``' cache convention (``cache=`` a ``KVCache`` whose arrays have the
  slot axis third from last, and an ``attention_mask`` spanning the cache slots);
- if it refuses inputs longer than its position table, it raises a ``ValueError`` with ``num_tokens`` and
  ``max_tokens`` attributes (as ``jaxpeft.models``' ``SequenceTooLongError``), which prompt tuning restates counting
  its virtual tokens.

Prompt tuning cannot be merged into the weights: ``merge``/``merge_and_unload`` raise ``AdapterError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import warnings
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._tracing import Layer, Trace
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

LEAF_KEY = "prompt_embeddings"
INIT_OPTIONS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
IGNORE_INDEX = -100
# Names of the word embedding in transformers-style models; otherwise the largest nn.Embed is taken.
WORD_EMBEDDING_NAMES = ("word_embeddings", "wte", "embed_tokens", "tok_embeddings", "embed_in", "shared",
                        "token_embedding", "token_embeddings")
# Tasks whose HF PEFT forward drops token_type_ids (the others put zeros in front of them).
TASKS_DROPPING_TOKEN_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")


def extend_labels(labels: Any, num_virtual_tokens: int, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """``labels`` (batch, seq) with ``num_virtual_tokens`` columns of ``ignore_index`` (-100) in front: the labels
    that match the logits of a prompt-tuned ``CAUSAL_LM`` or ``TOKEN_CLS`` model, as HF PEFT extends them.

    Example:
        >>> extend_labels([[5, 6, 7]], 2).tolist()
        [[-100, -100, 5, 6, 7]]
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (batch, seq), got shape {labels.shape}")
    prefix = jnp.full((labels.shape[0], num_virtual_tokens), ignore_index, labels.dtype)
    return jnp.concatenate([prefix, labels], axis=1)


def _accepts_prompt_length(cls):
    """Class decorator: ``prompt_length=`` (a tutorial spelling) is taken as ``num_virtual_tokens``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, prompt_length: int | None = None, **kwargs):
        if prompt_length is not None:
            given = kwargs.get("num_virtual_tokens")
            if given is not None and given != prompt_length:
                raise ConfigError(f"prompt_length={prompt_length} and num_virtual_tokens={given} disagree; "
                                  "pass only one of them")
            kwargs["num_virtual_tokens"] = prompt_length
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accepts_prompt_length
@strict_options
@dataclasses.dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning options, with HF PEFT's names and defaults.

    Attributes:
        num_virtual_tokens: how many learned embeddings go in front of the input (``prompt_length`` is accepted as
            another name for it).
        token_dim: the size of the model's word embeddings; filled from the model's config by ``get_peft_model``,
            or taken from its word embedding (``nn.Embed``) by ``init_adapters``.
        num_transformer_submodules: 1 (2 would be encoder-decoder models, which jaxpeft does not have).
        num_attention_heads, num_layers: the model's, filled by ``get_peft_model`` as HF PEFT does; unused.
        modules_to_save: modules trained in full (e.g. a new classification head), as adapter-owned copies.
        prompt_tuning_init: ``"RANDOM"`` (standard normal), ``"SAMPLE_VOCAB"`` (rows of the word embedding for
            random token ids) or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text``'s tokens, repeated or cut
            to ``num_virtual_tokens``).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: the tokenizer for ``"TEXT"`` (a folder, or a hub id that is cached or reachable).
        tokenizer_kwargs: keywords for ``transformers.AutoTokenizer.from_pretrained`` (``"TEXT"`` only).

    Example:
        >>> import transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=50, bos_token_id=0, eos_token_id=0))
        >>> model = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
        >>> model.print_trainable_parameters()
        trainable params: 64 || all params: 20,560 || trainable%: 0.3113
        >>> model(input_ids=[[1, 2, 3]]).logits.shape  # the 4 virtual positions come first
        (1, 7, 50)
        >>> model.generate([[1, 2, 3]], max_new_tokens=2, eos_token_id=None).shape  # prompt + new tokens only
        (1, 5)
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        check(is_positive_int(self.num_virtual_tokens),
              f"PromptTuningConfig needs num_virtual_tokens (or prompt_length) as a positive int, got "
              f"{self.num_virtual_tokens!r}; e.g. num_virtual_tokens=20")
        self.num_virtual_tokens = int(self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            check(value is None or is_positive_int(value),
                  f"{name} must be a positive int or None, got {value!r}")
        check(self.num_transformer_submodules in (None, 1, 2),
              f"num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}")
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        check(init in INIT_OPTIONS, f"prompt_tuning_init={self.prompt_tuning_init!r} is unknown; use one of "
                                    f"{', '.join(INIT_OPTIONS)}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            check(bool(self.tokenizer_name_or_path), "prompt_tuning_init='TEXT' needs tokenizer_name_or_path "
                                                     "(a tokenizer folder or hub id)")
            check(bool(self.prompt_tuning_init_text), "prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        check(not self.tokenizer_kwargs or init == "TEXT",
              "tokenizer_kwargs are used only with prompt_tuning_init='TEXT'; remove them")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            check(all(isinstance(m, str) for m in self.modules_to_save), "modules_to_save must hold module names")

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of ``prompt_embeddings``: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


# ----- filling the config from the model (get_peft_model) -----

def prepare(config: PromptTuningConfig, model) -> PromptTuningConfig:
    """``config`` with what HF PEFT fills from the model's transformers config: ``token_dim``, ``num_layers``,
    ``num_attention_heads`` and ``num_transformer_submodules`` (options already set are kept)."""
    if not hasattr(model.module, "embed_input_ids"):
        raise AdapterError(f"prompt tuning needs a model with an embed_input_ids method and an inputs_embeds input; "
                           f"{type(model.module).__name__} has none")
    # HF PEFT's lookups, through the config's attribute names (DistilBERT's `dim` answers to hidden_size).
    found = {**model_dimensions(model.config),
             "num_transformer_submodules": 2 if config.task_type == "SEQ_2_SEQ_LM" else 1}
    changes = {name: value for name, value in found.items() if getattr(config, name) is None and value is not None}
    return dataclasses.replace(config, **changes) if changes else config


# ----- create -----

def word_embedding(trace: Trace) -> Layer | None:
    """The model's word embedding among the ``nn.Embed`` layers the trace saw (None if it saw none)."""
    embeds = [layer for layer in trace.layers.values() if layer.kind == "embed"]
    named = [layer for layer in embeds if layer.path[-1] in WORD_EMBEDDING_NAMES]
    if named:
        return named[0]
    return max(embeds, key=lambda layer: layer.kernel_shape[0], default=None)


def _token_dim(config: PromptTuningConfig, trace: Trace) -> int:
    word = word_embedding(trace)
    if word is not None and config.token_dim is not None and word.kernel_shape[-1] != config.token_dim:
        raise AdapterError(f"token_dim={config.token_dim} differs from the size of the model's word embedding "
                           f"{word.name} ({word.kernel_shape[-1]}); leave token_dim unset")
    if config.token_dim is not None:
        return config.token_dim
    if word is None:
        raise AdapterError("the model has no nn.Embed word embedding to take the size of the prompt from; set "
                           "PromptTuningConfig(token_dim=...)")
    return word.kernel_shape[-1]


def create(key: jax.Array, config: PromptTuningConfig, trace: Trace, dtype: Any) -> dict:
    """The prompt table, standard normal (``TEXT``/``SAMPLE_VOCAB`` replace it in ``finish``)."""
    if config.total_virtual_tokens != config.num_virtual_tokens or config.task_type == "SEQ_2_SEQ_LM":
        raise AdapterError("prompt tuning of encoder-decoder models (SEQ_2_SEQ_LM, num_transformer_submodules=2) is "
                           "not supported; use a decoder or encoder model")
    shape = (config.total_virtual_tokens, _token_dim(config, trace))
    return {((), LEAF_KEY): jax.random.normal(key, shape, jnp.dtype(dtype))}


def _load_tokenizer(config: PromptTuningConfig):
    import transformers

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved config must not run code, as in HF PEFT
    try:
        return transformers.AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load tokenizer_name_or_path={config.tokenizer_name_or_path!r} for "
                          f"prompt_tuning_init='TEXT' ({reason}); pass a tokenizer folder (tokenizer.save_pretrained) "
                          "or a hub id that is cached, or use prompt_tuning_init='RANDOM'") from error


def init_token_ids(config: PromptTuningConfig) -> list[int]:
    """The token ids whose embeddings start a ``TEXT`` prompt: the text's ids repeated or cut to the prompt length."""
    token_ids = list(_load_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
    if not token_ids:
        raise ConfigError("prompt_tuning_init_text gives no tokens; pass a longer text")
    total = config.total_virtual_tokens
    return (token_ids * math.ceil(total / len(token_ids)))[:total]


def finish(key: jax.Array, config: PromptTuningConfig, trace: Trace, new_leaves: dict, flat_params: dict):
    """``TEXT`` and ``SAMPLE_VOCAB``: the prompt starts as rows of the word embedding (skipped in inference mode,
    where the weights are loaded afterwards, as in HF PEFT)."""
    if config.prompt_tuning_init == "RANDOM" or config.inference_mode:
        return new_leaves, flat_params
    word = word_embedding(trace)
    if word is None or word.stack_shape:
        raise AdapterError(f"prompt_tuning_init={config.prompt_tuning_init!r} needs the model's word embedding as an "
                           "nn.Embed outside any scanned stack; use prompt_tuning_init='RANDOM'")
    table = jnp.asarray(nn.meta.unbox(flat_params[word.path + ("embedding",)]))
    if config.prompt_tuning_init == "TEXT":
        token_ids = jnp.asarray(init_token_ids(config))
    else:
        token_ids = jax.random.randint(key, (config.total_virtual_tokens,), 0, table.shape[0])
    dtype = new_leaves[((), LEAF_KEY)].dtype
    return {**new_leaves, ((), LEAF_KEY): table[token_ids].astype(dtype)}, flat_params


# ----- forward -----

def _named_inputs(apply_fn, args: tuple, kwargs: dict) -> dict:
    """The call's inputs by name (positional ones named after the module's ``__call__`` parameters)."""
    if not args:
        return dict(kwargs)
    module = getattr(apply_fn, "__self__", None)
    if isinstance(module, nn.Module):
        names = list(inspect.signature(type(module).__call__).parameters)[1:]
    else:
        names = ["input_ids"]
    if len(args) > len(names):
        raise AdapterError("prompt tuning needs the inputs after input_ids as keywords (attention_mask=..., ...)")
    named = dict(zip(names, args, strict=False))
    both = sorted(set(named) & set(kwargs))
    if both:
        raise TypeError(f"got multiple values for {both}")
    return {**named, **kwargs}


def _prompts(variables: Any, adapter_name: str, batch_size: int, dtype) -> jax.Array:
    table = nn.meta.unbox(variables["params"][LEAF_KEY][adapter_name])
    return jnp.broadcast_to(table.astype(dtype)[None], (batch_size, *table.shape))


def _with_ones_in_front(mask: jax.Array, count: int) -> jax.Array:
    mask = jnp.asarray(mask)
    return jnp.concatenate([jnp.ones((mask.shape[0], count), mask.dtype), mask], axis=1)


def _cache_slots(cache: Any) -> int:
    return int(jax.tree_util.tree_leaves(cache.layers)[0].shape[-3])


def _with_slots_in_front(cache: Any, count: int) -> Any:
    def grow(array):
        return jnp.pad(array, [(0, 0)] * (array.ndim - 3) + [(count, 0), (0, 0), (0, 0)])

    return cache.replace(layers=jax.tree_util.tree_map(grow, cache.layers))


def _generation_call(config, apply_fn, variables, adapter_name, inputs: dict):
    """A call with a key/value cache: the first one adds the virtual tokens' slots and runs them with the prompt."""
    num_virtual = config.num_virtual_tokens
    cache, mask, input_ids = inputs["cache"], inputs.get("attention_mask"), inputs.pop("input_ids", None)
    if mask is None or input_ids is None:
        raise AdapterError("prompt tuning with a cache needs input_ids and an attention_mask spanning the cache "
                           "slots (as jaxpeft.models.generation.generate passes them)")
    slots, mask_slots = _cache_slots(cache), jnp.shape(mask)[1]
    inputs.update(attention_mask=_with_ones_in_front(mask, num_virtual), position_ids=None)
    if slots == mask_slots:
        embeds = apply_fn(variables, input_ids, method="embed_input_ids")
        prompts = _prompts(variables, adapter_name, embeds.shape[0], embeds.dtype)
        inputs.update(cache=_with_slots_in_front(cache, num_virtual), input_ids=None,
                      inputs_embeds=jnp.concatenate([prompts, embeds], axis=1))
    elif slots == mask_slots + num_virtual:
        inputs["input_ids"] = input_ids
    else:
        raise AdapterError(f"the cache has {slots} slots and the attention_mask {mask_slots}: with prompt tuning the "
                           f"mask spans the caller's slots and the cache has either as many or {num_virtual} more")
    return apply_fn(variables, **inputs)


@contextlib.contextmanager
def _virtual_tokens_counted(num_virtual: int):
    """Restates a model's refusal of a too-long input (a ``ValueError`` with ``num_tokens`` and ``max_tokens``, as
    ``jaxpeft.models``' ``SequenceTooLongError``) in terms of the virtual tokens put in front of it."""
    try:
        yield
    except ValueError as error:
        max_tokens = getattr(error, "max_tokens", None)
        if max_tokens is None:
            raise
        raise AdapterError(f"prompt tuning puts {num_virtual} virtual tokens in front of the input: "
                           f"{error.num_tokens} positions, but the model takes at most {max_tokens}; "
                           f"{virtual_token_advice(max_tokens, num_virtual)}") from None


def call(config: PromptTuningConfig, adapter_name: str, apply_fn, variables: Any, args: tuple, kwargs: dict,
         dropout: bool):
    """Runs ``apply_fn`` with the prompt in front of the input embeddings (see the module docstring)."""
    del dropout  # prompt tuning has no dropout of its own; the model's runs as asked
    if kwargs.get("method") not in (None, "__call__"):
        return apply_fn(variables, *args, **kwargs)
    if config.total_virtual_tokens != config.num_virtual_tokens:
        raise AdapterError("prompt tuning of encoder-decoder models (num_transformer_submodules=2) is not supported")
    inputs = _named_inputs(apply_fn, args, kwargs)
    num_virtual = config.num_virtual_tokens
    if inputs.get("cache") is not None:
        with _virtual_tokens_counted(num_virtual):
            return _generation_call(config, apply_fn, variables, adapter_name, inputs)
    input_ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
    if (input_ids is None) == (embeds is None):
        raise AdapterError("prompt tuning needs exactly one of input_ids and inputs_embeds")
    if embeds is None:
        embeds = apply_fn(variables, input_ids, method="embed_input_ids")
    batch_size = embeds.shape[0]
    if inputs.get("attention_mask") is not None:
        inputs["attention_mask"] = _with_ones_in_front(inputs["attention_mask"], num_virtual)
    if inputs.get("position_ids") is not None:
        warnings.warn("position_ids are ignored with prompt tuning (as in HF PEFT): positions count from the first "
                      "virtual token", stacklevel=2)
        inputs["position_ids"] = None
    if inputs.get("token_type_ids") is not None:
        if config.task_type in TASKS_DROPPING_TOKEN_TYPES:
            warnings.warn(f"token_type_ids are ignored with prompt tuning for {config.task_type} (as in HF PEFT)",
                          stacklevel=2)
            inputs["token_type_ids"] = None
        else:
            types = jnp.asarray(inputs["token_type_ids"])
            inputs["token_type_ids"] = jnp.concatenate(
                [jnp.zeros((batch_size, num_virtual), types.dtype), types], axis=1)
    prompts = _prompts(variables, adapter_name, batch_size, embeds.dtype)
    with _virtual_tokens_counted(num_virtual):
        return apply_fn(variables, input_ids=None, inputs_embeds=jnp.concatenate([prompts, embeds], axis=1), **inputs)


# ----- the HF PEFT file format -----

def hf_tensors(config: PromptTuningConfig, variables: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``{"prompt_embeddings": (total_virtual_tokens, token_dim)}``, HF PEFT's tensor."""
    del config
    table = variables["params"].get(LEAF_KEY, {}).get(adapter_name)
    if table is None:
        raise AdapterError(f"the variables hold no prompt tuning adapter {adapter_name!r}")
    return {LEAF_KEY: np.asarray(jax.device_get(nn.meta.unbox(table)), np.float32)}


def leaves_from_hf(config: PromptTuningConfig, tensors: dict, variables: Any, adapter_name: str) -> Any:
    """``variables`` with the adapter's ``prompt_embeddings`` taken from HF PEFT's tensors."""
    if LEAF_KEY not in tensors:
        raise AdapterError(f"the adapter's tensors lack {LEAF_KEY!r} (they hold {sorted(tensors)[:4]}); it is not a "
                           "prompt tuning adapter")
    value = np.asarray(tensors[LEAF_KEY])
    existing = variables["params"].get(LEAF_KEY, {}).get(adapter_name)
    expected = (config.total_virtual_tokens, config.token_dim if existing is None else existing.shape[1])
    if value.ndim != 2 or value.shape[0] != expected[0] or (expected[1] is not None and value.shape[1] != expected[1]):
        raise AdapterError(f"{LEAF_KEY} has shape {value.shape}; this config and model need {expected} "
                           "(num_virtual_tokens * num_transformer_submodules, token_dim)")
    flat = flatten(variables["params"])
    flat[(LEAF_KEY, adapter_name)] = jnp.asarray(value, jnp.float32)
    params = unflatten_like(flat, variables["params"])
    return {**variables, "params": params} if isinstance(variables, dict) else variables.copy({"params": params})


METHOD = register(Method(
    config_class=PromptTuningConfig, leaf_keys=(LEAF_KEY,), create=create, finish=finish, prepare=prepare,
    call=call, hf_tensors=hf_tensors, leaves_from_hf=leaves_from_hf, cli_name="prompt"))
