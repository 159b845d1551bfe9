"""Trainable tokens: train the embedding rows of a few tokens and leave the rest of the table frozen, as HF PEFT's
``TRAINABLE_TOKENS`` does (new tokens, or re-trained existing ones, at the cost of their rows only).

Leaves kept in a selected ``nn.Embed``'s parameters, for adapter ``name``:

- ``trainable_tokens_delta/<name>``: float32 ``[len(token_indices), features]``, the rows the table holds for
  ``token_indices`` (in that order) while the adapter runs: a copy of the original rows at creation
  (``init_weights=True``) or standard normal values. HF PEFT's tensor of the same name and shape (despite the name
  it holds the rows themselves, not a difference).

The adapted Embed's ``__call__`` and ``attend`` both use the table with those rows replaced, so a tied output head
(``Embed.attend``, as jaxpeft's GPT-2 and tied Llama use) sees the same rows, as in HF PEFT, which puts a tied copy
of the layer on ``lm_head``; its files then hold ``lm_head.trainable_tokens_delta`` too, the same tensor. Merge writes
the rows into the table; unmerge puts the original table back. The indices come from the config.

Functions reusable by another method (LoRA's ``trainable_token_indices``): ``replaced_table``, ``token_rows``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import _targets
from jaxpeft._tracing import Layer, Trace, layer_kind
from jaxpeft.config import PeftConfig, check, strict_options
from jaxpeft.core import AdapterError
from jaxpeft.method import Method, register
from jaxpeft.methods._reweight import run_with
from jaxpeft.tree import flatten

Path = tuple[str, ...]
LEAF_KEY = "trainable_tokens_delta"
KEY_PREFIX = "base_model.model."
DEFAULT_TARGET = "embed_tokens"  # HF PEFT's fallback when the model names no input embedding
TIED_HEAD = "lm_head"  # the module torch's tied output head is, in the transformers models jaxpeft serves


@strict_options
@dataclasses.dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens options, with HF PEFT's names and defaults.

    Attributes:
        token_indices: the token ids (rows of the embedding table) to train, without repeats.
        target_modules: the embedding layer(s) to adapt: module names or dotted path suffixes (list) or a
            full-match regex on the dotted path (string). None: the model's input embedding (``get_peft_model``),
            else a module named ``embed_tokens``.
        init_weights: True (the rows start as the original ones: the model starts unchanged) or False (standard
            normal rows: for tests).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.methods.trainable_tokens import TrainableTokensConfig
        >>> model = nn.Sequential([nn.Embed(10, 4), nn.Dense(2)])  # layers named layers_0, layers_1
        >>> ids = jnp.array([[1, 2, 3]])
        >>> config = TrainableTokensConfig(token_indices=[2, 7], target_modules=["layers_0"])
        >>> base = model.init(jax.random.key(1), ids)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, ids)
        >>> variables["params"]["layers_0"]["trainable_tokens_delta"]["default"].shape
        (2, 4)
        >>> adapted = jaxpeft.rewrite(model.apply, config)
        >>> bool(jnp.array_equal(adapted(variables, ids), model.apply(base, ids)))  # copies: unchanged at first
        True
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: Sequence[int] = dataclasses.field(default_factory=list)
    target_modules: str | Sequence[str] | None = None
    init_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.init_weights, bool),
              f"init_weights must be True or False, got init_weights={self.init_weights!r}")
        check(not isinstance(self.token_indices, (str, bytes)), "token_indices must be a list of token ids")
        indices = list(self.token_indices)
        check(all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in indices),
              f"token_indices must be non-negative token ids (integers), got {indices[:8]!r}")
        check(len(set(indices)) == len(indices), "token_indices repeats a token id; give each token once")
        self.token_indices = [int(i) for i in indices]
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            check(all(isinstance(v, str) for v in self.target_modules), "target_modules must hold module names")


def task_defaults(config: TrainableTokensConfig, model) -> dict[str, Any]:
    """The model's input embedding (its table of ``vocab_size`` rows) when the config names no target."""
    if config.target_modules is not None:
        return {}
    vocab = getattr(model.config, "vocab_size", None)
    for path, leaf in flatten(model.params["params"]).items():
        if path[-1] == "embedding" and np.shape(nn.meta.unbox(leaf))[:1] == (vocab,):
            return {"target_modules": ".".join(path[:-1])}
    return {}


# ----- the rows -----

