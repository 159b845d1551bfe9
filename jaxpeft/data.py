"""Datasets, tokenization, collators and deterministic batch order for training.

Everything here returns plain Python or numpy values, so a collated batch goes straight into a jitted step:

- ``load_dataset_file`` / ``as_examples``: a ``.jsonl``/``.json``/``.csv``/``.tsv`` file, a list of dicts, a
  ``datasets.Dataset`` or any map-style object with ``__len__`` and ``__getitem__`` returning dicts.
- ``tokenize``: text (and text pairs, pre-split words for token classification, prompt/response pairs for
  instruction tuning) to ``input_ids`` and ``labels`` with a transformers tokenizer.
- Collators (``list[dict] -> dict[str, np.ndarray]``) that pad to a few bucketed lengths (``bucket_length``) so
  a run compiles a handful of shapes, not one per batch.
- ``batch_iterator`` / ``length_grouped_batch_iterator``: which examples make up step ``k`` of an epoch is a pure
  function of ``(seed, epoch, k)``, so a run resumed from ``(epoch, step)`` sees exactly the examples it would
  have seen.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import numbers
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value that losses skip: padding, prompt tokens, packed-example boundaries
# The files a saved transformers tokenizer may consist of: a folder holding any of them holds a tokenizer, and a
# merged checkpoint gets copies of those its source has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")
# Powers of two; a longer sequence is padded to a multiple of the last one.
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class DataError(ValueError):
    """A dataset, example or batch cannot be used as given; the message says which and how to fix it."""


# ----------------------------------------------------------------------------------------------- loading


class FileExamples(list):
    """The examples of a dataset file: a plain list of dicts that also knows the file and each example's line.

    ``path`` is the file as given; ``lines[i]`` is the line where example ``i`` ends (None when unknown, as for a
    ``.json`` list). ``tokenize`` keeps both, so later errors (``check_labels``) name the file and line.
    """

    def __init__(self, examples: Sequence[Mapping], path: str, lines: Sequence[int] | None = None):
        super().__init__(examples)
        self.path = path
        self.lines = None if lines is None else list(lines)


def example_location(examples: Sequence, index: int) -> str:
    """How an error names example ``index``: ``"example 3"``, plus its file and line when ``examples`` knows them.

    Example:
        >>> example_location([{}], 0), example_location(FileExamples([{}, {}], "train.csv", [2, 3]), 1)
        ('example 0', 'example 1 (train.csv:3)')
    """
    path = getattr(examples, "path", None)
    if path is None:
        return f"example {index}"
    lines = getattr(examples, "lines", None)
    return f"example {index} ({path}" + (f":{lines[index]})" if lines is not None else ")")


def _read_text(path: pathlib.Path) -> str:
    """The file's text, decoded as UTF-8 without a leading byte-order mark (as Excel writes one)."""
    content = path.read_bytes()
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = content.rfind(b"\n", 0, error.start) + 1
        line = content.count(b"\n", 0, error.start) + 1
        column = len(content[line_start : error.start].decode("utf-8-sig", errors="replace")) + 1
        raise DataError(
            f"{path}:{line}:{column}: byte 0x{content[error.start]:02x} is not UTF-8 text; save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _infer_column(values: list[str]) -> list[Any]:
    """A CSV column as ints if every value is one, else floats if every value is one, else the strings."""
    for kind in (int, float):
        try:
            return [kind(value) for value in values]
        except ValueError:
            continue
    return values


def _load_jsonl(path: pathlib.Path) -> FileExamples:
    examples, lines = [], []
    # Text-mode line splitting (\n, \r\n or \r), as when iterating over an open file.
    for line_number, line in enumerate(io.StringIO(_read_text(path), newline=None), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: not valid JSON ({error.msg}); each line of a .jsonl file must be one "
                "JSON object."
            ) from None
        if not isinstance(example, dict):
            raise DataError(f"{path}:{line_number}: expected a JSON object per line, got a {type(example).__name__}.")
        examples.append(example)
        lines.append(line_number)
    return FileExamples(examples, str(path), lines)


def _load_json(path: pathlib.Path) -> FileExamples:
    try:
        content = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(content, list):
        raise DataError(
            f"{path}: a .json dataset must be a list of objects, got a {type(content).__name__}; "
            "write one object per line to a .jsonl file instead if that is easier."
        )
    for index, example in enumerate(content):
        if not isinstance(example, dict):
            raise DataError(f"{path}: item {index} is a {type(example).__name__}, not a JSON object.")
    return FileExamples(content, str(path))


def _load_csv(path: pathlib.Path, delimiter: str) -> FileExamples:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames
        if not header:
            raise DataError(f"{path}: no header row; the first line must name the columns.")
        rows, lines = [], []
        for row in reader:
            # DictReader files extra fields under the key None and fills missing ones with None.
            if None in row or None in row.values():
                found = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise DataError(
                    f"{path}:{reader.line_num}: has {found} fields but the header has {len(header)}; "
                    "quote fields that contain the delimiter."
                )
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid {path.suffix[1:].upper()} ({error}).") from None
    columns = {name: _infer_column([row[name] for row in rows]) for name in header}
    examples = [{name: columns[name][i] for name in header} for i in range(len(rows))]
    return FileExamples(examples, str(path), lines)


def load_dataset_file(path: str | os.PathLike) -> FileExamples:
    """Reads a ``.jsonl`` (one object per line), ``.json`` (a list of objects), ``.csv`` or ``.tsv`` file.

    The file must be UTF-8 (a leading byte-order mark is dropped). CSV columns whose every value is an integer (or
    a number) are read as ints (floats), like pandas does; other columns stay strings. A bad row, bad JSON or a byte
    that is not UTF-8 is a one-line ``DataError`` naming the file and line (and column). The result is a list that
    also knows each example's line (``FileExamples``).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.csv"
        >>> _ = path.write_text("text,label\\ngreat movie,1\\n\\"dull, long\\",0\\n")
        >>> load_dataset_file(path)
        [{'text': 'great movie', 'label': 1}, {'text': 'dull, long', 'label': 0}]
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        examples = _load_jsonl(path)
    elif suffix == ".json":
        examples = _load_json(path)
    elif suffix in (".csv", ".tsv"):
        examples = _load_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown dataset file type {suffix!r}; use .jsonl, .json, .csv or .tsv.")
    if not examples:
        raise DataError(f"{path}: the file holds no examples.")
    return examples


class MapStyleExamples(Sequence):
    """Read-only view of a map-style dataset (``datasets.Dataset``, a torch ``Dataset``) that checks its items.

    Items are fetched on access, so a large dataset is never copied.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self.dataset[int(index)]
        if not isinstance(item, Mapping):
            raise DataError(
                f"item {index} of the {type(self.dataset).__name__} dataset is a {type(item).__name__}, not a dict; "
                "its __getitem__ must return one example as a dict of columns."
            )
        return item

    @property
    def column_names(self) -> list[str]:
        names = getattr(self.dataset, "column_names", None)
        return list(names) if names is not None else list(self[0])


def as_examples(dataset: Any) -> Sequence[Mapping]:
    """The examples of ``dataset`` as a sequence of dicts.

    Accepts a list (or tuple) of dicts, a file path (see ``load_dataset_file``), a ``datasets.Dataset`` or any
    map-style object with ``__len__`` and ``__getitem__(int)`` returning a dict (a torch ``Dataset``). Map-style
    objects are wrapped, not copied. An empty dataset is an error.

    Example:
        >>> class Reviews:  # a torch.utils.data.Dataset-style object
        ...     def __len__(self):
        ...         return 2
        ...     def __getitem__(self, index):
        ...         return {"text": ["good", "bad"][index], "label": 1 - index}
        >>> examples = as_examples(Reviews())
        >>> len(examples), examples[1]
        (2, {'text': 'bad', 'label': 0})
    """
    if isinstance(dataset, (str, os.PathLike)):
        return load_dataset_file(dataset)
    if isinstance(dataset, Mapping):
        raise DataError(
            "a dict is not a dataset; pass a list of example dicts (from columns: "
            "[dict(zip(columns, row)) for row in zip(*columns.values())])."
        )
    if isinstance(dataset, (list, tuple)):
        for index, example in enumerate(dataset):
            if not isinstance(example, Mapping):
                raise DataError(f"{example_location(dataset, index)} is a {type(example).__name__}, not a dict of "
                                "columns.")
        examples: Sequence[Mapping] = (FileExamples(dataset, dataset.path, dataset.lines)
                                       if isinstance(dataset, FileExamples) else list(dataset))
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        examples = MapStyleExamples(dataset)
    else:
        raise DataError(
            f"a {type(dataset).__name__} is not a map-style dataset (it needs __len__ and __getitem__); "
            "wrap an iterable in list(...)."
        )
    if len(examples) == 0:
        raise DataError("the dataset is empty; training and evaluation need at least one example.")
    if isinstance(examples, MapStyleExamples):
        examples[0]  # fails early, with the message above, when items are not dicts
    return examples


# ------------------------------------------------------------------------------------------ tokenization


def _column(example: Mapping, key: str, index: int, option: str) -> Any:
    if key not in example:
        raise DataError(
            f"example {index} has no {key!r} column (it has {sorted(example)}); pass {option}= naming the column."
        )
    return example[key]


def _class_label(value: Any, index: int, label2id: Mapping[str, int] | None) -> int | float | list[float]:
    """One example's sequence label: an int class, a float (regression) or a list of floats (multi-label)."""
    if isinstance(value, str):
        if label2id is None:
            raise DataError(
                f"example {index} has the string label {value!r}; pass label2id={{...}} mapping label names to ints."
            )
        if value not in label2id:
            raise DataError(f"example {index} has label {value!r}, which is not in label2id {sorted(label2id)}.")
        return int(label2id[value])
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple, np.ndarray)) and all(
        isinstance(v, (int, float, np.integer, np.floating)) for v in value
    ):
        return [float(v) for v in value]
    raise DataError(
        f"example {index} has a label of type {type(value).__name__}; use an int class id, a float (regression), "
        "a list of 0/1 (multi-label) or a string with label2id."
    )


