"""Inference pipelines: ``pipeline(task, model, tokenizer)`` runs a jaxpeft model on raw text, as transformers' does.

Four tasks, with the outputs of transformers' pipelines of the same names:

- ``"text-classification"`` (alias ``"sentiment-analysis"``): ``[{"label", "score"}]``;
- ``"token-classification"`` (alias ``"ner"``): ``[{"entity", "score", "index", "word", "start", "end"}, ...]``
  per text, or entity groups with ``aggregation_strategy="simple"``;
- ``"text-generation"``: ``[{"generated_text": prompt + continuation}]`` per prompt;
- ``"feature-extraction"``: the last hidden state as nested lists ``[1][tokens][hidden]`` per text.

``model`` is a ``jaxpeft.PeftModel`` (its active adapter runs), a ``jaxpeft.models`` ``PretrainedModel``, a
checkpoint folder, or a Flax NNX model or ``jaxpeft.nnx.PeftModel`` whose call returns the task's logits (all but
text-generation). A call takes one text or a list of texts; lists run in batches of ``batch_size``, each padded to
a bucketed length (``jaxpeft.data.bucket_length``) and a power-of-two number of rows, so that a stream of inputs
compiles only a few shapes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple

import numpy as np

from jaxpeft import data
from jaxpeft.config import PIPELINE_ALIASES

IGNORED_OPTIONS = ("device", "device_map", "framework")  # transformers' placement options; JAX places arrays itself
AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
_UNSET = object()


class PipelineError(ValueError):
    """A pipeline cannot run as asked; the message says what was wrong and how to fix it."""


# ------------------------------------------------------------------------------------------- building blocks


class NnxRunner:
    """A Flax NNX model (or a ``jaxpeft.nnx.PeftModel``, its active adapter running) as pipelines run models: a
    copy in inference mode, called with the batch's inputs under ``nnx.jit``, its output (an array) taken as the
    task's ``logits`` (and ``last_hidden_state``); ``head`` says what the model computes."""

    def __init__(self, model: Any, head: str):
        from flax import nnx

        from jaxpeft.nnx import PeftModel
        from jaxpeft.nnx._graph import independent_copy
        from jaxpeft.nnx._model import ModelInfo

        self.model = independent_copy(model)  # in inference mode (no dropout), sharing the model's arrays
        self.model.eval()
        self.base_model = ModelInfo(model.base_model if isinstance(model, PeftModel) else model, head)
        self.active_adapter = getattr(model, "active_adapter", None)
        self._forward = nnx.jit(lambda module, inputs: module(**inputs))

    def __call__(self, **inputs: Any) -> Any:
        out = self._forward(self.model, inputs)
        return SimpleNamespace(logits=out, last_hidden_state=out)


def _runner(model: Any, task: str, heads: tuple[str, ...] | None) -> Any:
    """``model`` as the pipeline runs it: an NNX model through ``NnxRunner``, any other model as it is."""
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return model
    if task == "text-generation":
        raise PipelineError("text-generation needs one of jaxpeft's model families (their generate()); a Flax NNX "
                            "model has no generation loop here: run it yourself, or use text-classification, "
                            "token-classification or feature-extraction")
    return NnxRunner(model, heads[0] if heads else "base")


def _base_model_of(model: Any) -> Any:
    """The ``jaxpeft.models`` model under a ``PeftModel`` (the model itself when it is one)."""
    base = getattr(model, "base_model", model)
    if not all(hasattr(base, name) for name in ("module", "config", "head")) or not callable(model):
        raise PipelineError(
            f"model must be a jaxpeft PeftModel or a jaxpeft.models model (AutoModel*.from_pretrained), got "
            f"{type(model).__name__}."
        )
    return base


def _model_accepts(model: Any) -> set[str]:
    """The input names (``attention_mask``, ``token_type_ids``, ...) the model's module takes."""
    module = _base_model_of(model).module
    return set(inspect.signature(type(module).__call__).parameters) - {"self", "deterministic"}


def _position_limit(model: Any, tokenizer: Any = None) -> int | None:
    """The most tokens one sequence may have: the model's position table, and the tokenizer's
    ``model_max_length`` when it sets a real one (``None`` when neither says)."""
    config = _base_model_of(model).config
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits = [value for value in limits if isinstance(value, int) and value > 0][:1]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # unset ones are ~1e30
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def rows_for(count: int, batch_size: int) -> int:
    """The number of rows a batch of ``count`` inputs is padded to: the next power of two, at most ``batch_size``.

    Example:
        >>> [rows_for(count, 8) for count in (1, 2, 3, 5, 8)], rows_for(5, 6)
        ([1, 2, 4, 8, 8], 6)
    """
    return min(1 << max(count - 1, 0).bit_length(), max(batch_size, count))