def token_rows(table: jax.Array, token_indices: Sequence[int]) -> jax.Array:
    """The rows of ``table`` for ``token_indices``, in that order."""
    return jnp.take(table, jnp.asarray(token_indices, jnp.int32), axis=0)


def replaced_table(table: jax.Array, token_indices: Sequence[int], rows: jax.Array) -> jax.Array:
    """``table`` with its rows for ``token_indices`` replaced by ``rows`` (in ``table``'s dtype)."""
    return table.at[jnp.asarray(token_indices, jnp.int32)].set(rows.astype(table.dtype))


# ----- create -----

def _targets_of(config: TrainableTokensConfig) -> str | list[str]:
    return config.target_modules if config.target_modules is not None else [DEFAULT_TARGET]


def _embedding_layer(trace: Trace, path: Path, name: str) -> Layer:
    layer = trace.layers.get(path)
    if layer is None or layer.kind != "embed":
        kind = trace.module_types.get(path, "module")
        raise AdapterError(f"trainable tokens adapt embedding layers (nn.Embed); {name!r} is a {kind}: leave it out "
                           "of target_modules")
    if layer.stack_shape:
        raise AdapterError(f"trainable tokens cannot adapt {name!r}, an embedding inside a scanned stack")
    return layer


def create(key: jax.Array, config: TrainableTokensConfig, trace: Trace, dtype: Any) -> dict[tuple[Path, str], Any]:
    """The rows of each selected embedding: placeholders (``finish`` copies the originals) or standard normal."""
    targets = _targets_of(config)
    if not config.token_indices:
        raise AdapterError("trainable tokens need token_indices: the token ids whose embedding rows train")
    leaves = {}
    for i, (path, virtual) in enumerate(sorted(trace.module_virtual_paths.items())):
        names = [name for name in virtual.values() if path and _targets.matches(name, targets)]
        if not names:
            continue
        layer = _embedding_layer(trace, path, names[0])
        vocab, features = layer.kernel_shape
        if max(config.token_indices) >= vocab:
            raise AdapterError(f"token_indices go up to {max(config.token_indices)} but {names[0]!r} has {vocab} "
                               "rows; resize the embedding for new tokens first")
        shape = (len(config.token_indices), features)
        init = jax.random.normal(jax.random.fold_in(key, i), shape, dtype) if not config.init_weights else (
            jnp.zeros(shape, dtype))
        leaves[(path, LEAF_KEY)] = init
    if not leaves:
        raise AdapterError(f"target_modules {targets!r} matched no module; modules that exist: "
                           f"{trace.existing_paths()}")
    return leaves


def original_rows(flat_params: dict, path: tuple, token_indices, dtype) -> jax.Array:
    """The rows ``token_indices`` of the embedding table at ``path`` as the base model holds them, in ``dtype``."""
    table = jnp.asarray(nn.meta.unbox(flat_params[path + ("embedding",)]))
    return token_rows(table, token_indices).astype(dtype)


def finish(key: jax.Array, config: TrainableTokensConfig, trace: Trace, new_leaves: dict, flat_params: dict):
    """With ``init_weights``, each selected embedding's rows start as its original rows."""
    del key, trace
    if not config.init_weights:
        return new_leaves, flat_params
    filled = {
        (path, leaf_key): original_rows(flat_params, path, config.token_indices, value.dtype)
        for (path, leaf_key), value in new_leaves.items()
    }
    return filled, flat_params


# ----- forward -----

def _checked_rows(token_indices: Sequence[int], table: jax.Array, rows: jax.Array, where: str) -> jax.Array:
    if rows.shape != (len(token_indices), table.shape[-1]):
        raise AdapterError(f"{LEAF_KEY} {rows.shape} at {where} does not fit {len(token_indices)} token_indices "
                           f"and the embedding's {table.shape[-1]} features: the adapter was made for another model")
    return rows


def holds_rows(module: nn.Module, method_name: str, adapter_name: str) -> bool:
    """Whether a call of ``module.<method_name>`` runs with adapter ``adapter_name``'s rows in the table."""
    return (method_name in ("__call__", "attend") and module.scope is not None and layer_kind(module) == "embed"
            and adapter_name in module.variables.get("params", {}).get(LEAF_KEY, {}))