def _word_labels(words: list, value: Any, word_ids: list, index: int, label2id) -> list[int]:
    """Word-level labels spread over sub-tokens: a word's first token keeps its label, the rest and specials -100."""
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != len(words):
        length = len(value) if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__
        raise DataError(
            f"example {index} has {len(words)} words but its labels are {length}; token classification needs one "
            "label per word."
        )
    per_word = []
    for label in value:
        if isinstance(label, str) and label2id is not None and label in label2id:
            per_word.append(int(label2id[label]))
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            per_word.append(int(label))
        else:
            raise DataError(
                f"example {index} has the word label {label!r}; word labels must be ints (or strings with label2id)."
            )
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else per_word[word])
        previous = word
    return labels


def _instruction_features(prompt, response, tokenizer, max_length: int, add_eos: bool, index: int) -> dict:
    for name, text in (("prompt", prompt), ("response", response)):
        if not isinstance(text, str):
            raise DataError(f"example {index}: the {name} is a {type(text).__name__}, not a string.")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        response_ids.append(eos)
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def tokenize(
    examples: Any,
    tokenizer: Any,
    *,
    text_key: str = "text",
    text_pair_key: str | None = None,
    label_key: str | None = "label",
    max_length: int = 512,
    prompt_key: str | None = None,
    response_key: str | None = None,
    label2id: Mapping[str, int] | None = None,
    add_eos: bool = True,
    num_labels: int | None = None,
) -> list[dict]:
    """Tokenizes every example of a dataset (any form ``as_examples`` accepts) into features for a collator.

    Each feature holds ``input_ids`` (``token_type_ids`` too when the tokenizer makes them) and ``labels``:

    - Sequence classification: ``examples[label_key]`` is an int class (a string with ``label2id``), a float
      (regression) or a list of 0/1 (multi-label). ``text_pair_key`` adds the second text of a pair.
    - Token classification: ``examples[text_key]`` is a list of words and ``examples[label_key]`` one int per
      word; a word's first sub-token gets its label, other sub-tokens and special tokens get -100.
    - Causal LM on plain text: ``label_key=None``; the collator copies ``input_ids`` into the labels.
    - Causal LM on instruction data: ``prompt_key`` and ``response_key`` name the two columns. They are tokenized
      separately (the prompt with the tokenizer's special tokens, the response without, then the EOS token when
      ``add_eos`` and the tokenizer has one) and concatenated, so put the separating space or newline inside
      the prompt or the response text as the model's format expects. Prompt tokens get label -100.

    Sequences longer than ``max_length`` are truncated at the end. Classification labels are checked with
    ``check_labels`` against ``num_labels`` (the model's number of outputs, when given): a label out of range, a
    negative one or a fraction where class ids are expected is a ``DataError`` naming the example (and its file
    and line). With ``num_labels > 1``, whole floats (``1.0``) become ints. The features of a file's examples
    (``FileExamples``) keep its path and lines.

    Example:
        >>> from transformers import BertTokenizer
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film", "dull"]
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
        >>> tokenize([{"text": "good film", "label": 1}, {"text": "dull", "label": 0}], tokenizer)
        [{'input_ids': [2, 4, 5, 3], 'token_type_ids': [0, 0, 0, 0], 'labels': 1}, \
{'input_ids': [2, 6, 3], 'token_type_ids': [0, 0, 0], 'labels': 0}]
        >>> tokenize([{"q": "good", "a": "film"}], tokenizer, prompt_key="q", response_key="a")
        [{'input_ids': [2, 4, 3, 5], 'labels': [-100, -100, -100, 5]}]
    """
    examples = as_examples(examples)
    if (prompt_key is None) != (response_key is None):
        raise DataError("instruction data needs both prompt_key= and response_key= (or neither).")
    if max_length < 1:
        raise DataError(f"max_length={max_length} must be a positive number of tokens.")
    features = FileExamples([], examples.path, examples.lines) if isinstance(examples, FileExamples) else []
    for index in range(len(examples)):
        example = examples[index]
        if prompt_key is not None:
            prompt = _column(example, prompt_key, index, "prompt_key")
            response = _column(example, response_key, index, "response_key")
            features.append(_instruction_features(prompt, response, tokenizer, max_length, add_eos, index))
            continue
        text = _column(example, text_key, index, "text_key")
        pair = None if text_pair_key is None else _column(example, text_pair_key, index, "text_pair_key")
        words = isinstance(text, (list, tuple))
        if not (isinstance(text, str) or (words and all(isinstance(word, str) for word in text))):
            raise DataError(
                f"example {index}: {text_key!r} is a {type(text).__name__}; it must be a string (or a list of word "
                "strings for token classification)."
            )
        encoding = tokenizer(text, pair, truncation=True, max_length=max_length, is_split_into_words=words)
        feature = {"input_ids": list(encoding["input_ids"])}
        if "token_type_ids" in encoding:
            feature["token_type_ids"] = list(encoding["token_type_ids"])
        if label_key is not None:
            value = _column(example, label_key, index, "label_key")
            if words:
                feature["labels"] = _word_labels(text, value, encoding.word_ids(), index, label2id)
            else:
                feature["labels"] = _class_label(value, index, label2id)
        features.append(feature)
    if label_key is not None and prompt_key is None:
        token_level = isinstance(examples[0].get(text_key), (list, tuple))
        check_labels(features, num_labels, "token_cls" if token_level else "seq_cls")
        if not token_level and num_labels is not None and num_labels > 1:
            for feature in features:
                if isinstance(feature["labels"], float):
                    feature["labels"] = int(feature["labels"])  # check_labels let only whole numbers through
    return features


