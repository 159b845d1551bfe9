"""The causal-LM loss without the ``(batch, seq, vocab)`` logits: computed over sequence chunks straight from the
last hidden states and the output head, each chunk's logits recomputed in the backward pass rather than kept.

At the llama-1b shape (8 x 2048 tokens, vocabulary 128,256) the float32 logits alone take 8.4 GB and their gradient
as much again; in chunks of 1024 tokens (128 positions of each of the 8 rows) the loss holds 0.5 GB of logits at a
time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpeft.data import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024


def _chunk_sums(logits_of: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                weight: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(loss_sum, count, correct)`` of one chunk: ``hidden (batch, positions, features)`` predicting ``labels
    (batch, positions)``, each example weighing ``weight (batch, 1)``."""
    logits = logits_of(hidden).astype(jnp.float32)
    keep = labels != ignore_index
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
    correct = keep & (jnp.argmax(logits, -1) == labels)
    weight = keep.astype(jnp.float32) * weight
    counted = weight > 0  # weight-0 terms are left out: a NaN or inf there cannot spread
    return (jnp.sum(jnp.where(counted, losses * weight, 0.0)), jnp.sum(weight),
            jnp.sum(jnp.where(counted & correct, weight, 0.0)))


def _in_chunks(x: jax.Array, positions: int, fill: Any) -> jax.Array:
    """``(batch, seq, ...)`` as ``(chunks, batch, positions, ...)``, the last chunk filled with ``fill``. The batch
    axis stays whole, so a batch sharded over devices stays sharded in every chunk."""
    x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % positions)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape((x.shape[0], -1, positions) + x.shape[2:]), 1, 0)


def chunked_causal_lm_sums(hidden: jax.Array, labels: Any, logits_of: Callable[[jax.Array], jax.Array], *,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, weights: Any = None,
                           ignore_index: int = IGNORE_INDEX) -> dict[str, jax.Array]:
    """``jaxpeft.training.loss_sums(logits_of(hidden), labels, "causal_lm", weights)``, without the full logits.

    ``hidden``: the final hidden states ``(batch, seq, features)``; ``logits_of``: hidden states ``(batch,
    positions, features)`` to their vocabulary logits (the model's output head, e.g. ``lambda h:
    model.apply(variables, h, method="lm_logits")``); ``labels``: ``(batch, seq)`` token ids, ``ignore_index`` where
    nothing is predicted. About ``chunk_size`` tokens at a time (``chunk_size // batch`` positions of every example)
    go through ``logits_of`` inside a ``jax.lax.map`` whose body is rematerialised (``jax.checkpoint``), so neither
    the forward nor the backward pass holds more than one chunk's logits. Returns ``{"loss_sum", "count",
    "correct"}`` as ``loss_sums`` does.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxpeft.training import loss_sums
        >>> hidden = jax.random.normal(jax.random.key(0), (2, 7, 4))
        >>> head = jax.random.normal(jax.random.key(1), (4, 11))
        >>> labels = jnp.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, -100, -100, -100, -100]])
        >>> chunked = chunked_causal_lm_sums(hidden, labels, lambda h: h @ head, chunk_size=4)
        >>> plain = loss_sums(hidden @ head, labels, "causal_lm")
        >>> bool(jnp.allclose(chunked["loss_sum"], plain["loss_sum"], rtol=1e-6)), float(chunked["count"])
        (True, 8.0)
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    labels = jnp.asarray(labels)
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden states (batch, seq, features) and labels (batch, seq) must match, got "
                         f"{hidden.shape} and {labels.shape}")
    weight = jnp.ones(labels.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if weight.shape != labels.shape[:1]:
        raise ValueError(f"weights must have one value per example, shape {labels.shape[:1]}, got {weight.shape}")
    hidden, labels = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    positions = min(max(chunk_size // max(labels.shape[0], 1), 1), max(labels.shape[1], 1))
    per_chunk = jax.checkpoint(lambda h, y: _chunk_sums(logits_of, h, y, weight[:, None], ignore_index))
    sums = jax.lax.map(lambda xs: per_chunk(*xs), (_in_chunks(hidden, positions, 0),
                                                   _in_chunks(labels, positions, ignore_index)))
    loss_sum, count, correct = (jnp.sum(s) for s in sums)
    return {"loss_sum": loss_sum, "count": count, "correct": correct}
