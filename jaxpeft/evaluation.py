"""Evaluation metrics: accuracy and F1 for classification, perplexity for causal language models.

The classification metrics are plain numpy with scikit-learn's definitions (an F1 with no predicted and no true
example of a class is 0). ``classification_metrics`` is a ``compute_metrics`` for ``jaxpeft.trainer.Trainer`` (and
for transformers' ``Trainer``). ``perplexity`` runs the model in padded, bucketed batches and sums the next-token
log-likelihoods on the device (``jaxpeft.training.loss_sums``).

Example:
    >>> accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    0.75
    >>> round(f1_score([1, 0, 1, 1], [1, 0, 0, 1]), 4)  # precision 2/3, recall 1
    0.8
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxpeft import data, losses, pipelines, training
from jaxpeft.data import IGNORE_INDEX

AVERAGES = ("binary", "macro", "micro", "weighted")


class MetricError(ValueError):
    """A metric cannot be computed from what was given; the message says what was wrong and how to fix it."""


# ------------------------------------------------------------------------------------------ classification


def _class_ids(predictions: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true class ids as 1-D int arrays; scores ``(n, classes)`` become their argmax."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = np.argmax(predictions, axis=-1)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise MetricError(f"{what} needs predictions and labels of the same length (or scores (n, classes) for n "
                          f"labels), got shapes {predictions.shape} and {labels.shape}.")
    if predictions.size == 0:
        raise MetricError(f"{what} got no examples; pass at least one prediction and label.")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.dtype.kind not in "biuf" or (values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0)):
            raise MetricError(f"{what} needs integer class ids as {name}, got values like {values.flat[0]!r}; "
                              "pass class ids or (n, classes) scores.")
    return predictions.astype(np.int64), labels.astype(np.int64)


def accuracy(predictions: Any, labels: Any) -> float:
    """The fraction of predictions equal to the labels; ``predictions`` are class ids or ``(n, classes)`` scores.

    Example:
        >>> accuracy([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [1, 1, 1])  # scores: their argmax is the prediction
        0.6666666666666666
    """
    predictions, labels = _class_ids(predictions, labels, "accuracy")
    return float(np.mean(predictions == labels))


def _per_class_counts(predictions: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, ...]:
    predicted = predictions[None, :] == classes[:, None]
    true = labels[None, :] == classes[:, None]
    true_positives = np.sum(predicted & true, axis=1)
    return true_positives, np.sum(predicted & ~true, axis=1), np.sum(~predicted & true, axis=1)


def _f1(true_positives, false_positives, false_negatives) -> np.ndarray:
    denominator = 2 * true_positives + false_positives + false_negatives
    return np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0)


def f1_score(predictions: Any, labels: Any, average: str = "binary", pos_label: int = 1) -> float:
    """F1 as scikit-learn's ``f1_score``: ``2 TP / (2 TP + FP + FN)``.

    Args:
        predictions: class ids, or ``(n, classes)`` scores (their argmax).
        labels: true class ids.
        average: ``"binary"`` (F1 of ``pos_label``; at most two classes), ``"macro"`` (unweighted mean over the
            classes seen in predictions or labels), ``"micro"`` (from the summed counts; accuracy for single-label
            data) or ``"weighted"`` (mean weighted by each class's number of true examples).
        pos_label: the positive class for ``"binary"``.

    Example:
        >>> f1_score([0, 1, 2, 2], [0, 2, 2, 1], average="macro")  # F1 per class: 1, 0, 0.5
        0.5
        >>> f1_score([0, 1, 2, 2], [0, 2, 2, 1], average="micro")
        0.5
    """
    if average not in AVERAGES:
        raise MetricError(f"average={average!r} is not one of {list(AVERAGES)}.")
    predictions, labels = _class_ids(predictions, labels, "f1_score")
    classes = np.union1d(predictions, labels)
    if average == "binary":
        if len(classes) > 2:
            raise MetricError(f"average='binary' needs at most two classes, found {classes.tolist()}; use "
                              "average='macro', 'micro' or 'weighted'.")
        counts = _per_class_counts(predictions, labels, np.asarray([pos_label]))
        return float(_f1(*counts)[0])
    true_positives, false_positives, false_negatives = _per_class_counts(predictions, labels, classes)
    if average == "micro":
        return float(_f1(true_positives.sum(), false_positives.sum(), false_negatives.sum()))
    per_class = _f1(true_positives, false_positives, false_negatives)
    if average == "macro":
        return float(np.mean(per_class))
    support = true_positives + false_negatives
    return float(np.sum(per_class * support) / support.sum())


def classification_metrics(eval_prediction: Any) -> dict[str, float]:
    """``{"accuracy", "f1"}`` from a Trainer's ``EvalPrediction``: a ``compute_metrics`` for classification.

    ``eval_prediction`` has ``.predictions`` (logits ``(n, classes)``, or ``(n, seq, classes)`` for token
    classification) and ``.label_ids`` (``(n,)`` or ``(n, seq)``; ``-100`` is skipped), or is the pair
    ``(predictions, label_ids)``. F1 is binary (class 1 positive) for two classes, macro otherwise.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[2.0, -1.0], [0.5, 1.5], [0.0, 3.0], [1.0, 0.0]])
        >>> classification_metrics((logits, np.array([0, 1, 0, 0])))  # predicted 0, 1, 1, 0
        {'accuracy': 0.75, 'f1': 0.6666666666666666}
    """
    if hasattr(eval_prediction, "predictions"):
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    else:
        try:
            predictions, labels = eval_prediction[0], eval_prediction[1]
        except (TypeError, IndexError, KeyError) as error:
            raise MetricError("classification_metrics needs an EvalPrediction (.predictions, .label_ids) or a "
                              f"(predictions, label_ids) pair, got {type(eval_prediction).__name__}.") from error
    if isinstance(predictions, (tuple, list)) and predictions and np.ndim(predictions[0]) >= 2:
        predictions = predictions[0]  # a model that returns more than its logits
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if labels.ndim == 0 or predictions.ndim != labels.ndim + 1:
        raise MetricError(f"classification_metrics needs logits with one more axis than the labels, got shapes "
                          f"{predictions.shape} and {labels.shape}.")
    num_classes = predictions.shape[-1]
    if num_classes < 2:
        raise MetricError(f"classification_metrics needs logits over 2 or more classes, got {num_classes} (a "
                          "regression model); write a compute_metrics for regression.")
    keep = labels.reshape(-1) != IGNORE_INDEX
    predicted = np.argmax(predictions, axis=-1).reshape(-1)[keep]
    labels = labels.reshape(-1)[keep]
    average = "binary" if num_classes == 2 else "macro"
    return {"accuracy": accuracy(predicted, labels), "f1": f1_score(predicted, labels, average=average)}


# ----------------------------------------------------------------------------------------------- perplexity


def sliding_windows(input_ids: Sequence[int], window: int, stride: int | None = None) -> list[tuple[list, list]]:
    """``(input_ids, labels)`` windows that score every token of a long text once, as Hugging Face's guide to the
    perplexity of fixed-length models: windows of ``window`` tokens start every ``stride`` tokens (default:
    ``window``, no overlap) and each scores only the tokens that the previous window did not (others -100).

    Example:
        >>> sliding_windows([1, 2, 3, 4, 5], window=3, stride=2)
        [([1, 2, 3], [1, 2, 3]), ([3, 4, 5], [-100, 4, 5])]
        >>> sliding_windows([1, 2, 3], window=4)
        [([1, 2, 3], [1, 2, 3])]
    """
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise MetricError(f"windows need max_length >= 2 and 1 <= stride <= max_length, got max_length={window}, "
                          f"stride={stride}.")
    ids = list(input_ids)
    windows, previous_end = [], 0
    for begin in range(0, max(len(ids), 1), stride):
        end = min(begin + window, len(ids))
        scored = end - previous_end
        windows.append((ids[begin:end], [IGNORE_INDEX] * (end - begin - scored) + ids[end - scored : end]))
        previous_end = end
        if end == len(ids):
            break
    return windows


def _text_batches(model, texts: list[str], tokenizer, batch_size: int, window: int | None, stride: int | None):
    tokenizer = pipelines._resolve_tokenizer(model, tokenizer)
    limit = pipelines._position_limit(model)
    if window is not None and limit is not None and window > limit:
        raise MetricError(f"max_length={window} is more than the model's {limit} positions; pass at most {limit}.")
    window = window or limit
    features = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        pieces = sliding_windows(ids, window, stride) if window is not None else [(ids, ids)]
        features.extend({"input_ids": piece, "labels": labels} for piece, labels in pieces)
    pad_token_id = data.resolve_pad_token_id(tokenizer, pipelines._base_model_of(model).config)
    for filled in pipelines.filled_batches(features, batch_size, shrink_last=True):
        length = data.bucket_length(max(len(f["input_ids"]) for f in filled.rows), max_length=limit)
        batch = pipelines.pad_features(filled.rows, length=length, pad_token_id=pad_token_id)
        batch["labels"] = data.pad_sequences([f["labels"] for f in filled.rows], length, IGNORE_INDEX)
        yield {**batch, "weights": filled.weights}


def _given_batch(batch: Mapping, index: int) -> dict:
    if "input_ids" not in batch:
        raise MetricError(f"batch {index} has no 'input_ids' (it has {sorted(batch)}); pass tokenized batches or "
                          "texts with a tokenizer.")
    inputs = {name: np.asarray(value) for name, value in batch.items()
              if name in ("input_ids", "attention_mask", "labels")}
    if inputs["input_ids"].ndim != 2:
        raise MetricError(f"batch {index} input_ids must be (batch, seq), got shape {inputs['input_ids'].shape}.")
    if "labels" not in inputs:
        labels = inputs["input_ids"]
        if "attention_mask" in inputs:
            labels = np.where(inputs["attention_mask"] == 0, IGNORE_INDEX, labels)
        inputs["labels"] = labels
    return inputs


def _causal_lm_sums_fn(model: Any):
    """The jitted ``(params, batch, weights) -> loss sums`` of a causal LM's active adapter, its output head run
    ``losses.DEFAULT_CHUNK_SIZE`` tokens at a time where it can be (``training.peft_outputs_fn``): the
    ``(batch, seq, vocab)`` logits are never held. Kept beside the model's jitted forward for the active adapter, so
    repeated calls trace once."""
    runner = model._runner() if hasattr(model, "_runner") else model
    sums_fn = vars(runner).get("_causal_lm_sums_fn")
    if sums_fn is None:
        outputs = training.peft_outputs_fn(model, "causal_lm", lm_loss_chunk_size=losses.DEFAULT_CHUNK_SIZE)
        sums_fn = runner._causal_lm_sums_fn = jax.jit(lambda params, batch, weights: outputs(params, batch, None,
                                                                                             weights)[0])
    return sums_fn


def perplexity(
    model: Any,
    texts_or_batches: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    params: Any = None,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every scored token of a causal LM.

    Args:
        model: a causal LM ``PeftModel`` (its active adapter) or ``jaxpeft.models`` model.
        texts_or_batches: a text or a list of texts (tokenized with the tokenizer's special tokens, as
            ``tokenizer(text)``), or tokenized batches: dicts of ``(batch, seq)`` ``input_ids`` with
            ``attention_mask`` (padding not scored) and/or ``labels`` (``-100`` not scored), such as
            ``jaxpeft.data.CausalLMCollator`` makes.
        tokenizer: for texts; may be left out when the model's folder holds one.
        batch_size: texts per model call.
        max_length: texts longer than this (default: the model's position limit) are scored in windows
            (``sliding_windows``), each window's first token unscored.
        stride: the step between windows (default ``max_length``); a smaller one gives each scored token more
            context.
        params: variables to use instead of the model's own (e.g. from a training state).

    Returns:
        ``exp(total NLL / number of scored tokens)``: all tokens of all texts weigh the same. With prompt tuning the
        first token is scored too (the virtual tokens are its context), as in HF PEFT's loss.

    Example:
        >>> import transformers
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=10, n_positions=32, bos_token_id=0, eos_token_id=0))
        >>> value = perplexity(model, [{"input_ids": [[1, 2, 3, 4]], "attention_mask": [[1, 1, 1, 1]]}])
        >>> 5 < value < 20  # an untrained model is about as unsure as uniform over 10 tokens
        True
    """
    base = pipelines._base_model_of(model)
    if base.head != "causal_lm":
        raise MetricError(f"perplexity needs a causal LM, got a model with the {base.head!r} head; load it with "
                          "AutoModelForCausalLM.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MetricError(f"batch_size must be a positive int, got {batch_size!r}.")
    if isinstance(texts_or_batches, (str, Mapping)):
        texts_or_batches = [texts_or_batches]
    items = list(texts_or_batches) if isinstance(texts_or_batches, Iterable) else None
    if not items:
        raise MetricError("perplexity got no texts or batches; pass a list of strings or of tokenized batches.")
    if all(isinstance(item, str) for item in items):
        batches = _text_batches(model, items, tokenizer, batch_size, max_length, stride)
    elif all(isinstance(item, Mapping) for item in items):
        batches = (_given_batch(batch, index) for index, batch in enumerate(items))
    else:
        raise MetricError("perplexity takes a list of strings or a list of tokenized batches (dicts), not a mix or "
                          f"{type(items[0]).__name__}.")
    vocab_size = getattr(base.config, "vocab_size", None)
    sums_fn = _causal_lm_sums_fn(model)
    total_nll, total_count = 0.0, 0
    for index, batch in enumerate(batches):
        largest = int(np.max(batch["input_ids"], initial=0))
        if isinstance(vocab_size, int) and largest >= vocab_size:
            raise MetricError(f"batch {index} has token id {largest}, outside the model's vocabulary of "
                              f"{vocab_size}; use the tokenizer the model was trained with.")
        scored = {name: np.asarray(batch[name], np.int32) for name in ("input_ids", "attention_mask", "labels")
                  if name in batch}
        sums = sums_fn(model.params if params is None else params, scored, batch.get("weights"))
        total_nll += float(sums["loss_sum"])
        total_count += int(sums["count"])
    if total_count == 0:
        raise MetricError("no token to score: every text or window has fewer than 2 tokens (the first token of "
                          "each has no context).")
    return math.exp(total_nll / total_count)