# ------------------------------------------------------------------------------------------------ labels

LABEL_TASKS = ("seq_cls", "token_cls", "causal_lm")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real)  # numpy scalars too


def _class_id_problem(label: Any, num_labels: int | None, negative_hint: str) -> str | None:
    """Why ``label`` is not a class id below ``num_labels`` (None when it is one)."""
    if not _is_number(label):
        return f"label {label!r} is a {type(label).__name__}, not an integer class id"
    if not math.isfinite(label) or not float(label).is_integer():
        return (f"label {label!r} is not a class id; classification needs integer labels (float labels mean "
                "regression, which needs a num_labels=1 model)")
    if label < 0:
        return f"label {int(label)} is negative; {negative_hint}"
    if num_labels is not None and label >= num_labels:
        return (f"label {int(label)} is out of range for {num_labels} classes (0..{num_labels - 1}); fix the label or "
                "set num_labels to the number of classes")
    return None


def _sequence_label_problem(label: Any, num_labels: int | None) -> str | None:
    """Why one example's label does not suit a sequence classifier with ``num_labels`` outputs (None if it does)."""
    if isinstance(label, str):
        return f"label {label!r} is a string; map label names to ints (tokenize(..., label2id={{...}}))"
    if isinstance(label, (list, tuple, np.ndarray)):  # multi-label: one 0..1 target per class
        if num_labels is not None and len(label) != num_labels:
            return f"the multi-label target has {len(label)} values for {num_labels} classes"
        bad = next((value for value in label if not (_is_number(value) and 0 <= value <= 1)), None)
        return None if bad is None else f"multi-label target {bad!r} is not a number in [0, 1]"
    if num_labels is None or num_labels == 1:  # unknown (the label may be a regression target), or regression
        if not (_is_number(label) and math.isfinite(label)):
            model = "" if num_labels is None else ", which a regression (num_labels=1) model needs"
            return f"label {label!r} is not a finite number{model}"
        return None
    return _class_id_problem(label, num_labels, f"class ids run 0..{num_labels - 1}")


