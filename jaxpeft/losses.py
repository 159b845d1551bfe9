"""The causal-LM loss without the ``(batch, seq, vocab)`` logits: computed over sequence chunks straight from the
last hidden states and the output head.

The loss is the model's last step, so its gradient is known as soon as a chunk's logits are: the forward pass takes
each chunk's gradient with respect to the hidden states (and to whatever of the head is trained) right away, from
one ``exp`` of its logits, and the backward pass only scales what was kept. A chunk's logits are thus computed once,
never recomputed, and never kept. At the llama-1b shape (8 x 2048 tokens, vocabulary 128,256) the float32 logits
alone take 8.4 GB and their gradient as much again; in chunks of 1024 tokens (128 positions of each of the 8 rows)
the loss holds 0.5 GB of logits and as much of their gradient at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxpeft.data import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024


def _sums_and_gradient(logits: jax.Array, labels: jax.Array, weight: jax.Array,
                       ignore_index: int) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``(loss_sum, count, correct)`` of one chunk, ``logits (batch, positions, vocab)`` predicting ``labels (batch,
    positions)`` with each example weighing ``weight (batch, 1)``, and the gradient of ``loss_sum`` with respect to
    the logits: ``weight * (softmax(logits) - one_hot(label))``, from the one ``exp`` that the loss takes."""
    logits32 = logits.astype(jnp.float32)
    keep = labels != ignore_index
    targets = jnp.where(keep, labels, 0)
    weight = keep.astype(jnp.float32) * weight
    counted = weight > 0  # weight-0 terms are left out: a NaN or inf there cannot spread
    shifted = logits32 - jnp.max(logits32, axis=-1, keepdims=True)
    exp = jnp.exp(shifted)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    losses = jnp.log(total[..., 0]) - jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    correct = counted & (jnp.argmax(logits32, -1) == labels)
    sums = (jnp.sum(jnp.where(counted, losses * weight, 0.0)), jnp.sum(weight),
            jnp.sum(jnp.where(correct, weight, 0.0)))
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    gradient = jnp.where(counted, weight, 0.0)[..., None] * (exp / total - one_hot)
    return sums, gradient.astype(logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _summed_chunks(head: Callable, ignore_index: int, hidden: jax.Array, labels: jax.Array, weight: jax.Array,
                   *consts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(loss_sum, count, correct)`` over ``hidden (chunks, batch, positions, features)`` and ``labels (chunks,
    batch, positions)``, the logits being ``head(hidden_chunk, *consts)``."""
    def one_chunk(chunk):
        return _sums_and_gradient(head(chunk[0], *consts), chunk[1], weight, ignore_index)[0]

    return tuple(jnp.sum(s) for s in jax.lax.map(one_chunk, (hidden, labels)))


def _summed_chunks_forward(head, ignore_index, hidden, labels, weight, *consts):
    """The sums, and as residuals the gradient of ``loss_sum`` with respect to ``hidden`` and to each trained
    constant of the head (``None`` for the rest: their gradient is never computed)."""
    if weight.perturbed:
        raise ValueError("chunked_causal_lm_sums takes the example weights as constants and has no gradient for "
                         "them: pass jax.lax.stop_gradient(weights), or use loss_sums on the full logits")
    trained = [c.perturbed for c in consts]
    values = [c.value for c in consts]

    def logits_of(chunk, trained_values):
        given = iter(trained_values)
        return head(chunk, *(next(given) if t else v for v, t in zip(values, trained, strict=True)))

    def one_chunk(summed_gradients, chunk):
        logits, pullback = jax.vjp(logits_of, chunk[0], [v for v, t in zip(values, trained, strict=True) if t])
        sums, logits_gradient = _sums_and_gradient(logits, chunk[1], weight.value, ignore_index)
        hidden_gradient, gradients = pullback(logits_gradient)
        summed = [s + g.astype(jnp.float32) for s, g in zip(summed_gradients, gradients, strict=True)]
        return summed, (sums, hidden_gradient)

    zeros = [jnp.zeros(v.shape, jnp.float32) for v, t in zip(values, trained, strict=True) if t]
    summed, (sums, hidden_gradient) = jax.lax.scan(one_chunk, zeros, (hidden.value, labels.value))
    summed = iter(summed)
    const_gradients = [next(summed).astype(v.dtype) if t else None for v, t in zip(values, trained, strict=True)]
    return tuple(jnp.sum(s) for s in sums), (hidden_gradient, const_gradients)


def _summed_chunks_backward(head, ignore_index, residuals, cotangents):
    hidden_gradient, const_gradients = residuals
    scale = cotangents[0]  # count and correct do not depend on the inputs
    if isinstance(scale, SymbolicZero):
        return (None, None, None) + (None,) * len(const_gradients)
    return ((scale * hidden_gradient).astype(hidden_gradient.dtype), None, None,
            *(None if g is None else (scale * g).astype(g.dtype) for g in const_gradients))


_summed_chunks.defvjp(_summed_chunks_forward, _summed_chunks_backward, symbolic_zeros=True)


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
    go through ``logits_of``; under differentiation each chunk's gradient is taken in the forward pass (see the
    module's docstring), so no pass holds more than one chunk's logits and their gradient, and no chunk's logits
    are computed twice. Whatever ``logits_of`` closes over (the head's weights) gets its gradient only where it is
    differentiated; ``weights`` are constants. Returns ``{"loss_sum", "count", "correct"}`` as ``loss_sums`` does.

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
    hidden, labels = _in_chunks(hidden, positions, 0), _in_chunks(labels, positions, ignore_index)
    head, consts = jax.closure_convert(logits_of, jax.ShapeDtypeStruct(hidden.shape[1:], hidden.dtype))
    loss_sum, count, correct = _summed_chunks(head, ignore_index, hidden, labels, weight[:, None], *consts)
    return {"loss_sum": loss_sum, "count": count, "correct": correct}