def call_with_rows(module: nn.Module, method_name: str, args: tuple, kwargs: dict, adapter_name: str,
                   token_indices: Sequence[int] | jax.Array) -> Any:
    """``module.<method_name>(*args, **kwargs)`` (an Embed's ``__call__`` or ``attend``) with the table's rows for
    ``token_indices`` replaced by the adapter's."""
    table = nn.meta.unbox(module.get_variable("params", "embedding"))
    rows = nn.meta.unbox(module.get_variable("params", LEAF_KEY)[adapter_name])
    rows = _checked_rows(token_indices, table, rows, ".".join(module.path))
    return run_with(module, method_name, args, kwargs, embedding=replaced_table(table, token_indices, rows))


def interceptor(config: TrainableTokensConfig, adapter_name: str, dropout: bool):
    """Runs each adapted Embed (``__call__`` and ``attend``) with the adapter's rows in its table."""
    del dropout

    def adapt(next_fun, args, kwargs, context):
        if not holds_rows(context.module, context.method_name, adapter_name):
            return next_fun(*args, **kwargs)
        return call_with_rows(context.module, context.method_name, args, kwargs, adapter_name, config.token_indices)

    return adapt


# ----- merge -----

def merged_table(layer_params: dict, rows: Any, token_indices: Sequence[int] | jax.Array) -> dict:
    """``{"embedding": the table with ``rows`` written in at ``token_indices``}``, boxed as the layer's."""
    boxed = layer_params["embedding"]
    table = nn.meta.unbox(boxed)
    rows = _checked_rows(token_indices, table, jnp.asarray(nn.meta.unbox(rows)), "the merged layer")
    merged = replaced_table(table, token_indices, rows)
    return {"embedding": boxed.replace_boxed(merged) if isinstance(boxed, nn.meta.AxisMetadata) else merged}


def merge_layer(config: TrainableTokensConfig, layer_params: dict, leaves: dict, sign: float) -> dict:
    """The table with the adapter's rows written in (``sign`` 1); unmerging goes through ``unmerge_layer``."""
    if sign < 0:
        raise AdapterError("trainable tokens cannot be taken out of a merged table without the original rows")
    return merged_table(layer_params, leaves[LEAF_KEY], config.token_indices)


def unmerge_layer(config: TrainableTokensConfig, layer_params: dict, leaves: dict, original_params: dict) -> dict:
    """The original table back."""
    del config, layer_params, leaves
    return {"embedding": original_params["embedding"]}


# ----- files: torch's tied lm_head copy -----

def _adapted_embeddings(variables: Any, adapter_name: str) -> dict[Path, Any]:
    return {path[:-2]: leaf for path, leaf in flatten(variables.get("params", {})).items()
            if path[-2:] == (LEAF_KEY, adapter_name)}


def _tied_rows(variables: Any, adapter_name: str) -> Any | None:
    """The rows torch also keeps under ``lm_head`` when the output head is the embedding (tied): a jaxpeft causal
    LM whose only top-level module holds the adapted embedding has no head of its own, it attends the table."""
    top = list(variables.get("params", {}))
    for path, rows in _adapted_embeddings(variables, adapter_name).items():
        if len(path) >= 2 and top == [path[0]]:
            return rows
    return None


def hf_tensors(config: TrainableTokensConfig, variables: Any, adapter_name: str) -> dict[str, np.ndarray]:
    """``lm_head.trainable_tokens_delta`` for a tied output head, as torch PEFT writes it (the embedding's rows)."""
    del config
    rows = _tied_rows(variables, adapter_name)
    if rows is None:
        return {}
    return {f"{KEY_PREFIX}{TIED_HEAD}.{LEAF_KEY}": np.asarray(jax.device_get(nn.meta.unbox(rows)), np.float32)}


def leaves_from_hf(config: TrainableTokensConfig, tensors: dict, variables: Any, adapter_name: str) -> Any:
    """Checks torch's tied-head copy against the embedding's rows (jaxpeft keeps them once)."""
    del config
    rows = _tied_rows(variables, adapter_name)
    for value in tensors.values():
        if rows is not None and not np.allclose(np.asarray(value), np.asarray(nn.meta.unbox(rows)), atol=1e-6):
            raise AdapterError(f"the file's {TIED_HEAD}.{LEAF_KEY} differs from the embedding's rows; this model ties "
                               "its output head to the embedding, so they must be equal")
    return variables


METHOD = register(Method(
    config_class=TrainableTokensConfig, leaf_keys=(LEAF_KEY,), create=create, finish=finish,
    interceptor=interceptor, merge_layer=merge_layer, unmerge_layer=unmerge_layer, task_defaults=task_defaults,
    hf_tensors=hf_tensors, leaves_from_hf=leaves_from_hf, leaf_layouts={LEAF_KEY: (None, "out")}))