class FilledBatch(NamedTuple):
    """One batch of ``filled_batches``: ``rows`` holds the items from index ``start`` on, the first ``count`` of
    them real and the rest copies of the first."""

    start: int
    rows: list
    count: int

    @property
    def weights(self) -> np.ndarray:
        """``float32`` 1.0 for each real row, 0.0 for each copy."""
        return (np.arange(len(self.rows)) < self.count).astype(np.float32)


def filled_batches(items: Sequence, batch_size: int, *, shrink_last: bool = False) -> Iterator[FilledBatch]:
    """``items`` in batches of ``batch_size`` rows, the last one filled up with copies of its first item: valid
    inputs whose results are dropped (or weighted 0), so that a jitted model sees one batch shape. With
    ``shrink_last`` the last batch is filled only to ``rows_for(count, batch_size)`` rows (a power of two).

    Example:
        >>> [(b.start, b.rows, b.count) for b in filled_batches("abcde", 2)]
        [(0, ['a', 'b'], 2), (2, ['c', 'd'], 2), (4, ['e', 'e'], 1)]
        >>> [b.rows for b in filled_batches("abcde", 8, shrink_last=True)], next(filled_batches("ab", 4)).weights
        ([['a', 'b', 'c', 'd', 'e', 'a', 'a', 'a']], array([1., 1., 0., 0.], dtype=float32))
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for start in range(0, len(items), batch_size):
        chunk = [items[index] for index in range(start, min(start + batch_size, len(items)))]
        rows = rows_for(len(chunk), batch_size) if shrink_last else batch_size
        yield FilledBatch(start, chunk + [chunk[0]] * (rows - len(chunk)), len(chunk))


def pad_features(
    features: Sequence[Mapping[str, Sequence[int]]], *, length: int, pad_token_id: int, side: str = "right"
) -> dict[str, np.ndarray]:
    """Stacks tokenized inputs into ``int32`` arrays ``(len(features), length)``: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` and (when the features have them) ``token_type_ids``.

    Example:
        >>> batch = pad_features([{"input_ids": [5, 6]}, {"input_ids": [7]}], length=4, pad_token_id=0)
        >>> batch["input_ids"].tolist(), batch["attention_mask"][1].tolist()
        ([[5, 6, 0, 0], [7, 0, 0, 0]], [1, 0, 0, 0])
    """
    ids = [list(feature["input_ids"]) for feature in features]
    batch = {
        "input_ids": data.pad_sequences(ids, length, pad_token_id, side=side),
        "attention_mask": data.pad_sequences([[1] * len(i) for i in ids], length, 0, side=side),
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = data.pad_sequences([f["token_type_ids"] for f in features], length, 0, side=side)
    return batch


def _model_folders(model: Any) -> list[str]:
    """The folders a tokenizer may have been saved in: the active adapter's (``adapter_folders``, filled by
    ``PeftModel.load_adapter``), then the base model's."""
    adapter_folders = getattr(model, "adapter_folders", None) or {}
    candidates = (adapter_folders.get(getattr(model, "active_adapter", None)),
                  getattr(_base_model_of(model).config, "name_or_path", None))
    return [os.fspath(folder) for folder in candidates if folder and os.path.isdir(folder)]


def _resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` itself, one loaded from a folder or hub id given as a string, or (when ``None``) the one saved
    in the folder the model was loaded from; a ``PipelineError`` when there is none."""
    if tokenizer is None:
        folders = _model_folders(model)
        tokenizer = next((folder for folder in folders
                          if any(os.path.exists(os.path.join(folder, f)) for f in data.TOKENIZER_FILES)), None)
        if tokenizer is None:
            where = (f"{' and '.join(map(repr, folders))} hold{'s' if len(folders) == 1 else ''} no tokenizer files"
                     if folders else "the model has no folder")
            raise PipelineError(f"no tokenizer given and {where}; pass tokenizer= (a transformers tokenizer or the "
                                "folder that holds one).")
    if isinstance(tokenizer, (str, os.PathLike)):
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except (OSError, ValueError) as error:
            raise PipelineError(f"cannot load a tokenizer from {os.fspath(tokenizer)!r} ({error}); pass a "
                                "transformers tokenizer or a folder written by tokenizer.save_pretrained.") from error
    if not callable(tokenizer):
        raise PipelineError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}.")
    return tokenizer


def _as_float(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _label_of(config: Any, index: int) -> str:
    id2label = getattr(config, "id2label", None) or {}
    return id2label.get(index, id2label.get(str(index), f"LABEL_{index}"))


# ----------------------------------------------------------------------------------------------- pipelines


class Pipeline:
    """Runs a model on raw inputs; subclasses say how one task encodes, runs and decodes.

    Attributes:
        task: the task name (``"text-classification"``, ...).
        model: the ``PeftModel`` or ``jaxpeft.models`` model that runs.
        tokenizer: the transformers tokenizer.
        batch_size: inputs per model call.
        buckets: padded lengths (``jaxpeft.data.bucket_length``).
        defaults: options given to ``pipeline(...)``, used by every call unless the call gives them again.

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModel
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])})
        >>> model = AutoModel.from_config(transformers.BertConfig(vocab_size=4, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> extractor = pipeline("feature-extraction", model, tokenizer, batch_size=4)
        >>> isinstance(extractor, Pipeline), extractor.task, extractor.batch_size
        (True, 'feature-extraction', 4)
    """

    task: ClassVar[str] = ""
    heads: ClassVar[tuple[str, ...] | None] = None  # the model heads that serve the task (None: any)
    options: ClassVar[Mapping[str, Any]] = {}  # call options and their defaults

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8,
                 buckets: Sequence[int] = data.DEFAULT_BUCKETS, **defaults: Any):
        model = _runner(model, self.task, self.heads)
        base = _base_model_of(model)
        if self.heads is not None and base.head not in self.heads:
            raise PipelineError(
                f"{self.task!r} needs a model with a {' or '.join(self.heads)!r} head, got {base.head!r}; load it "
                f"with the matching jaxpeft.models Auto class (e.g. {_AUTO_CLASS_OF_HEAD[self.heads[0]]})."
            )
        self.model = model
        self.tokenizer = _resolve_tokenizer(model, tokenizer)
        self.batch_size = self._check_batch_size(batch_size)
        self.buckets = tuple(buckets)
        data.bucket_length(1, self.buckets)  # a one-line error now for buckets that are not ascending lengths
        self.defaults = self._check_options({k: v for k, v in defaults.items() if k not in IGNORED_OPTIONS})
        self._accepts = _model_accepts(model)
        self._limit = _position_limit(model, self.tokenizer)
        self._pad_token_id = data.resolve_pad_token_id(self.tokenizer, self.config)

    @property
    def config(self) -> Any:
        """The model's transformers config (labels, special token ids)."""
        return _base_model_of(self.model).config

    @staticmethod
    def _check_batch_size(batch_size: Any) -> int:
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise PipelineError(f"batch_size must be a positive int, got {batch_size!r}.")
        return int(batch_size)

    def _check_options(self, given: Mapping[str, Any]) -> dict:
        unknown = sorted(set(given) - set(self.options) - {"batch_size"})
        if unknown:
            raise PipelineError(f"the {self.task!r} pipeline has no option {', '.join(map(repr, unknown))}; its "
                                f"options are {sorted(self.options)} and batch_size.")
        return dict(given)

    def __call__(self, inputs: Any, **options: Any) -> list:
        """Runs the task on one input (a string) or a list of inputs; see the task's class for the outputs."""
        options = {**self.options, **self.defaults, **self._check_options(options)}
        batch_size = self._check_batch_size(options.pop("batch_size", self.batch_size))
        single = self._is_single(inputs)
        items = [inputs] if single else self._as_list(inputs)
        for index, item in enumerate(items):
            self._check_input(item, index)
        return self._shape_results(self._run(items, batch_size, options), inputs, options)

    # ----- what subclasses change -----

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, str)

    def _as_list(self, inputs: Any) -> list:
        if isinstance(inputs, (list, tuple)):
            return list(inputs)
        raise PipelineError(f"the {self.task!r} pipeline takes a string or a list of strings, got "
                            f"{type(inputs).__name__}.")

    def _check_input(self, item: Any, index: int) -> None:
        if not isinstance(item, str):
            raise PipelineError(f"input {index} is a {type(item).__name__}; the {self.task!r} pipeline takes strings.")

    def _run(self, items: list, batch_size: int, options: dict) -> list:
        raise NotImplementedError

    def _shape_results(self, results: list, inputs: Any, options: dict) -> list:
        return results[0] if self._is_single(inputs) else results

    # ----- shared steps -----

    def _encode(self, item: Any, *, truncation: bool = True, max_length: int | None = None, **kwargs: Any) -> dict:
        """Tokenizes one input (a string, or a ``{"text", "text_pair"}`` dict) into lists of ids."""
        limit = max_length if max_length is not None else self._limit
        if truncation and limit is not None:
            kwargs.update(truncation=True, max_length=limit)
        if isinstance(item, Mapping):
            return dict(self.tokenizer(text=item["text"], text_pair=item.get("text_pair"), **kwargs))
        return dict(self.tokenizer(item, **kwargs))

    def _padded_length(self, features: Sequence[Mapping], index: int) -> int:
        longest = max(len(feature["input_ids"]) for feature in features)
        if self._limit is not None and longest > self._limit:
            raise PipelineError(f"input {index} has {longest} tokens, more than the model's limit of {self._limit}; "
                                "pass truncation=True (or a shorter max_length=).")
        return data.bucket_length(max(longest, 1), self.buckets, max_length=self._limit)

    def _check_vocabulary(self, features: Sequence[Mapping]) -> None:
        """JAX clamps out-of-range ids silently: a tokenizer that does not fit the model must fail here."""
        vocab_size = getattr(self.config, "vocab_size", None)
        if not isinstance(vocab_size, int):
            return
        for index, feature in enumerate(features):
            largest = max(feature["input_ids"], default=0)
            if largest >= vocab_size:
                raise PipelineError(f"input {index} has token id {largest}, outside the model's vocabulary of "
                                    f"{vocab_size}; use the tokenizer the model was trained with.")

    def _forward(self, batch: Mapping[str, np.ndarray]) -> Any:
        inputs = {name: value for name, value in batch.items() if name in self._accepts or name == "input_ids"}
        return self.model(**inputs)

    def _batched_forward(self, features: list[dict], batch_size: int, read) -> list:
        """Runs ``features`` in padded batches; ``read(output, row, feature, length)`` takes one input's result out
        of the model output of a batch padded to ``length``."""
        empty = next((index for index, feature in enumerate(features) if not feature["input_ids"]), None)
        if empty is not None:
            raise PipelineError(f"input {empty} has no tokens after tokenization; give a non-empty text.")
        self._check_vocabulary(features)
        results: list = []
        for batch in filled_batches(features, batch_size, shrink_last=True):
            chunk = batch.rows[: batch.count]
            length = self._padded_length(chunk, batch.start)  # also the limit check
            output = self._forward(pad_features(batch.rows, length=length, pad_token_id=self._pad_token_id))
            results.extend(read(output, row, feature, length) for row, feature in enumerate(chunk))
        return results


def _per_token(name: str):
    """A reader for ``_batched_forward`` of a per-token output (``logits``, ``last_hidden_state``): one input's
    real tokens, without the positions that a prompt-tuning adapter puts in front."""

    def read(output, row, feature, length):
        array = getattr(output, name)
        virtual = array.shape[1] - length
        return np.asarray(array[row, virtual : virtual + len(feature["input_ids"])], np.float32)

    return read


class TextClassificationPipeline(Pipeline):
    """Labels whole texts (or ``{"text", "text_pair"}`` pairs) with the model config's ``id2label``.

    A string gives ``[{"label", "score"}]`` (the top label), a pair dict the bare dict (as transformers), a list
    one such dict per input. With ``top_k=k`` (``None``: all labels) each input gives a list of ``k`` dicts, best
    first. Scores: ``function_to_apply`` ``"softmax"``, ``"sigmoid"`` or ``"none"``; by default sigmoid for one
    label or ``problem_type="multi_label_classification"``, none for regression, softmax otherwise (as
    transformers). Inputs longer than the model's limit are truncated unless ``truncation=False``. Inputs run in
    padded batches: a decoder classifier finds each input's last token by the attention mask, so it needs no
    ``pad_token_id`` (transformers refuses batches without one).

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModelForSequenceClassification
        >>> tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "ok"])})
        >>> model = AutoModelForSequenceClassification.from_config(transformers.BertConfig(vocab_size=5,
        ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3))
        >>> classifier = TextClassificationPipeline(model, tokenizer)
        >>> [len(result) for result in classifier(["ok", "ok ok"], top_k=None)]  # all three labels per input
        [3, 3]
        >>> round(sum(entry["score"] for entry in classifier("ok", top_k=None)), 5)  # softmax scores
        1.0
    """

    task = "text-classification"
    heads = ("seq_cls",)
    options = {"top_k": _UNSET, "function_to_apply": None, "truncation": True, "max_length": None}

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, (str, Mapping))

    def _check_input(self, item: Any, index: int) -> None:
        if isinstance(item, Mapping):
            if not isinstance(item.get("text"), str) or not isinstance(item.get("text_pair", ""), str):
                raise PipelineError(f"input {index} is a dict without a 'text' string; a text pair is "
                                    '{"text": ..., "text_pair": ...}.')
            return
        super()._check_input(item, index)

    def _scores_function(self, function_to_apply: Any) -> str:
        if function_to_apply is None or function_to_apply == "default":
            config = self.config
            problem_type = getattr(config, "problem_type", None)
            if problem_type == "regression":
                return "none"
            if problem_type == "multi_label_classification" or config.num_labels == 1:
                return "sigmoid"
            return "softmax"
        name = str(getattr(function_to_apply, "value", function_to_apply)).lower()
        if name not in ("softmax", "sigmoid", "none"):
            raise PipelineError(f"function_to_apply={function_to_apply!r}; use 'softmax', 'sigmoid', 'none' or "
                                "'default'.")
        return name

    def _run(self, items: list, batch_size: int, options: dict) -> list:
        top_k = options["top_k"]
        if top_k is not _UNSET and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise PipelineError(f"top_k must be a positive int or None (all labels), got {top_k!r}.")
        function = self._scores_function(options["function_to_apply"])
        features = [self._encode(item, truncation=options["truncation"], max_length=options["max_length"])
                    for item in items]
        logits = self._batched_forward(
            features, batch_size, lambda output, row, feature, length: np.asarray(output.logits[row], np.float32)
        )
        transform = {"softmax": _softmax, "sigmoid": _sigmoid, "none": lambda x: x}[function]
        results = []
        for row_logits in logits:
            scores = transform(row_logits.astype(np.float64)).astype(np.float32)
            if top_k is _UNSET:
                best = int(np.argmax(scores))
                results.append({"label": _label_of(self.config, best), "score": _as_float(scores[best])})
                continue
            order = np.argsort(-scores, kind="stable")[: None if top_k is None else top_k]
            results.append([{"label": _label_of(self.config, int(i)), "score": _as_float(scores[i])} for i in order])
        return results

    def _shape_results(self, results: list, inputs: Any, options: dict) -> list:
        if options["top_k"] is _UNSET and not isinstance(inputs, Mapping):
            return results  # a list of dicts for one string too, as transformers
        return results[0] if self._is_single(inputs) else results


