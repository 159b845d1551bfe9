"""Batched text generation with a preallocated key/value cache and a jitted decode loop.

``generate`` takes the apply function and variables explicitly, so the same loop runs a PEFT-rewritten apply
(``apply_fn(variables, input_ids, attention_mask=..., position_ids=..., cache=..., **model_kwargs)`` returning an
object with ``.logits`` and ``.cache``). ``PretrainedModel.generate`` calls it with the model's own.

Example:
    >>> import transformers
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
    ...     vocab_size=50))
    >>> out = generate(model.apply_fn, model.params, model.module.cache_spec(), [[0, 4, 5], [3, 4, 5]],
    ...     attention_mask=[[0, 1, 1], [1, 1, 1]], max_new_tokens=4, pad_token_id=0)
    >>> out.shape
    (2, 7)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models.attention import CacheSpec, init_cache

# Compiled loops by id of the apply function; the function is kept in the value so that its id stays unique.
_COMPILED: dict[int, tuple[Callable, Callable]] = {}


def token_defaults(config: Any) -> dict:
    """``eos_token_id`` / ``pad_token_id`` of a transformers config (for ``generate``'s defaults)."""
    return {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}


def _as_id_tuple(token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if token_ids is None:
        return ()
    if isinstance(token_ids, (int, np.integer)):
        return (int(token_ids),)
    return tuple(int(t) for t in token_ids)


def check_position_budget(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """Refuses a generation whose prompt and new tokens need more positions than the model has.

    Example:
        >>> check_position_budget(30, 10, 32)
        Traceback (most recent call last):
        ...
        ValueError: the longest prompt (30 tokens) + max_new_tokens=10 needs 40 positions, but the model has 32 \
(max_position_embeddings); lower max_new_tokens to 2 or shorten the prompt.
    """
    if prompt_tokens + max_new_tokens <= max_positions:
        return
    fix = (f"lower max_new_tokens to {max_positions - prompt_tokens} or shorten the prompt"
           if prompt_tokens < max_positions else f"shorten the prompt to fewer than {max_positions} tokens")
    raise ValueError(f"the longest prompt ({prompt_tokens} tokens) + max_new_tokens={max_new_tokens} needs "
                     f"{prompt_tokens + max_new_tokens} positions, but the model has {max_positions} "
                     f"(max_position_embeddings); {fix}.")


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering, in transformers' order; removed logits -> -inf.

    ``top_k``/``top_p`` of ``None`` skip that filter (``top_p`` may be a traced value).
    """
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth_largest = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one token).
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_count = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_logits, keep_count - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _decode_loop(
    apply_fn,
    variables,
    input_ids,
    attention_mask,
    rng,
    temperature,
    top_p,
    model_kwargs,
    *,
    cache_spec: CacheSpec,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int | None,
    use_top_p: bool,
    eos_ids: tuple[int, ...],
    pad_token_id: int,
):
    batch_size, prompt_len = input_ids.shape
    total_len = prompt_len + max_new_tokens
    key_mask = jnp.concatenate([attention_mask, jnp.ones((batch_size, max_new_tokens), jnp.int32)], axis=1)
    # As transformers: positions count real tokens only, so left padding does not shift them.
    positions = jnp.where(attention_mask == 0, 0, jnp.cumsum(attention_mask, axis=1) - 1)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def choose(logits, step):
        logits = logits.astype(jnp.float32)
        if not do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, temperature, top_k, top_p if use_top_p else None)
        return jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1).astype(jnp.int32)

    def emit(state, logits):
        step, sequences, finished = state["step"], state["sequences"], state["finished"]
        token = jnp.where(finished, pad_token_id, choose(logits, step))
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, prompt_len + step))
        finished = finished | (jnp.isin(token, eos) if eos_ids else False)
        return dict(state, step=step + 1, sequences=sequences, finished=finished, token=token)

    cache = init_cache(cache_spec, batch_size, total_len)
    out = apply_fn(variables, input_ids, attention_mask=key_mask, position_ids=positions, cache=cache, **model_kwargs)
    sequences = jnp.full((batch_size, total_len), pad_token_id, jnp.int32).at[:, :prompt_len].set(input_ids)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        sequences=sequences,
        finished=jnp.zeros((batch_size,), bool),
        token=jnp.zeros((batch_size,), jnp.int32),
        position=positions[:, -1],
        cache=out.cache,
    )
    state = emit(state, out.logits[:, -1])

    def keep_going(state):
        return (state["step"] < max_new_tokens) & ~jnp.all(state["finished"])

    def decode_one(state):
        position = state["position"] + 1
        out = apply_fn(
            variables,
            state["token"][:, None],
            attention_mask=key_mask,
            position_ids=position[:, None],
            cache=state["cache"],
            **model_kwargs,
        )
        return emit(dict(state, position=position, cache=out.cache), out.logits[:, -1])

    state = jax.lax.while_loop(keep_going, decode_one, state)
    return state["sequences"], state["step"]


def _compiled_loop(apply_fn: Callable) -> Callable:
    entry = _COMPILED.get(id(apply_fn))
    if entry is None or entry[0] is not apply_fn:
        jitted = jax.jit(
            functools.partial(_decode_loop, apply_fn),
            static_argnames=(
                "cache_spec",
                "max_new_tokens",
                "do_sample",
                "top_k",
                "use_top_p",
                "eos_ids",
                "pad_token_id",
            ),
        )
        entry = _COMPILED[id(apply_fn)] = (apply_fn, jitted)
    return entry[1]


def generate(
    apply_fn: Callable,
    variables: Any,
    cache_spec: CacheSpec,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    model_kwargs: dict | None = None,
    max_positions: int | None = None,
) -> np.ndarray:
    """Greedy or sampled continuation of a left-padded batch; returns prompt + new tokens ``(batch, len)``.

    Args:
        apply_fn: ``module.apply`` or a rewritten apply with the same signature.
        variables: the variables ``apply_fn`` takes (``{"params": ...}``).
        cache_spec: ``module.cache_spec()``.
        input_ids: ``(batch, prompt_len)``, left-padded.
        attention_mask: ``(batch, prompt_len)``, 0 on the left padding; all ones when omitted.
        max_new_tokens: tokens to add; or ``max_length`` for prompt + new (20 if neither, as transformers).
        do_sample: sample instead of taking the argmax; ``temperature``, ``top_k``, ``top_p`` shape the
            distribution and ``seed`` fixes the draw.
        eos_token_id: id or ids that finish a row; finished rows are filled with ``pad_token_id`` (default: the
            first EOS id, else 0) and the loop stops once every row has finished.
        model_kwargs: extra keywords for every ``apply_fn`` call (e.g. ``prefix_key_values``).
        max_positions: the model's ``max_position_embeddings``; the longest prompt (its real tokens) plus
            ``max_new_tokens`` must fit in it (``PretrainedModel.generate`` passes it).

    Returns:
        numpy int32 array: the prompt followed by the generated tokens (as many columns as decode steps ran).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, prompt_len), got shape {input_ids.shape}.")
    prompt_len = input_ids.shape[1]
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}.")
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError(
            "generate needs left padding (the last column of attention_mask all 1); "
            "set tokenizer.padding_side = 'left'."
        )
    if max_new_tokens is None:
        max_new_tokens = (20 if max_length is None else max_length) - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"Nothing to generate: max_new_tokens={max_new_tokens} (prompt has {prompt_len} tokens).")
    if max_positions is not None:
        check_position_budget(int(attention_mask.sum(axis=1).max()), int(max_new_tokens), max_positions)
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; use do_sample=False for greedy.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    eos_ids = _as_id_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    sequences, steps = _compiled_loop(apply_fn)(
        variables,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        model_kwargs or {},
        cache_spec=cache_spec,
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        top_k=None if top_k is None else int(top_k),
        use_top_p=top_p is not None and top_p < 1.0,
        eos_ids=eos_ids,
        pad_token_id=int(pad_token_id),
    )
    return np.asarray(sequences)[:, : prompt_len + int(steps)]