def _token_labels_problem(labels: Any, num_labels: int | None) -> str | None:
    """Why one example's per-token labels are not class ids (or -100, ignored) below ``num_labels``."""
    if not isinstance(labels, (list, tuple, np.ndarray)):
        return f"labels {labels!r} are not a list with one label per token"
    hint = f"only {IGNORE_INDEX} (a token the loss skips) may be negative"
    for position, label in enumerate(labels):
        problem = None if label == IGNORE_INDEX else _class_id_problem(label, num_labels, hint)
        if problem is not None:
            return f"token {position}: {problem}"
    return None


def _indexed_labels(features: Sequence[Mapping]) -> list[tuple[int, Any]]:
    """``(index, labels)`` of every example that has labels."""
    labelled = []
    for index in range(len(features)):
        feature = features[index]
        if "labels" in feature or "label" in feature:
            labelled.append((index, _labels_of(feature, index)))
    return labelled


def _first_label_problem(labelled: list[tuple[int, Any]], num_labels: int | None, task: str) -> tuple[int, str] | None:
    """``(index, problem)`` of the first example whose labels do not suit the model (None when all do)."""
    problem_of = _sequence_label_problem if task == "seq_cls" else _token_labels_problem
    for index, labels in labelled:
        problem = problem_of(labels, num_labels)
        if problem is not None:
            return index, problem
    return None


def _class_ids(labels: Sequence[Any], task: str) -> set | None:
    """The class ids the examples' labels hold (token labels without -100); None unless every label is a class id
    (regression targets, multi-label lists)."""
    if task == "token_cls":
        labels = [label for tokens in labels for label in tokens if label != IGNORE_INDEX]
    if not all(_is_number(label) and float(label).is_integer() for label in labels):
        return None
    return {int(label) for label in labels}


def check_labels(features: Sequence[Mapping], num_labels: int | None, task: str, *, training: bool = False) -> None:
    """Checks every example's ``labels`` (or ``label``) for a model with ``num_labels`` outputs; a one-line
    ``DataError`` names the first bad example (and its file and line when ``features`` come from a file).

    ``task`` is ``"seq_cls"``, ``"token_cls"`` or ``"causal_lm"`` (HF's ``"SEQ_CLS"``... too):

    - class ids must be integers (a float is accepted when it is whole, ``1.0``), not negative and below
      ``num_labels`` (not checked when it is None); token labels (``token_cls``, and ``causal_lm`` labels against
      ``num_labels=vocab_size``) may also be -100, which the loss skips;
    - ``num_labels=1`` is regression: every label must be a finite number;
    - a list label (multi-label) needs ``num_labels`` values in [0, 1];
    - ``training=True`` also refuses classification data that holds a single class: the classifier would learn
      nothing.

    Examples without labels are skipped (a causal LM's collator copies ``input_ids``).

    Example:
        >>> check_labels([{"labels": 0}, {"labels": 1}], 2, "seq_cls", training=True)
        >>> check_labels([{"labels": 0}, {"labels": 2}], 2, "seq_cls")
        Traceback (most recent call last):
        ...
        jaxpeft.data.DataError: example 1: label 2 is out of range for 2 classes (0..1); fix the label or set \
num_labels to the number of classes.
    """
    task = str(task).lower()
    if task not in LABEL_TASKS:
        raise DataError(f"check_labels has no task {task!r}; use one of {', '.join(LABEL_TASKS)}.")
    if num_labels is not None and not (isinstance(num_labels, numbers.Integral) and num_labels >= 1):
        raise DataError(f"num_labels={num_labels!r} must be a positive integer (or None when unknown).")
    labelled = _indexed_labels(features)
    found = _first_label_problem(labelled, num_labels, task)
    if found is not None:
        raise DataError(f"{example_location(features, found[0])}: {found[1]}.")
    if training and task != "causal_lm" and num_labels != 1:
        classes = _class_ids([labels for _, labels in labelled], task)
        if classes is not None and len(classes) == 1:
            where = f" ({features.path})" if getattr(features, "path", None) else ""
            raise DataError(
                f"training data{where} has a single class (every label is {classes.pop()}); a classifier needs at "
                "least two: check the label column, or train on more of the data."
            )