class TokenClassificationPipeline(Pipeline):
    """Labels each token (``aggregation_strategy="none"``) or groups tokens into entities.

    Per text, a list of ``{"entity", "score", "index", "word", "start", "end"}`` for the tokens whose label is
    not in ``ignore_labels`` (default ``["O"]``); special tokens are skipped and ``start``/``end`` are character
    offsets into the text (from a fast tokenizer; ``None`` with a slow one). ``"simple"`` groups neighbouring
    tokens with the same tag into ``{"entity_group", "score" (mean), "word", "start", "end"}`` (a ``B-`` tag starts
    a new group); ``"first"``, ``"average"`` and ``"max"`` first give every word one label, as transformers.

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModelForTokenClassification
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "anna", "lives", "in", "rome"]
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
        >>> model = AutoModelForTokenClassification.from_config(transformers.BertConfig(vocab_size=8,
        ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        ...     id2label={0: "B-PER", 1: "B-LOC"}))
        >>> tagger = TokenClassificationPipeline(model, tokenizer)
        >>> [(entity["word"], entity["start"], entity["end"]) for entity in tagger("Anna lives in Rome")]
        [('anna', 0, 4), ('lives', 5, 10), ('in', 11, 13), ('rome', 14, 18)]
    """

    task = "token-classification"
    heads = ("token_cls",)
    options = {"aggregation_strategy": "none", "ignore_labels": None}

    def _run(self, items: list, batch_size: int, options: dict) -> list:
        strategy = str(getattr(options["aggregation_strategy"], "value", options["aggregation_strategy"])).lower()
        if strategy not in AGGREGATION_STRATEGIES:
            raise PipelineError(f"aggregation_strategy={options['aggregation_strategy']!r}; use one of "
                                f"{list(AGGREGATION_STRATEGIES)}.")
        is_fast = bool(getattr(self.tokenizer, "is_fast", False))
        if strategy in ("first", "average", "max") and not is_fast:
            raise PipelineError(f"aggregation_strategy={strategy!r} needs a fast tokenizer (word boundaries); use "
                                "'simple' or a fast tokenizer.")
        ignore_labels = ["O"] if options["ignore_labels"] is None else list(options["ignore_labels"])
        features = [self._encode(item, return_special_tokens_mask=True, return_offsets_mapping=is_fast)
                    for item in items]
        logits = self._batched_forward(features, batch_size, _per_token("logits"))
        results = []
        for text, feature, row_logits in zip(items, features, logits, strict=True):
            scores = _softmax(row_logits.astype(np.float32))
            entities = self._aggregate(self._pre_entities(text, feature, scores), strategy)
            results.append([entity for entity in entities
                            if entity.get("entity", entity.get("entity_group")) not in ignore_labels])
        return results

    def _pre_entities(self, text: str, feature: Mapping, scores: np.ndarray) -> list[dict]:
        tokenizer = self.tokenizer
        offsets = feature.get("offset_mapping")
        subword_prefix = getattr(getattr(getattr(tokenizer, "_tokenizer", None), "model", None),
                                 "continuing_subword_prefix", None)
        pre_entities = []
        for index, token_id in enumerate(feature["input_ids"]):
            if feature["special_tokens_mask"][index]:
                continue
            word = tokenizer.convert_ids_to_tokens(int(token_id))
            start = end = None
            is_subword = False
            if offsets is not None:
                start, end = (int(value) for value in offsets[index])
                word_in_text = text[start:end]
                if subword_prefix:
                    is_subword = len(word) != len(word_in_text)
                else:  # transformers' heuristic for tokenizers that do not mark sub-words
                    is_subword = start > 0 and " " not in text[start - 1 : start + 1]
                if int(token_id) == tokenizer.unk_token_id:
                    word, is_subword = word_in_text, False
            pre_entities.append({"word": word, "scores": scores[index], "start": start, "end": end, "index": index,
                                 "is_subword": is_subword})
        return pre_entities

    def _entity(self, scores: np.ndarray) -> tuple[str, float]:
        best = int(np.argmax(scores))
        return _label_of(self.config, best), _as_float(scores[best])

    def _aggregate(self, pre_entities: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for pre in pre_entities:
                label, score = self._entity(pre["scores"])
                entities.append({"entity": label, "score": score, "index": pre["index"], "word": pre["word"],
                                 "start": pre["start"], "end": pre["end"]})
            if strategy == "none":
                return entities
        else:
            entities = [self._aggregate_word(group, strategy) for group in _word_groups(pre_entities)]
        return self._group_entities(entities)

    def _aggregate_word(self, group: list[dict], strategy: str) -> dict:
        if strategy == "first":
            label, score = self._entity(group[0]["scores"])
        elif strategy == "max":
            label, score = self._entity(max(group, key=lambda pre: pre["scores"].max())["scores"])
        else:
            label, score = self._entity(np.nanmean(np.stack([pre["scores"] for pre in group]), axis=0))
        word = self.tokenizer.convert_tokens_to_string([pre["word"] for pre in group])
        return {"entity": label, "score": score, "word": word, "start": group[0]["start"], "end": group[-1]["end"]}

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        groups: list[list[dict]] = []
        for entity in entities:
            bi, tag = _bio_tag(entity["entity"])
            if groups and tag == _bio_tag(groups[-1][-1]["entity"])[1] and bi != "B":
                groups[-1].append(entity)
            else:
                groups.append([entity])
        return [
            {
                "entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": _as_float(np.nanmean([entity["score"] for entity in group])),
                "word": self.tokenizer.convert_tokens_to_string([entity["word"] for entity in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]


def _bio_tag(label: str) -> tuple[str, str]:
    """``("B", "PER")`` for ``"B-PER"``, ``("I", "PER")`` for ``"I-PER"``; other labels continue (``"I"``)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _word_groups(pre_entities: list[dict]) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for pre in pre_entities:
        if groups and pre["is_subword"]:
            groups[-1].append(pre)
        else:
            groups.append([pre])
    return groups


class TextGenerationPipeline(Pipeline):
    """Continues prompts with the model's ``generate`` (greedy unless ``do_sample=True``).

    A string gives ``[{"generated_text": prompt + continuation}]``, a list one such list per prompt. Options:
    ``max_new_tokens`` (default 256, as transformers' pipeline, or fewer when the model's positions run out) or
    ``max_length`` (prompt + new tokens, per prompt); ``do_sample``, ``temperature``, ``top_k``, ``top_p`` and
    ``seed`` for sampling; ``eos_token_id`` (default: the config's); ``return_full_text=False`` for the
    continuation only; ``return_tensors=True`` for ``{"generated_token_ids": [...]}``; ``skip_special_tokens``,
    ``clean_up_tokenization_spaces`` for decoding; ``add_special_tokens`` for encoding the prompt (default: the
    tokenizer's, as transformers: Llama's BOS, none for GPT-2). Prompts of a batch are left-padded; each stops at
    its own EOS and its own budget. Unlike transformers' pipeline (which samples at temperature 0.7 unless the
    model's generation config says otherwise), decoding is greedy unless ``do_sample=True``.

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "once", "upon", "a", "time"]
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
        >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=8, n_positions=32, bos_token_id=2, eos_token_id=3))
        >>> generator = TextGenerationPipeline(model, tokenizer)
        >>> [output] = generator("once upon", max_new_tokens=3, eos_token_id=None, add_special_tokens=False,
        ...     return_tensors=True)
        >>> output["generated_token_ids"][:2], len(output["generated_token_ids"])
        ([4, 5], 5)
        >>> generator(["once upon", "a"], max_new_tokens=2)[1][0]["generated_text"].startswith("a")
        True
    """

    task = "text-generation"
    heads = ("causal_lm",)
    default_max_new_tokens: ClassVar[int] = 256
    options = {
        "max_new_tokens": None,
        "max_length": None,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
        "seed": 0,
        "eos_token_id": _UNSET,
        "return_full_text": True,
        "return_tensors": False,
        "skip_special_tokens": True,
        "clean_up_tokenization_spaces": None,
        "add_special_tokens": None,
    }

    def _prompt_ids(self, prompt: str, add_special_tokens: bool | None, index: int) -> list[int]:
        encode_options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer(prompt, **encode_options)["input_ids"])
        if ids:
            return ids
        bos = getattr(self.config, "bos_token_id", None)
        bos = getattr(self.tokenizer, "bos_token_id", None) if bos is None else bos
        if bos is None:
            raise PipelineError(f"prompt {index} is empty and the model has no BOS token to start from; give a "
                                "non-empty prompt.")
        return [int(bos)]

    def _budget(self, prompt_length: int, options: Mapping, index: int) -> int:
        """The number of new tokens for one prompt."""
        limit = _position_limit(self.model)
        if options["max_new_tokens"] is not None:
            budget, asked = int(options["max_new_tokens"]), f"max_new_tokens={options['max_new_tokens']}"
        elif options["max_length"] is not None:
            budget, asked = int(options["max_length"]) - prompt_length, f"max_length={options['max_length']}"
        else:
            budget = self.default_max_new_tokens
            budget, asked = (budget if limit is None else min(budget, limit - prompt_length)), "the model's limit"
        if budget < 1:
            raise PipelineError(f"prompt {index} has {prompt_length} tokens, which leaves nothing to generate within "
                                f"{asked}; give a larger max_length or max_new_tokens.")
        if limit is not None and prompt_length + budget > limit:
            raise PipelineError(f"prompt {index} ({prompt_length} tokens) + {budget} new tokens exceeds the model's "
                                f"{limit} positions; lower max_new_tokens or shorten the prompt.")
        return budget

    def _eos_ids(self, options: Mapping) -> set[int]:
        eos = options["eos_token_id"]
        eos = getattr(self.config, "eos_token_id", None) if eos is _UNSET else eos
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, (int, np.integer)) else {int(token) for token in eos}

    def _run(self, items: list, batch_size: int, options: dict) -> list:
        if options["max_new_tokens"] is not None and options["max_length"] is not None:
            raise PipelineError("give max_new_tokens or max_length, not both.")
        prompts = [self._prompt_ids(item, options["add_special_tokens"], index) for index, item in enumerate(items)]
        budgets = [self._budget(len(ids), options, index) for index, ids in enumerate(prompts)]
        self._check_vocabulary([{"input_ids": ids} for ids in prompts])
        sampling = {name: options[name] for name in ("do_sample", "temperature", "top_k", "top_p", "seed")}
        if options["eos_token_id"] is not _UNSET:
            sampling["eos_token_id"] = options["eos_token_id"]
        eos_ids = self._eos_ids(options)
        results = []
        for filled in filled_batches([{"input_ids": ids} for ids in prompts], batch_size, shrink_last=True):
            start, chunk = filled.start, prompts[filled.start : filled.start + filled.count]
            chunk_budgets = budgets[start : start + filled.count]
            length = data.bucket_length(max(len(ids) for ids in chunk), self.buckets)
            batch = pad_features(filled.rows, length=length, pad_token_id=self._pad_token_id, side="left")
            sequences = np.asarray(self.model.generate(batch["input_ids"], batch["attention_mask"],
                                                       max_new_tokens=max(chunk_budgets), **sampling))
            for row, (prompt_ids, budget) in enumerate(zip(chunk, chunk_budgets, strict=True)):
                new_ids = [int(token) for token in sequences[row, length : length + budget]]
                ends = [position for position, token in enumerate(new_ids) if token in eos_ids]
                new_ids = new_ids[: ends[0] + 1] if ends else new_ids
                results.append([self._record(items[start + row], prompt_ids, new_ids, options)])
        return results

    def _record(self, prompt: str, prompt_ids: list[int], new_ids: list[int], options: Mapping) -> dict:
        if options["return_tensors"]:
            return {"generated_token_ids": prompt_ids + new_ids}
        decode_options = {"skip_special_tokens": options["skip_special_tokens"]}
        if options["clean_up_tokenization_spaces"] is not None:
            decode_options["clean_up_tokenization_spaces"] = options["clean_up_tokenization_spaces"]
        text = self.tokenizer.decode(new_ids, **decode_options)
        return {"generated_text": prompt + text if options["return_full_text"] else text}


class FeatureExtractionPipeline(Pipeline):
    """The last hidden state of every token, special tokens included: nested lists ``[1][tokens][hidden]`` per
    input (``return_tensors=True``: numpy arrays of that shape), as transformers' feature-extraction pipeline on
    a base model. Any head serves (jaxpeft's heads all return ``last_hidden_state``). Inputs longer than the
    model's limit are truncated unless ``truncation=False``; ``tokenize_kwargs`` go to the tokenizer.

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModel
        >>> tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hi"])})
        >>> model = AutoModel.from_config(transformers.BertConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> extractor = FeatureExtractionPipeline(model, tokenizer)
        >>> features = extractor("hi hi")  # [CLS] hi hi [SEP]
        >>> len(features), len(features[0]), len(features[0][0])
        (1, 4, 16)
        >>> [array.shape for array in extractor(["hi", "hi hi hi"], return_tensors=True)]
        [(1, 3, 16), (1, 5, 16)]
    """

    task = "feature-extraction"
    options = {"truncation": True, "max_length": None, "return_tensors": False, "tokenize_kwargs": None}

    def _run(self, items: list, batch_size: int, options: dict) -> list:
        features = [self._encode(item, truncation=options["truncation"], max_length=options["max_length"],
                                 **(options["tokenize_kwargs"] or {})) for item in items]
        read = _per_token("last_hidden_state")

        def read_checked(output, row, feature, length):
            if getattr(output, "last_hidden_state", None) is None:
                raise PipelineError("this model's output has no last_hidden_state; feature-extraction needs one.")
            return read(output, row, feature, length)

        hidden = self._batched_forward(features, batch_size, read_checked)
        return [array[None] if options["return_tensors"] else array[None].tolist() for array in hidden]


_PIPELINES: dict[str, type[Pipeline]] = {
    cls.task: cls
    for cls in (TextClassificationPipeline, TokenClassificationPipeline, TextGenerationPipeline,
                FeatureExtractionPipeline)
}
_AUTO_CLASS_OF_HEAD = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
}


def supported_tasks() -> list[str]:
    """The task names ``pipeline`` takes, aliases included.

    Example:
        >>> supported_tasks()
        ['feature-extraction', 'ner', 'sentiment-analysis', 'text-classification', 'text-generation', \
'token-classification']
    """
    return sorted([*_PIPELINES, *PIPELINE_ALIASES])


def pipeline(task: str, model: Any, tokenizer: Any = None, **kwargs: Any) -> Pipeline:
    """A pipeline that runs ``model`` on raw text for ``task``, as ``transformers.pipeline``.

    Args:
        task: ``"text-classification"`` (``"sentiment-analysis"``), ``"token-classification"`` (``"ner"``),
            ``"text-generation"`` or ``"feature-extraction"``.
        model: a ``jaxpeft.PeftModel`` (its active adapter runs), a ``jaxpeft.models`` model, or a checkpoint
            folder (loaded with the Auto class of the task).
        tokenizer: a transformers tokenizer or a folder holding one; may be left out when the model was loaded from
            a folder that holds its tokenizer.
        **kwargs: ``batch_size`` (default 8), ``buckets`` (padded lengths), and default options for every call
            (``top_k``, ``aggregation_strategy``, ``max_new_tokens``, ...; see the task's class). ``device`` and
            ``framework`` are accepted and ignored.

    Example:
        >>> import transformers
        >>> from transformers import BertTokenizer
        >>> from jaxpeft.models import AutoModelForSequenceClassification
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "i", "love", "this", "movie", "!"]
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
        >>> model = AutoModelForSequenceClassification.from_config(transformers.BertConfig(vocab_size=9,
        ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        ...     id2label={0: "NEGATIVE", 1: "POSITIVE"}))
        >>> classifier = pipeline("sentiment-analysis", model=model, tokenizer=tokenizer)
        >>> classifier("I love this movie!")  # doctest: +ELLIPSIS
        [{'label': '...', 'score': 0...}]
        >>> type(classifier).__name__, len(classifier(["I love this movie!", "this movie", "movie"]))
        ('TextClassificationPipeline', 3)
    """
    name = PIPELINE_ALIASES.get(task, task)
    if name not in _PIPELINES:
        raise PipelineError(f"unknown task {task!r}; jaxpeft's pipelines: {', '.join(supported_tasks())}.")
    cls = _PIPELINES[name]
    if isinstance(model, (str, os.PathLike)):
        from jaxpeft.models import auto

        model = auto.load_pretrained(cls.heads[0] if cls.heads else "base", model)
    return cls(model, tokenizer, **kwargs)
