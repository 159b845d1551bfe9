"""The contract between a model family file and the loading code.

Each family file (``gpt2.py``, ``bert.py``, ``llama.py``, ...) ends with a ``FAMILY = ModelFamily(...)`` that
says which ``transformers`` model types it serves, which linen module implements each head, and how its
parameter tree maps to and from the Hugging Face tensor names. The Auto classes in ``auto.py`` only ever talk to
families through this object.

A head module's ``__call__`` takes ``input_ids`` first and any of ``attention_mask``, ``token_type_ids``,
``position_ids``, ``deterministic`` (and, for decoders, ``cache`` and ``prefix_key_values``) as keywords; the model
object passes only the keywords the signature names. It returns a ``ModelOutput`` (a dict with the same keys, or a
bare array taken as ``logits`` for a head and ``last_hidden_state`` for ``"base"``, are accepted too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import numpy as np

HEADS = ("base", "causal_lm", "seq_cls", "token_cls")

ParamsFromHF = Callable[[Mapping[str, np.ndarray], Any, str, bool], tuple[dict, list[str]]]
ParamsToHF = Callable[[Mapping[str, Any], Any, str, bool], dict[str, np.ndarray]]


@flax.struct.dataclass
class ModelOutput:
    """What a head module returns; ``None`` for what a head does not produce.

    Attributes:
        logits: ``(batch, seq, vocab)`` for causal LM and token classification, ``(batch, num_labels)`` for
            sequence classification.
        last_hidden_state: ``(batch, seq, hidden)`` after the final norm.
        cache: the updated key/value cache when the call was given one (decoders).
        router_logits: ``(sparse_layers, batch, seq, experts)``, the routers' logits of a mixture-of-experts
            decoder (``jaxpeft.models.moe.load_balancing_loss`` takes them).
    """

    logits: Any = None
    last_hidden_state: Any = None
    cache: Any = None
    router_logits: Any = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the loader needs to know about one model family.

    Attributes:
        model_types: the ``config.model_type`` values served (``("llama", "mistral", "qwen2", "qwen3")``).
        modules: head name (one of ``HEADS``) -> linen module class. Every class is built as
            ``cls(config=config, dtype=..., param_dtype=..., scan_layers=..., remat_policy=...,
            attention_implementation=...)``.
        params_from_hf: ``(tensors, config, head, scan_layers) -> (params, unused_tensor_names)`` where ``tensors``
            maps Hugging Face tensor names (with or without the head's prefix such as ``bert.``) to numpy arrays
            and ``params`` is the unboxed ``{"params": ...}`` pytree of numpy arrays built from the tensors found.
            It may be partial: the loader compares it with the module's own (abstract) init, initialises and
            reports a missing new head (a top-level entry absent altogether, or one listed in
            ``optional_params``), and raises listing any other missing, unexpected or mis-shaped tensor.
        params_to_hf: ``(variables, config, head, scan_layers) -> tensors`` with the names that the transformers
            torch class of that head loads without missing or unexpected keys.
        default_lora_targets: HF PEFT's default ``target_modules`` for the family.
        ignore_unexpected: regular expressions (``re.search``) for Hugging Face tensor names that may be left
            unused without an error, e.g. another head's weights (``r"^lm_head\\."`` when loading a causal LM
            checkpoint into a classifier) or non-persistent buffers of old checkpoints.
        optional_params: ``/``-joined parameter paths (prefixes) that are initialised and reported rather than an
            error when the checkpoint lacks them, e.g. ``"bert/pooler"``.
        conv1d_layers: names of Dense layers that the torch model holds as ``Conv1D`` (weight ``[in, out]``, the
            Dense kernel's layout), e.g. GPT-2's ``c_attn``; adapter files use that layout for them.
        position_table: the config attribute holding the number of rows of a learned position table
            (``"n_positions"``); None for rotary positions. Prefix tuning checks the positions it shifts against it.
    """

    model_types: tuple[str, ...]
    modules: Mapping[str, type]
    params_from_hf: ParamsFromHF
    params_to_hf: ParamsToHF
    default_lora_targets: tuple[str, ...]
    ignore_unexpected: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    conv1d_layers: tuple[str, ...] = ()
    position_table: str | None = None