# ------------------------------------------------------------------------------------------------ padding


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS, *, max_length: int | None = None) -> int:
    """The padded length for a batch whose longest sequence has ``n`` tokens.

    The smallest of ``buckets`` (ascending) that holds ``n``; past the last bucket, the next multiple of it;
    never more than ``max_length``. For "a multiple of 16" pass ``buckets=range(16, 4097, 16)``.

    Example:
        >>> bucket_length(5), bucket_length(100), bucket_length(70, max_length=80), bucket_length(9000)
        (16, 128, 80, 12288)
    """
    buckets = tuple(buckets)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(buckets):
        raise DataError(f"buckets={buckets} must be a non-empty ascending sequence of positive lengths.")
    if max_length is not None and n > max_length:
        raise DataError(
            f"a sequence of {n} tokens is longer than max_length={max_length}; truncate when tokenizing "
            f"(tokenize(..., max_length={max_length}))."
        )
    length = next((b for b in buckets if b >= n), None)
    if length is None:
        length = math.ceil(n / buckets[-1]) * buckets[-1]
    return length if max_length is None else min(length, max_length)


def pad_sequences(sequences: Sequence[Sequence[int]], length: int, value: int, *, side: str = "right") -> np.ndarray:
    """Stacks integer sequences into an ``int32`` array ``(len(sequences), length)`` filled with ``value``.

    Example:
        >>> pad_sequences([[5, 6, 7], [8]], 4, 0).tolist()
        [[5, 6, 7, 0], [8, 0, 0, 0]]
        >>> pad_sequences([[5, 6, 7], [8]], 4, 0, side="left").tolist()
        [[0, 5, 6, 7], [0, 0, 0, 8]]
    """
    if side not in ("right", "left"):
        raise DataError(f"padding side {side!r} must be 'right' or 'left'.")
    out = np.full((len(sequences), length), value, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        if n > length:
            raise DataError(f"sequence {row} has {n} tokens, more than the padded length {length}.")
        if n:
            if side == "right":
                out[row, :n] = sequence
            else:
                out[row, length - n :] = sequence
    return out


def _token_id(value: Any) -> int | None:
    """``value`` as a token id: the first of a list (Llama 3's ``eos_token_id``), None unless an integer."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def resolve_pad_token_id(tokenizer: Any = None, model_config: Any = None, *, default: int | None = 0) -> int | None:
    """The id that pads ``input_ids``, chosen the same way by ``Trainer``, the pipelines and the collators: the
    first that is set of

    1. the model config's ``pad_token_id``: the padding the model itself recognises (transformers' decoder
       classifiers without a mask, RoBERTa's position ids);
    2. the tokenizer's ``pad_token_id``;
    3. the tokenizer's ``eos_token_id`` (padding is masked out, so EOS serves when there is no pad token);
    4. the model config's ``eos_token_id`` (the first of a list);
    5. ``default``.

    Example:
        >>> from types import SimpleNamespace as Namespace
        >>> tokenizer = Namespace(pad_token_id=None, eos_token_id=2)
        >>> resolve_pad_token_id(tokenizer, Namespace(pad_token_id=0)), resolve_pad_token_id(tokenizer)
        (0, 2)
        >>> resolve_pad_token_id(None, Namespace(eos_token_id=[128001, 128009])), resolve_pad_token_id()
        (128001, 0)
    """
    candidates = (
        getattr(model_config, "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model_config, "eos_token_id", None),
    )
    return next((token for token in map(_token_id, candidates) if token is not None), default)


def _collator_pad_token_id(tokenizer: Any, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    if tokenizer is None:
        raise DataError("a collator needs the tokenizer or pad_token_id= to know the padding token.")
    resolved = resolve_pad_token_id(tokenizer, default=None)
    if resolved is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id=.")
    return resolved


def _token_features(features: Sequence[Mapping], what: str) -> list[Mapping]:
    if not features:
        raise DataError(f"{what} got an empty batch.")
    for index, feature in enumerate(features):
        if "input_ids" not in feature:
            raise DataError(
                f"batch item {index} has no 'input_ids' (it has {sorted(feature)}); tokenize the dataset first "
                "(jaxpeft.data.tokenize)."
            )
    return list(features)


def _labels_of(feature: Mapping, index: int) -> Any:
    for key in ("labels", "label"):
        if key in feature:
            return feature[key]
    raise DataError(f"batch item {index} has no 'labels' (it has {sorted(feature)}); tokenize with label_key=.")


class _PaddingCollator:
    """Shared padding settings of the collators below."""

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
        max_length: int | None = None,
        padding_side: str = "right",
    ):
        if padding_side not in ("right", "left"):
            raise DataError(f"padding_side={padding_side!r} must be 'right' or 'left'.")
        self.pad_token_id = _collator_pad_token_id(tokenizer, pad_token_id)
        self.buckets = None if buckets is None else tuple(buckets)
        self.max_length = max_length
        self.padding_side = padding_side

    def padded_length(self, longest: int) -> int:
        """Bucketed length for a batch (``buckets=None``: the longest sequence, so one shape per length)."""
        if self.buckets is None:
            if self.max_length is not None and longest > self.max_length:
                return bucket_length(longest, (longest,), max_length=self.max_length)  # raises the length error
            return longest
        return bucket_length(longest, self.buckets, max_length=self.max_length)

    def pad_inputs(self, features: list[Mapping], length: int | None = None) -> tuple[dict[str, np.ndarray], int]:
        """``input_ids``, ``attention_mask`` (the features' own, e.g. packed segment ids, else 1 on every token; 0
        on padding) and ``token_type_ids`` when the features have them, padded."""
        ids = [list(f["input_ids"]) for f in features]
        if length is None:
            length = self.padded_length(max(len(i) for i in ids))
        side = self.padding_side
        batch = {
            "input_ids": pad_sequences(ids, length, self.pad_token_id, side=side),
            "attention_mask": pad_sequences(
                [list(f.get("attention_mask", [1] * len(i))) for f, i in zip(features, ids, strict=True)], length, 0,
                side=side,
            ),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad_sequences([f["token_type_ids"] for f in features], length, 0, side=side)
        return batch, length


class _LabelledCollator(_PaddingCollator):
    """A padding collator that also checks each batch's labels (``check_labels``) against ``num_labels``, the
    model's number of outputs (None: unknown)."""

    task = ""

    def __init__(self, tokenizer: Any = None, *, num_labels: int | None = None, **padding: Any):
        super().__init__(tokenizer, **padding)
        self.num_labels = num_labels

    def check_batch_labels(self, features: Sequence[Mapping]) -> None:
        found = _first_label_problem(_indexed_labels(features), self.num_labels, self.task)
        if found is not None:
            raise DataError(f"batch item {found[0]}: {found[1]}.")


class SequenceClassificationCollator(_LabelledCollator):
    """Pads a batch of tokenized examples; ``labels`` are ``int32 (batch,)`` classes or ``float32`` targets.

    Float labels (regression) give ``float32 (batch,)`` and lists (multi-label) ``float32 (batch, num_labels)``.
    With ``num_labels`` (the model's outputs) every batch's labels are checked as ``check_labels`` does, and for
    a classifier (``num_labels > 1``) whole floats (``1.0``) become class ids.

    Example:
        >>> collate = SequenceClassificationCollator(pad_token_id=0, buckets=(4, 8))
        >>> batch = collate([{"input_ids": [2, 4, 5, 3], "labels": 1}, {"input_ids": [2, 6, 3], "labels": 0}])
        >>> {name: array.tolist() for name, array in batch.items()}
        {'input_ids': [[2, 4, 5, 3], [2, 6, 3, 0]], 'attention_mask': [[1, 1, 1, 1], [1, 1, 1, 0]], 'labels': [1, 0]}
    """

    task = "seq_cls"

    def __call__(self, features: Sequence[Mapping]) -> dict[str, np.ndarray]:
        features = _token_features(features, "SequenceClassificationCollator")
        batch, _ = self.pad_inputs(features)
        labels = []
        for index, feature in enumerate(features):
            label = _labels_of(feature, index)
            if isinstance(label, str):
                raise DataError(
                    f"batch item {index} has the string label {label!r}; map label names to ints when tokenizing "
                    "(tokenize(..., label2id={...}))."
                )
            labels.append(_class_label(label, index, None))
        self.check_batch_labels(features)
        if self.num_labels is not None and self.num_labels > 1:  # whole floats (checked) are class ids
            labels = [int(label) if isinstance(label, float) else label for label in labels]
        if all(isinstance(label, int) for label in labels):
            batch["labels"] = np.asarray(labels, dtype=np.int32)
        elif all(isinstance(label, (int, float)) for label in labels):
            batch["labels"] = np.asarray(labels, dtype=np.float32)
        elif all(isinstance(label, list) and len(label) == len(labels[0]) for label in labels):
            batch["labels"] = np.asarray(labels, dtype=np.float32)
        else:
            raise DataError("the labels of a batch mix lists and numbers, or lists of different lengths.")
        return batch


class TokenClassificationCollator(_LabelledCollator):
    """Pads a batch for token classification: ``labels`` are ``int32 (batch, length)`` with -100 on padding.

    Every batch's labels are checked as ``check_labels`` does (against ``num_labels`` when given).

    Example:
        >>> collate = TokenClassificationCollator(pad_token_id=0, buckets=(4,))
        >>> batch = collate([{"input_ids": [2, 4, 3], "labels": [-100, 1, -100]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[2, 4, 3, 0]], [[-100, 1, -100, -100]])
    """

    task = "token_cls"

    def __call__(self, features: Sequence[Mapping]) -> dict[str, np.ndarray]:
        features = _token_features(features, "TokenClassificationCollator")
        batch, length = self.pad_inputs(features)
        labels = []
        for index, feature in enumerate(features):
            label = _labels_of(feature, index)
            if not isinstance(label, (list, tuple, np.ndarray)) or len(label) != len(feature["input_ids"]):
                raise DataError(
                    f"batch item {index}: token classification needs one label per token "
                    f"({len(feature['input_ids'])}), got {label!r}; tokenize words with their word labels."
                )
            labels.append(label)
        self.check_batch_labels(features)
        batch["labels"] = pad_sequences(labels, length, IGNORE_INDEX, side=self.padding_side)
        return batch


def pack_examples(features: Sequence[Mapping], max_length: int) -> list[dict]:
    """Packs tokenized causal-LM examples into rows of at most ``max_length`` tokens, best fit first.

    Each example, in order, goes into the row with the least room that still holds it (a new row when none does),
    so later short examples fill the gaps that earlier long ones left; an example longer than ``max_length`` is
    truncated to it. Each row holds ``input_ids``, ``labels`` (the example's labels, or its ``input_ids``, with -100
    on each example's first token so no loss crosses from one example into the next), ``position_ids`` that
    restart at 0 for each example, and an ``attention_mask`` of *segment ids*: 1 on the row's first example, 2 on
    the second, ... (0 is padding). The ``jaxpeft.models`` families attend only within a segment
    (``attention.AttentionMask``), so a packed row computes what its examples would one by one.

    Example:
        >>> rows = pack_examples([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 1, 2]}, {"input_ids": [4, 4]}], 5)
        >>> [(row["input_ids"], row["labels"], row["position_ids"], row["attention_mask"]) for row in rows]
        [([5, 6, 7, 4, 4], [-100, 6, 7, -100, 4], [0, 1, 2, 0, 1], [1, 1, 1, 2, 2]), \
([8, 9, 1, 2], [-100, 9, 1, 2], [0, 1, 2, 3], [1, 1, 1, 1])]
    """
    if max_length < 1:
        raise DataError(f"packing needs a positive max_length, got {max_length}.")
    features = _token_features(features, "pack_examples")
    rows: list[dict] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of the rows, sorted
    for index, feature in enumerate(features):
        ids = list(feature["input_ids"])[:max_length]
        labels = list(feature.get("labels", feature["input_ids"]))[:max_length]
        if len(labels) != len(ids):
            raise DataError(f"example {index} has {len(labels)} labels for {len(ids)} tokens.")
        if not ids:
            continue
        labels[0] = IGNORE_INDEX
        fit = bisect.bisect_left(room, (len(ids), -1))
        if fit == len(room):
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []})
            free, row_index = max_length, len(rows) - 1
        else:
            free, row_index = room.pop(fit)
        _append_example(rows[row_index], ids, labels)
        bisect.insort(room, (free - len(ids), row_index))
    return rows


def _append_example(row: dict, ids: list, labels: list) -> None:
    """Adds one example to a packed row as its next segment."""
    segment = (row["attention_mask"][-1] + 1) if row["attention_mask"] else 1
    row["input_ids"] += ids
    row["labels"] += labels
    row["position_ids"] += list(range(len(ids)))
    row["attention_mask"] += [segment] * len(ids)


class CausalLMCollator(_PaddingCollator):
    """Pads (or packs) a batch for causal LM training: ``labels`` are the ``input_ids`` with -100 on padding.

    Features with their own ``labels`` (instruction data from ``tokenize(..., prompt_key=, response_key=)``) keep
    them, so prompt tokens stay -100. Labels are not shifted: the model's loss predicts token ``t + 1`` from
    position ``t``, as in transformers. Padding is on the right by default (``padding_side="left"`` for batches
    that continue generating).

    With ``packing=True`` (needs ``max_length``) the batch's examples are packed into rows of ``max_length``
    tokens by ``pack_examples`` (examples see only themselves: ``attention_mask`` holds segment ids; their labels
    and ``position_ids`` restart), and the batch also holds ``position_ids``. The number of rows depends on the
    examples' lengths; for one fixed shape, pack the whole dataset once with ``pack_examples`` and batch the rows
    with this collator (``packing=False``, the same ``max_length``), which keeps the rows' segments and positions
    (what ``TrainingArguments(packing=True)`` does).

    Example:
        >>> collate = CausalLMCollator(pad_token_id=0, buckets=(4,))
        >>> batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
        >>> batch["labels"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7, -100], [-100, 6, 7, -100]], [[1, 1, 1, 0], [1, 1, 1, 0]])
        >>> packed = CausalLMCollator(pad_token_id=0, max_length=6, packing=True)([{"input_ids": [5, 6]}] * 4)
        >>> packed["input_ids"].tolist(), packed["labels"].tolist(), packed["position_ids"].tolist()
        ([[5, 6, 5, 6, 5, 6], [5, 6, 0, 0, 0, 0]], [[-100, 6, -100, 6, -100, 6], [-100, 6, -100, -100, -100, -100]], \
[[0, 1, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]])
    """

    def __init__(self, tokenizer: Any = None, *, packing: bool = False, **padding: Any):
        super().__init__(tokenizer, **padding)
        if packing and self.max_length is None:
            raise DataError("packing=True needs max_length=, the length of a packed row.")
        self.packing = packing

    def __call__(self, features: Sequence[Mapping]) -> dict[str, np.ndarray]:
        features = _token_features(features, "CausalLMCollator")
        if self.packing:
            features = pack_examples(features, self.max_length)
        # A packed row is padded to the full row length so every packed batch has the same width.
        batch, length = self.pad_inputs(features, self.max_length if self.packing else None)
        labels = []
        for index, feature in enumerate(features):
            label = list(feature.get("labels", feature["input_ids"]))
            if len(label) != len(feature["input_ids"]):
                raise DataError(f"batch item {index} has {len(label)} labels for {len(feature['input_ids'])} tokens.")
            labels.append(label)
        batch["labels"] = pad_sequences(labels, length, IGNORE_INDEX, side=self.padding_side)
        if "position_ids" in features[0]:
            batch["position_ids"] = pad_sequences(
                [f["position_ids"] for f in features], length, 0, side=self.padding_side
            )
        return batch


# ------------------------------------------------------------------------------------------- batch order


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool = True) -> int:
    """Number of batches in one epoch.

    Example:
        >>> num_batches(10, 4), num_batches(10, 4, drop_last=False)
        (2, 3)
    """
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def _check_order_args(num_examples: int, batch_size: int, seed: int, epoch: int, start_step: int, drop_last: bool):
    if num_examples < 1:
        raise DataError("the dataset is empty; there is nothing to batch.")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1.")
    if seed < 0 or epoch < 0:
        raise DataError(f"seed={seed} and epoch={epoch} must be non-negative integers.")
    total = num_batches(num_examples, batch_size, drop_last=drop_last)
    if total == 0:
        raise DataError(
            f"{num_examples} examples make no full batch of {batch_size}; lower batch_size or pass drop_last=False."
        )
    if not 0 <= start_step <= total:
        raise DataError(f"start_step={start_step} is outside the epoch's {total} batches (0..{total}).")


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which an epoch visits the examples: a permutation that depends only on ``(seed, epoch)``.

    Example:
        >>> bool((epoch_order(5, seed=0, epoch=1) == epoch_order(5, seed=0, epoch=1)).all())
        True
        >>> epoch_order(5, seed=0, epoch=1, shuffle=False).tolist()
        [0, 1, 2, 3, 4]
    """
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


def batch_iterator(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[np.ndarray]:
    """Yields the example indices of each batch of an epoch, from ``start_step`` on.

    Batch ``k`` is a pure function of ``(seed, epoch, k)``: a run resumed from a checkpoint's ``(epoch, step)``
    continues with exactly the examples it would have seen. ``drop_last=True`` (the default, for training) leaves
    out the last partial batch so every step has the same shape.

    Example:
        >>> [b.tolist() for b in batch_iterator(6, 2, seed=0, epoch=0, shuffle=False)]
        [[0, 1], [2, 3], [4, 5]]
        >>> whole = [b.tolist() for b in batch_iterator(6, 2, seed=3, epoch=1)]
        >>> whole[1:] == [b.tolist() for b in batch_iterator(6, 2, seed=3, epoch=1, start_step=1)]
        True
    """
    _check_order_args(num_examples, batch_size, seed, epoch, start_step, drop_last)
    order = epoch_order(num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
    for step in range(start_step, num_batches(num_examples, batch_size, drop_last=drop_last)):
        yield order[step * batch_size : (step + 1) * batch_size]


def length_grouped_batch_iterator(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    drop_last: bool = True,
    group_batches: int = 50,
) -> Iterator[np.ndarray]:
    """Like ``batch_iterator``, but each batch holds examples of similar ``lengths``, so less of it is padding.

    The epoch's shuffled order is cut into groups of ``group_batches * batch_size`` examples; each group is
    sorted by length (longest first) and cut into batches; the full batches are then shuffled (a partial last
    batch stays last). Everything depends only on ``(seed, epoch)``, so resuming at ``start_step`` is exact.

    Example:
        >>> lengths = [3, 90, 5, 88, 4, 91]
        >>> batches = [b.tolist() for b in length_grouped_batch_iterator(lengths, 2, seed=0, epoch=0)]
        >>> sorted(sorted(lengths[i] for i in b) for b in batches)
        [[3, 4], [5, 88], [90, 91]]
    """
    lengths = np.asarray(lengths)
    num_examples = len(lengths)
    if group_batches < 1:
        raise DataError(f"group_batches={group_batches} must be at least 1.")
    _check_order_args(num_examples, batch_size, seed, epoch, start_step, drop_last)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    group_size = group_batches * batch_size
    full, partial = [], []
    for start in range(0, num_examples, group_size):
        group = order[start : start + group_size]
        group = group[np.argsort(-lengths[group], kind="stable")]
        for offset in range(0, len(group), batch_size):
            batch = group[offset : offset + batch_size].astype(np.int64)
            (full if len(batch) == batch_size else partial).append(batch)
    batches = [full[i] for i in rng.permutation(len(full))] + ([] if drop_last else partial)
    yield from batches[start_step:]


def collated_batches(
    dataset: Any,
    collator: Any,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``collator(examples of batch k)`` for each batch of ``batch_iterator`` (same arguments).

    Example:
        >>> data = [{"input_ids": [5] * n} for n in (1, 2, 3, 4)]
        >>> collate = CausalLMCollator(pad_token_id=0, buckets=(4, 8))
        >>> [b["input_ids"].shape for b in collated_batches(data, collate, 2, seed=0, epoch=0)]
        [(2, 4), (2, 4)]
    """
    examples = as_examples(dataset)
    for indices in batch_iterator(
        len(examples), batch_size, seed=seed, epoch=epoch, start_step=start_step, shuffle=shuffle, drop_last=drop_last
    ):
        yield collator([examples[int(i)] for i in indices])
