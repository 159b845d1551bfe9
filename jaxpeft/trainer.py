"""``Trainer`` and ``TrainingArguments``: transformers' training workflow for a ``PeftModel``.

The loop is ``jaxpeft.training``'s jitted step (only the trainable subtree is differentiated, its buffers donated)
over ``jaxpeft.data``'s deterministic batches; checkpoints are ``jaxpeft.checkpoints`` (Orbax) of what training
changes: trainable leaves, optimizer state, step, key and data position. Everything a run writes goes to
``args.output_dir``:

- ``metrics.jsonl``: one JSON object per log line (training loss, learning rate, gradient norm, throughput) and
  per evaluation (``eval_loss`` and the other ``eval_*`` metrics);
- ``training_curves.png``: the training loss and the evaluation metrics against the step;
- ``checkpoints/<step>/``: Orbax checkpoints (``save_total_limit`` kept, plus the best one by
  ``metric_for_best_model``);
- ``save_model()``: the adapter in the HF PEFT format (``adapter_config.json``, ``adapter_model.safetensors``).

A run is reproducible: dropout keys are ``fold_in(seed, step)`` and batch ``k`` of epoch ``e`` depends only on
``(seed, e, k)``, so a run resumed from a checkpoint (``train(resume_from_checkpoint=True)``) logs the same losses,
bit for bit, as one that was never interrupted.

Example:
    >>> import tempfile, transformers, jaxpeft
    >>> from jaxpeft.models import AutoModelForSequenceClassification
    >>> base = AutoModelForSequenceClassification.from_config(transformers.BertConfig(vocab_size=20,
    ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2))
    >>> model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2))
    >>> data = [{"input_ids": [1, 5 + label, 2], "labels": label} for label in (0, 1) * 8]
    >>> with tempfile.TemporaryDirectory() as out:
    ...     args = TrainingArguments(out, max_steps=4, learning_rate=1e-2, disable_tqdm=True)
    ...     trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    ...     result = trainer.train()
    ...     metrics = trainer.evaluate()
    >>> result.global_step, sorted(metrics)[:2]
    (4, ['epoch', 'eval_accuracy'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import data as data_lib
from jaxpeft import optimizers, outputs, pipelines, sharding, training
from jaxpeft.losses import DEFAULT_CHUNK_SIZE
from jaxpeft.tree import ADAPTER_KEYS, combine, partition

logger = logging.getLogger("jaxpeft")

STRATEGIES = ("no", "steps", "epoch")
TEXT_COLUMNS = ("text", "sentence", "content")
INSTRUCTION_COLUMNS = (("prompt", "completion"), ("prompt", "response"), ("instruction", "output"))


class TrainingStopped(RuntimeError):
    """Training cannot go on (a loss that is not finite); the message names the step and the last good checkpoint."""


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


class EvalPrediction(NamedTuple):
    """What ``compute_metrics`` receives: ``predictions`` (the logits) and ``label_ids``, numpy arrays; token-level
    ones padded with -100 to the longest sequence of the dataset."""

    predictions: np.ndarray
    label_ids: np.ndarray | None


class PredictionOutput(NamedTuple):
    predictions: np.ndarray
    label_ids: np.ndarray | None
    metrics: dict


@dataclasses.dataclass
class TrainingArguments:
    """The settings of a run, named and defaulted as transformers' ``TrainingArguments`` where it has them.

    One optimizer step takes ``per_device_train_batch_size * data-parallel devices * gradient_accumulation_steps``
    examples (the batch is split into ``gradient_accumulation_steps`` micro-batches run one after another). ``mesh``
    (``"data=4,fsdp=2"``, see ``jaxpeft.sharding``) shards the run over devices: the batch over ``data`` and
    ``fsdp``, the parameters by their logical axes; by default a run uses every device for data parallelism. The
    last incomplete batch of an epoch is dropped so every step has one shape. ``max_length`` truncates raw text when
    the Trainer tokenizes it and caps the padded length; sequences are padded to a few bucketed lengths (16, 32, 64,
    ...), so a run compiles a handful of shapes. ``bf16`` runs the forward and backward in bfloat16 while the
    adapter weights, their gradients and the optimizer state stay float32. ``max_grad_norm=0`` turns clipping off.
    ``loraplus_lr_ratio`` trains LoRA's B (and vectors) that many times faster than A, and the LoRA factors of
    embeddings at ``loraplus_lr_embedding`` (LoRA+, HF PEFT's ``create_loraplus_optimizer``).
    ``lm_loss_chunk_size`` tokens at a time go through a causal LM's output head in the loss of training and of
    evaluation without predictions (``jaxpeft.losses``: the ``(batch, seq, vocab)`` logits are never held; 0: the
    full logits). ``packing`` (causal LM) packs the tokenized examples, best fit first, into rows of ``max_length``
    tokens (``data.pack_examples``): an example attends only to itself (segment ids in ``attention_mask``), its
    positions and labels restart, and every batch has one shape with little padding. A fresh ``train()`` into an
    ``output_dir`` whose ``checkpoints/`` holds an earlier run's checkpoints refuses to start unless
    ``overwrite_output_dir`` (then they are deleted first).

    Example:
        >>> args = TrainingArguments("out", num_train_epochs=1, learning_rate=2e-4, eval_strategy="steps",
        ...                          eval_steps=50)
        >>> args.per_device_train_batch_size, args.lr_scheduler_type
        (8, 'linear')
    """

    output_dir: str
    overwrite_output_dir: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    logging_steps: int = 10
    eval_strategy: str = "no"
    eval_steps: int | None = None
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    seed: int = 42
    data_seed: int | None = None
    bf16: bool = False
    group_by_length: bool = False
    max_length: int | None = None
    disable_tqdm: bool = False
    async_checkpointing: bool = True
    mesh: str | dict | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    lm_loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    packing: bool = False

    def __post_init__(self):
        self.output_dir = os.fspath(self.output_dir)
        sharding.parse_mesh(self.mesh)
        for field in dataclasses.fields(self):
            _check_argument(field.name, getattr(self, field.name), field.type)
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                raise ValueError(f"TrainingArguments.{name}={getattr(self, name)!r}; use one of {list(STRATEGIES)}")
        if self.lr_scheduler_type not in training.SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}; use one of {list(training.SCHEDULES)}")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.metric_for_best_model is None and self.load_best_model_at_end:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None:
            if not self.metric_for_best_model.startswith("eval_"):
                self.metric_for_best_model = "eval_" + self.metric_for_best_model
            if self.greater_is_better is None:
                self.greater_is_better = not self.metric_for_best_model.endswith(("loss", "perplexity"))
        if self.load_best_model_at_end:
            if self.eval_strategy == "no" or self.eval_strategy != self.save_strategy:
                raise ValueError("load_best_model_at_end needs eval_strategy and save_strategy to be the same "
                                 f"('steps' or 'epoch'), got {self.eval_strategy!r} and {self.save_strategy!r}")
            if self.eval_strategy == "steps" and self.save_steps % self.eval_steps:
                raise ValueError(f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of "
                                 f"eval_steps ({self.eval_steps}), so every checkpoint has its evaluation")

    @property
    def train_batch_size(self) -> int:
        """Examples per optimizer step."""
        return self.per_device_train_batch_size * self.data_parallel_size * self.gradient_accumulation_steps

    @property
    def data_parallel_size(self) -> int:
        """How many devices share each batch (the mesh's data x fsdp; 1 without a mesh)."""
        mesh = run_mesh(self.mesh)
        return 1 if mesh is None else sharding.data_parallel_size(mesh)


# ----------------------------------------------------------------------------------------------- helpers

# The values each numeric TrainingArguments field may take, and how to say it.
_ARGUMENT_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "eval_steps", "save_total_limit", "max_length"),
                    (lambda value: value >= 1, ">= 1")),
    "max_steps": (lambda value: value == -1 or value >= 1, "-1 (train for num_train_epochs) or >= 1"),
    "lm_loss_chunk_size": (lambda value: value >= 0, ">= 0 (0: the full logits)"),
    **dict.fromkeys(("num_train_epochs", "learning_rate", "adam_epsilon", "loraplus_lr_ratio",
                     "loraplus_lr_embedding"), (lambda value: value > 0, "> 0")),
    **dict.fromkeys(("weight_decay", "max_grad_norm", "warmup_steps", "seed", "data_seed"),
                    (lambda value: value >= 0, ">= 0")),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "warmup_ratio"), (lambda value: 0 <= value < 1, "in [0, 1)")),
}
_ANNOTATED_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,),
                    "dict": (dict,)}


def _check_argument(name: str, value: Any, annotation: str) -> None:
    """Raises a one-line ValueError when a TrainingArguments field has a value of the wrong type (``annotation``,
    e.g. ``"int | None"``), a float that is not finite, or a number outside ``_ARGUMENT_RANGES``."""
    if value is None and "None" in annotation:
        return
    kinds = [kind for part in annotation.split("|") for kind in _ANNOTATED_TYPES.get(part.strip(), ())]
    wrong_type = isinstance(value, bool) and bool not in kinds or not isinstance(value, tuple(kinds))
    if kinds and wrong_type:
        raise ValueError(f"TrainingArguments.{name} must be of type {annotation}, got {value!r}")
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ValueError(f"TrainingArguments.{name} must be a finite number, got {value!r}")
    check, expected = _ARGUMENT_RANGES.get(name, (None, ""))
    if check is not None and not check(value):
        raise ValueError(f"TrainingArguments.{name} must be {expected}, got {value!r}")


def _functional(model: Any, task: str | None) -> Any:
    """An NNX ``jaxpeft.nnx.PeftModel`` as its functional view (trained through it); any other model as it is."""
    from jaxpeft.nnx import PeftModel as NnxPeftModel

    if isinstance(model, NnxPeftModel):
        return model.functional(training._task_of_name(task or "causal_lm"))
    return model


def default_collator(task: str, tokenizer: Any = None, model_config: Any = None, max_length: int | None = None,
                     packed: bool = False):
    """The collator for ``task`` (``"seq_cls"``, ``"token_cls"``, ``"causal_lm"``), padding to bucketed lengths
    with the id ``data.resolve_pad_token_id`` chooses (the model config's pad token first); ``packed`` rows (of
    ``data.pack_examples``) are padded to ``max_length``, one shape for every batch.

    Example:
        >>> collate = default_collator("seq_cls")
        >>> collate([{"input_ids": [5, 6], "labels": 1}])["input_ids"].shape
        (1, 16)
    """
    pad = data_lib.resolve_pad_token_id(tokenizer, model_config)
    collators = {"seq_cls": data_lib.SequenceClassificationCollator, "token_cls": data_lib.TokenClassificationCollator,
                 "causal_lm": data_lib.CausalLMCollator}
    if task not in collators:
        raise ValueError(f"no default collator for task {task!r}; pass data_collator=")
    options = {} if task == "causal_lm" else {"num_labels": getattr(model_config, "num_labels", None)}
    if packed:
        options["buckets"] = (max_length,)
    return collators[task](pad_token_id=pad, max_length=max_length, **options)


def _check_packing(model: Any, task: str, max_length: int | None) -> None:
    """A one-line error unless packed rows compute what their examples would apart: a causal LM of
    ``jaxpeft.models`` (whose attention keeps to segments) under an adapter that adds no positions, and a row
    length."""
    if max_length is None:
        raise ValueError("TrainingArguments.packing=True needs max_length=, the length of a packed row")
    if task != "causal_lm":
        raise ValueError(f"TrainingArguments.packing=True is for causal_lm training, not {task}")
    if not training.runs_head_apart(model):
        raise ValueError("TrainingArguments.packing=True needs a jaxpeft.models causal LM (its attention keeps each "
                         "packed example to itself) and an adapter that adds no positions (not prompt tuning or "
                         "p-tuning); set packing=False")


def _raw_text_columns(example: Mapping) -> dict | None:
    """How to tokenize a raw example (``tokenize`` keyword arguments), or None when it is already tokenized."""
    if "input_ids" in example:
        return None
    for prompt, response in INSTRUCTION_COLUMNS:
        if prompt in example and response in example:
            return {"prompt_key": prompt, "response_key": response}
    for column in TEXT_COLUMNS:
        if column in example:
            label = next((key for key in ("label", "labels") if key in example), None)
            return {"text_key": column, "label_key": label}
    raise data_lib.DataError(f"the examples have neither 'input_ids' nor a text column (they have {sorted(example)}); "
                             f"tokenize them first or name the text column one of {list(TEXT_COLUMNS)}")


def _prepare_dataset(dataset: Any, tokenizer: Any, task: str, max_length: int | None, label2id) -> Any:
    examples = data_lib.as_examples(dataset)
    columns = _raw_text_columns(examples[0])
    if columns is None:
        return examples
    if tokenizer is None:
        raise ValueError(f"the dataset holds raw text ({sorted(examples[0])}); pass tokenizer= (or "
                         "processing_class=) to the Trainer, or tokenize it first")
    if task == "causal_lm" and "label_key" in columns:
        columns["label_key"] = None
    length = max_length or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    return data_lib.tokenize(examples, tokenizer, max_length=length, label2id=label2id, **columns)


def run_mesh(mesh: Any) -> jax.sharding.Mesh | None:
    """The mesh a run shards over: ``mesh`` as ``jaxpeft.sharding.mesh_from`` reads it, by default data parallel
    over every device; None (no sharding) on a single device without a mesh."""
    if mesh is None and jax.device_count() == 1:
        return None
    return sharding.mesh_from(mesh)


def _device_batch(batch: Mapping, mesh: jax.sharding.Mesh | None = None) -> dict:
    """A collated batch on the devices: whole, or this process's rows of a global batch sharded over ``mesh``."""
    if mesh is not None:
        return sharding.shard_batch({name: np.asarray(value) for name, value in batch.items()}, mesh)
    return {name: jnp.asarray(value) for name, value in batch.items()}


def _local_rows(indices: Any) -> Any:
    """The examples of a global batch that this process collates (all of them in a single-process run)."""
    return indices[sharding.process_rows(len(indices))] if jax.process_count() > 1 else indices


def _write_jsonl(path: pathlib.Path, record: Mapping) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(outputs.json_line(record) + "\n")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rewrite_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    outputs.write_text(path, "".join(outputs.json_line(record) + "\n" for record in records))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every float of ``tree`` is finite (one device bool)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _restore_newest_readable(manager: Any, like: training.TrainState):
    """The newest checkpoint that can be read; newer damaged ones are set aside (``<step>.damaged``, kept for
    inspection) with a warning naming each, once an older one restored."""
    from jaxpeft import checkpoints

    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"resume_from_checkpoint=True but {manager.directory} holds no checkpoint; train without it "
                         "to start fresh")
    damaged = []
    for step in reversed(steps):
        try:
            restored = manager.restore(like, step)
        except checkpoints.DamagedCheckpointError as error:
            damaged.append(error)
            continue
        for error in damaged:
            kept = manager.set_aside(error.step)
            logger.warning("checkpoint step %d cannot be read (%s); resuming from step %d, the damaged folder is kept "
                           "as %s", error.step, error.cause, restored.step, kept)
        return restored
    raise checkpoints.CheckpointError(f"no checkpoint in {manager.directory} can be read (steps {steps}; the newest: "
                                      f"{damaged[0]}); start the run afresh with overwrite")


def _check_token_ids(batch: Mapping, model_config: Any) -> None:
    """Raises a one-line ValueError when the batch's ``input_ids`` hold an id outside the model's vocabulary
    (the embedding lookup would make the loss NaN), e.g. a padding id the model cannot embed."""
    vocab_size = getattr(model_config, "vocab_size", None)
    if not isinstance(vocab_size, int) or batch.get("input_ids") is None:
        return
    ids = np.asarray(batch["input_ids"])
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise ValueError(f"the training batch holds token id {int(outside.flat[0])}, outside the model's vocabulary "
                         f"(vocab_size={vocab_size}); set pad_token_id and eos_token_id (tokenizer and model config) "
                         "to ids within the vocabulary, or resize the model's embeddings to the tokenizer")


class _Window:
    """The metrics and throughput of the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.metrics: list[dict] = []
        self.examples = self.tokens = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict, examples: int, batch: Mapping) -> None:
        self.metrics.append(metrics)
        self.examples += examples
        self.tokens += int(np.sum(batch["attention_mask"])) if "attention_mask" in batch else 0


@dataclasses.dataclass
class _Run:
    """What one call of ``Trainer.train`` works with; ``state`` and ``last_saved`` move on with the steps."""

    features: Any
    steps_per_epoch: int
    total_steps: int
    frozen: Any
    train_step: Callable
    mesh: Any
    manager: Any  # a jaxpeft.checkpoints.CheckpointManager, None without checkpoints
    progress: Any
    state: training.TrainState
    last_saved: int | None = None


def plot_history(log_history: list[dict], path: str | os.PathLike, *, baselines: Mapping | None = None,
                 title: str = "Training curves") -> pathlib.Path | None:
    """Writes a PNG of the loss (training and evaluation) and each evaluation metric against the step, one panel
    each with a shared step axis (None: nothing to plot). ``baselines`` maps a log key to a reference value or to
    ``{label: value}``, drawn as a dashed line in that key's panel (see ``jaxpeft.plots``).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     png = plot_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, },
        ...                         {"step": 2, "eval_loss": 1.5, "eval_accuracy": 0.75}],
        ...                        pathlib.Path(folder) / "curves.png", baselines={"eval_accuracy": {"probe": 0.7}})
        ...     png.read_bytes()[:4]
        b'\\x89PNG'
    """
    from jaxpeft import plots

    return plots.plot_history(log_history, path, baselines=baselines, title=title)


# ------------------------------------------------------------------------------------------------ Trainer


class Trainer:
    """Trains, evaluates and saves a ``PeftModel`` as transformers' ``Trainer`` does.

    Args:
        model: a ``jaxpeft.PeftModel``. After ``train()`` its ``params`` hold the trained adapter.
        args: ``TrainingArguments``.
        train_dataset, eval_dataset: lists of dicts, ``datasets.Dataset`` or map-style objects (``__len__`` and
            ``__getitem__`` returning dicts), or ``.jsonl``/``.csv`` paths. Examples are either tokenized
            (``input_ids``, optional ``attention_mask``/``token_type_ids``, ``labels``) or raw text (``text``
            with ``label``, or ``prompt`` with ``completion``/``response``), tokenized here with ``tokenizer``.
        data_collator: ``list[dict] -> dict of arrays``; by default the task's collator of ``jaxpeft.data``.
        compute_metrics: ``EvalPrediction -> dict`` (e.g. ``jaxpeft.evaluation.classification_metrics``);
            its keys appear prefixed with ``eval_``.
        processing_class / tokenizer: a transformers tokenizer (saved beside the adapter by ``save_model``).
        task: ``"seq_cls"``, ``"token_cls"`` or ``"causal_lm"`` (HF names too); default: the model's head.
        label2id: for string labels in raw data.

    Built-in evaluation metrics beside ``eval_loss``: ``eval_accuracy`` for sequence classification,
    ``eval_perplexity`` (``exp`` of the token-weighted loss) for causal LM.
    """

    def __init__(self, model: Any, args: TrainingArguments, train_dataset: Any = None, eval_dataset: Any = None,
                 data_collator: Callable | None = None, compute_metrics: Callable | None = None,
                 processing_class: Any = None, tokenizer: Any = None, task: str | None = None,
                 label2id: Mapping[str, int] | None = None):
        model = _functional(model, task)
        if not hasattr(model, "peft_config") or not hasattr(type(model), "trainable_mask"):
            raise TypeError(f"Trainer trains a jaxpeft.PeftModel (get_peft_model(model, config)), got "
                            f"{type(model).__name__}")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a jaxpeft.TrainingArguments, got {type(args).__name__}")
        self.model = model
        self.args = args
        self.tokenizer = processing_class if processing_class is not None else tokenizer
        self.task = training._task_of(model, task)
        self.label2id = label2id
        self.compute_metrics = compute_metrics
        if args.packing:
            _check_packing(model, self.task, args.max_length)
        self.data_collator = data_collator or default_collator(self.task, self.tokenizer, model.base_model.config,
                                                               args.max_length, packed=args.packing)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.log_history: list[dict] = []
        self.state: training.TrainState | None = None
        self.output_dir = pathlib.Path(args.output_dir)
        self._prepared: dict[int, Any] = {}
        self._eval_fns: dict[bool, Callable] = {}
        self._written: set[str] = set()  # entries of output_dir listed in its manifest by this Trainer

    # ----- data -----

    def _features(self, dataset: Any) -> Any:
        key = id(dataset)
        if key not in self._prepared:
            features = _prepare_dataset(dataset, self.tokenizer, self.task, self.args.max_length, self.label2id)
            if self.args.packing:
                features = data_lib.pack_examples(features, self.args.max_length)
            self._prepared[key] = (dataset, features)
        return self._prepared[key][1]

    def _batch_indices(self, features: Any, epoch: int, start_step: int):
        args = self.args
        seed = args.seed if args.data_seed is None else args.data_seed
        if args.group_by_length:
            lengths = [len(features[i]["input_ids"]) for i in range(len(features))]
            return data_lib.length_grouped_batch_iterator(lengths, args.train_batch_size, seed=seed, epoch=epoch,
                                                          start_step=start_step)
        return data_lib.batch_iterator(len(features), args.train_batch_size, seed=seed, epoch=epoch,
                                       start_step=start_step)

    # ----- training -----

    def _total_steps(self, steps_per_epoch: int) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * steps_per_epoch))

    def create_optimizer(self, total_steps: int):
        """The run's ``(optimizer, schedule)`` for ``total_steps`` updates: what a checkpoint's state was made with.
        The active adapter's method may wrap the optimizer (``training.method_optimizer``: AdaLoRA's rank
        allocator, whose state the checkpoints then keep)."""
        args = self.args
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
        optimizer, schedule = training.make_optimizer(
            args.learning_rate, total_steps=total_steps, warmup_steps=min(warmup, total_steps - 1),
            schedule=args.lr_scheduler_type, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon)
        if args.loraplus_lr_ratio is not None:
            optimizer = optax.chain(optimizer, optimizers.scale_by_loraplus(
                args.loraplus_lr_ratio, learning_rate=args.learning_rate,
                loraplus_lr_embedding=args.loraplus_lr_embedding))
        return training.method_optimizer(self.model, optimizer), schedule

    def _checkpoints(self):
        from jaxpeft import checkpoints

        args = self.args
        return checkpoints.CheckpointManager(
            self.output_dir / "checkpoints", max_to_keep=args.save_total_limit,
            best_metric=args.metric_for_best_model, greater_is_better=bool(args.greater_is_better),
            async_save=args.async_checkpointing)

    def _resume(self, resume_from_checkpoint: Any, manager: Any, like: training.TrainState):
        """The restored checkpoint to go on from, or None for a fresh run. Later saves go to ``manager``
        (``output_dir/checkpoints``) whichever folder the checkpoint came from."""
        from jaxpeft import checkpoints

        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is True:
            return _restore_newest_readable(manager, like)
        path = pathlib.Path(resume_from_checkpoint)
        folder, step = (path.parent, int(path.name)) if path.name.isdigit() else (path, None)
        if folder.resolve() == manager.directory.resolve():
            restored = manager.restore(like, step)
        else:
            with checkpoints.CheckpointManager(folder, read_only=True) as source:
                restored = source.restore(like, step)
        later = [s for s in manager.all_steps() if s > restored.step]
        if later:
            raise ValueError(f"{manager.directory} has checkpoints after step {restored.step} ({later}); resuming "
                             "from an earlier step would overwrite them: delete them, or resume from the latest")
        return restored

    def _should(self, strategy: str, every: int, step: int, epoch_end: bool) -> bool:
        return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and epoch_end)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Trains the model's active adapter; returns ``(global_step, training_loss, metrics)``.

        ``resume_from_checkpoint``: ``True`` for the newest readable checkpoint in ``output_dir/checkpoints`` (a
        damaged newer one is set aside as ``<step>.damaged``, with a warning naming it), or the path of a checkpoint
        folder (one step's folder or a ``checkpoints`` folder). While it trains, the Trainer holds ``output_dir``'s
        lock (``jaxpeft.outputs``): a second run into the same folder is refused, and so is a fresh run into a folder
        that holds an earlier run's outputs, unless ``overwrite_output_dir`` (which removes what jaxpeft wrote
        there, nothing else). A loss that is not finite stops the run with ``TrainingStopped``; the model keeps the
        last good parameters (a non-finite step changes nothing) and the checkpoints on disk stay as they were; a
        checkpoint is never written from a state that is not finite.
        """
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs train_dataset=")
        writer = outputs.writer_lock(self.output_dir) if jax.process_index() == 0 else contextlib.nullcontext()
        with writer as outermost:
            if outermost:  # else ``jaxpeft train`` holds the lock and has started the run
                outputs.check_run(self.output_dir, resume=resume_from_checkpoint not in (None, False),
                                  overwrite=self.args.overwrite_output_dir)
            started = time.perf_counter()
            run = self._start(resume_from_checkpoint, start=bool(outermost))
            try:
                losses = self._loop(run)
                self._keep_final_parameters(run)
            except BaseException as failure:
                self._close(run, failure)
                raise
            self._close(run, None)
        step = int(run.state.step)
        training_loss = float(np.mean(losses)) if losses else float("nan")
        summary = {"train_runtime": round(time.perf_counter() - started, 4), "train_loss": training_loss,
                   "epoch": step / run.steps_per_epoch, "step": step}
        self._log(summary)
        return TrainOutput(step, training_loss, summary)

    def _start(self, resume_from_checkpoint: Any, start: bool) -> _Run:
        """The run's data, optimizer, jitted step, checkpoints and state: fresh, or restored from a checkpoint.
        ``start``: start the run in ``output_dir`` (``outputs.start_run``) once the inputs are checked."""
        args = self.args
        features = self._features(self.train_dataset)
        if self.task in ("seq_cls", "token_cls"):
            data_lib.check_labels(features, self.model.base_model.config.num_labels, self.task, training=True)
        if len(features) < args.train_batch_size:
            raise ValueError(f"the training set has {len(features)} examples, fewer than one batch of "
                             f"{args.train_batch_size} (per_device_train_batch_size x data-parallel devices x "
                             "gradient_accumulation_steps); lower the batch size")
        steps_per_epoch = data_lib.num_batches(len(features), args.train_batch_size)
        total_steps = self._total_steps(steps_per_epoch)
        optimizer, schedule = self.create_optimizer(total_steps)
        mask = self.model.trainable_mask
        mesh = run_mesh(args.mesh)
        params, step_options = self.model.params, {}
        if mesh is not None:
            params = sharding.shard_params(params, mesh, self.model.base_model.logical_axes())
        frozen = partition(params, mask)[1]
        state = training.init_train_state(params, mask, optimizer, seed=args.seed)
        if mesh is not None:
            trainable_shardings = partition(jax.tree_util.tree_map(lambda leaf: leaf.sharding, params), mask)[0]
            state_shardings = sharding.state_shardings(state, trainable_shardings, optimizer, mesh)
            state = sharding.shard_state(state, state_shardings)
            step_options = {"state_sharding": state_shardings, "batch_sharding": sharding.batch_sharding(mesh)}
        train_step = training.make_train_step(
            training.peft_loss_fn(self.model, self.task, lm_loss_chunk_size=self.args.lm_loss_chunk_size or None),
            optimizer, frozen, schedule=schedule,
            grad_accum_steps=args.gradient_accumulation_steps, compute_dtype="bfloat16" if args.bf16 else None,
            **step_options)
        if start:
            outputs.start_run(self.output_dir, resume=resume_from_checkpoint not in (None, False),
                              overwrite=self.args.overwrite_output_dir)
            self._written = set(outputs.written(self.output_dir))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        manager = self._checkpoints() if args.save_strategy != "no" or resume_from_checkpoint else None
        restored = self._resume(resume_from_checkpoint, manager, state) if manager is not None else None
        metrics_file = self.output_dir / "metrics.jsonl"
        if restored is not None:
            state = restored.state
            self.log_history = [r for r in _read_jsonl(metrics_file) if r.get("step", 0) <= restored.step]
        if jax.process_index() == 0:
            _rewrite_jsonl(metrics_file, self.log_history)  # a fresh run starts the file anew
            self._note_written("metrics.jsonl", *(("checkpoints",) if manager is not None else ()))
        progress = self._progress_bar(total_steps, int(state.step))
        return _Run(features, steps_per_epoch, total_steps, frozen, train_step, mesh, manager, progress, state,
                    last_saved=int(state.step) if restored is not None else None)

    def _progress_bar(self, total_steps: int, initial: int):
        from jaxpeft.progress import training_progress

        return training_progress(total_steps, initial=initial,
                                 disable=self.args.disable_tqdm or jax.process_index() != 0)

    def _loop(self, run: _Run) -> list[float]:
        """Runs the steps from ``run.state``'s to the last; returns the logged losses. A step's ``is_finite`` is read
        while the next step runs, so the host never waits for the device except to log, evaluate or save."""
        window, losses = _Window(), []
        proceed, unchecked = True, None  # the last step's metrics and place, its is_finite not read yet
        step, first_batch = int(run.state.step), True
        while step < run.total_steps:
            epoch, step_in_epoch = divmod(step, run.steps_per_epoch)
            for indices in self._batch_indices(run.features, epoch, step_in_epoch):
                batch = self.data_collator([run.features[int(i)] for i in _local_rows(indices)])
                if first_batch:  # on the host, before the first step
                    _check_token_ids(batch, getattr(self.model.base_model, "config", None))
                    first_batch = False
                run.state, metrics = run.train_step(run.state, _device_batch(batch, run.mesh), proceed)
                if unchecked is not None:  # read the previous step's flag while this one runs
                    self._stop_if_not_finite(run, unchecked)
                proceed, unchecked = metrics["is_finite"], (metrics, step + 1, epoch, step_in_epoch)
                step += 1
                step_in_epoch += 1
                window.add(metrics, len(indices), batch)
                epoch_end = step_in_epoch == run.steps_per_epoch
                log = step % self.args.logging_steps == 0 or step == run.total_steps
                evaluate = self.eval_dataset is not None and self._should(self.args.eval_strategy,
                                                                         self.args.eval_steps, step, epoch_end)
                save = run.manager is not None and (step == run.total_steps or self._should(
                    self.args.save_strategy, self.args.save_steps, step, epoch_end))
                if log or evaluate or save:
                    self._stop_if_not_finite(run, unchecked)
                    unchecked = None
                if log:
                    losses.append(self._log_window(window, step, run))
                run.progress.update(1)
                eval_metrics = (self._evaluate_state(run.state, run.frozen, self.eval_dataset, "eval", step,
                                                     step / run.steps_per_epoch) if evaluate else None)
                if save:
                    self._save(run, step, eval_metrics)
                if step >= run.total_steps:
                    break
        return losses

    def _stop_if_not_finite(self, run: _Run, unchecked: tuple) -> None:
        """Stops the run when the step of ``unchecked`` had a loss or gradient that is not finite. Every later
        step was a no-op (``proceed``), so ``run.state`` holds the last good parameters."""
        metrics, number, epoch, batch_index = unchecked
        if bool(metrics["is_finite"]):
            return
        self._keep_state(run)
        kept = f"the last checkpoint is step {run.last_saved}" if run.last_saved else "no checkpoint was saved"
        raise TrainingStopped(
            f"the loss is {float(metrics['loss'])} at step {number} (epoch {epoch}, batch {batch_index}); training "
            f"stopped with the parameters of step {number - 1}, {kept}; lower learning_rate or check that batch")

    def _save(self, run: _Run, step: int, eval_metrics: Mapping | None) -> None:
        """Saves checkpoint ``step``, after checking that the state is finite (so the last checkpoint is good)."""
        if not bool(_all_finite((run.state.trainable, run.state.opt_state))):
            self._keep_state(run)
            kept = f"the last checkpoint is step {run.last_saved}" if run.last_saved else "no checkpoint was saved"
            raise TrainingStopped(f"the trainable parameters or the optimizer state are not finite after step {step}, "
                                  f"so it was not saved; {kept}; lower learning_rate")
        run.manager.save(step, run.state, metrics=self._checkpoint_metrics(eval_metrics),
                         data_position={"epoch": step // run.steps_per_epoch,
                                        "step_in_epoch": step % run.steps_per_epoch})
        run.last_saved = step

    def _keep_state(self, run: _Run) -> None:
        self.state = run.state
        self._adopt(run.state, run.frozen)

    def _adopt(self, state: training.TrainState, frozen: Any) -> None:
        """The parameters of ``state`` into the model, and the config its method makes of the optimizer state."""
        self.model.params = training.full_params(state, frozen)
        training.keep_trained_config(self.model, state.opt_state)

    def _keep_final_parameters(self, run: _Run) -> None:
        """The trained parameters into the model: the last step's, or the best checkpoint's when asked."""
        self._keep_state(run)
        if self.args.load_best_model_at_end and run.manager is not None:
            run.manager.wait_until_finished()
            best = run.manager.best_step()
            if best is not None and best != int(run.state.step):
                self._adopt(run.manager.restore(run.state, best).state, run.frozen)

    def _close(self, run: _Run, failure: BaseException | None) -> None:
        """Closes the progress bar and the checkpoints (waiting for the last write) and plots the curves. When the
        run failed, an error here is logged and the run's own error is the one raised."""
        steps = [run.progress.close]
        if run.manager is not None:
            steps.append(run.manager.close)
        if jax.process_index() == 0:
            steps.append(self._plot)
        first_error = None
        for close in steps:
            try:
                close()
            except Exception as error:  # noqa: BLE001 - reported below, after the other steps ran
                if failure is None and first_error is None:
                    first_error = error
                else:
                    logger.warning("while stopping the run: %s", " ".join(str(error).split()) or type(error).__name__)
        if first_error is not None:
            raise first_error

    def _plot(self) -> None:
        if plot_history(self.log_history, self.output_dir / "training_curves.png") is not None:
            self._note_written("training_curves.png")

    def _note_written(self, *names: str) -> None:
        """Lists ``names`` (entries of ``output_dir``) in the folder's manifest of what jaxpeft wrote."""
        new = [name for name in names if name not in self._written]
        if new and jax.process_index() == 0:
            outputs.record(self.output_dir, *new)
            self._written.update(new)

    def _checkpoint_metrics(self, eval_metrics: Mapping | None) -> dict | None:
        if eval_metrics is None:
            return None
        return {k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))}

    def _log(self, record: dict) -> None:
        self.log_history.append(record)
        if jax.process_index() == 0:  # one writer in a multi-process run
            _write_jsonl(self.output_dir / "metrics.jsonl", record)

    def _log_window(self, window: _Window, step: int, run: _Run) -> float:
        """Logs the steps since the last log line (their mean loss, gradient norm and throughput); returns the
        loss."""
        host = jax.device_get(window.metrics)
        seconds = max(time.perf_counter() - window.started, 1e-9)
        record = {"step": step, "epoch": round(step / run.steps_per_epoch, 4),
                  "loss": float(np.mean([m["loss"] for m in host])),
                  "grad_norm": float(np.mean([m["grad_norm"] for m in host]))}
        if "learning_rate" in host[-1]:
            record["learning_rate"] = float(host[-1]["learning_rate"])
        for name in host[-1]:
            if name not in ("loss", "grad_norm", "learning_rate", "step", "is_finite"):
                record[name] = float(np.mean([m[name] for m in host]))
        record["samples_per_second"] = window.examples / seconds
        if window.tokens:
            record["tokens_per_second"] = window.tokens / seconds
        self._log(record)
        run.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('learning_rate', 0):.2e}",
                                 samples_per_s=f"{record['samples_per_second']:.1f}")
        window.reset()
        return record["loss"]

    # ----- evaluation -----

    def _eval_function(self, keep_predictions: bool):
        """The jitted ``(trainable, frozen, batch, weights) -> (sums, logits)``: ``training.peft_outputs_fn``, the
        loss of training, without dropout; without predictions a causal LM's head runs in chunks (logits None)."""
        if keep_predictions not in self._eval_fns:
            chunk_size = None if keep_predictions else self.args.lm_loss_chunk_size or None
            outputs_fn = training.peft_outputs_fn(self.model, self.task, lm_loss_chunk_size=chunk_size)
            compute_dtype = jnp.bfloat16 if self.args.bf16 else None

            def evaluate(trainable, frozen, batch, weights):
                if compute_dtype is not None:
                    trainable = training._cast_floats(trainable, compute_dtype)
                    frozen = training._cast_floats(frozen, compute_dtype)
                return outputs_fn(combine(trainable, frozen), batch, None, weights)

            self._eval_fns[keep_predictions] = jax.jit(evaluate)
        return self._eval_fns[keep_predictions]

    def _run_eval(self, trainable: Any, frozen: Any, dataset: Any, keep_predictions: bool):
        features = self._features(dataset)
        evaluate = self._eval_function(keep_predictions)
        sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        predictions, labels = [], []
        labelled = any(key in features[0] for key in ("labels", "label")) or self.task == "causal_lm"
        if self.task in ("seq_cls", "token_cls") and labelled:
            data_lib.check_labels(features, self.model.base_model.config.num_labels, self.task)
        mesh = run_mesh(self.args.mesh)
        size = self.args.per_device_eval_batch_size * (1 if mesh is None else sharding.data_parallel_size(mesh))
        # one batch shape: the last batch is filled up with weight-0 copies
        for filled in pipelines.filled_batches(features, size):
            rows = filled.rows
            if not labelled:  # predictions only: placeholder labels that the collator accepts
                rows = [{**row, "labels": 0 if self.task == "seq_cls" else [data_lib.IGNORE_INDEX] *
                         len(row["input_ids"])} for row in rows]
            batch = self.data_collator(rows)
            here = _local_rows(np.arange(size))  # this process's rows, when several share the batch
            placed = _device_batch({name: np.asarray(value)[here]
                                    for name, value in {**batch, "weights": filled.weights}.items()}, mesh)
            weights = placed.pop("weights")
            batch_sums, logits = evaluate(trainable, frozen, placed, weights)
            for name, value in jax.device_get(batch_sums).items():
                sums[name] += float(value)
            if keep_predictions:
                if not logits.is_fully_addressable:
                    from jax.experimental import multihost_utils

                    logits = multihost_utils.process_allgather(logits, tiled=True)
                predictions.append(np.asarray(logits)[: filled.count])
                if labelled:
                    labels.append(np.asarray(batch["labels"])[: filled.count])
        return sums, predictions, labels

    def _gather(self, arrays: list[np.ndarray]) -> np.ndarray | None:
        if not arrays:
            return None
        if arrays[0].ndim == 1 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
            return np.concatenate(arrays)
        longest = max(a.shape[1] for a in arrays)
        padded = [np.pad(a, [(0, 0), (0, longest - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                         constant_values=data_lib.IGNORE_INDEX) for a in arrays]
        return np.concatenate(padded)

    def _metrics(self, sums: dict, predictions: list, labels: list, prefix: str, seconds: float,
                 num_examples: int) -> dict:
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        metrics = {f"{prefix}_loss": loss}
        if self.task == "seq_cls":
            metrics[f"{prefix}_accuracy"] = sums["correct"] / max(sums["count"], 1.0)
        elif self.task == "causal_lm":
            metrics[f"{prefix}_perplexity"] = float(math.exp(min(loss, 700.0)))
        else:
            metrics[f"{prefix}_token_accuracy"] = sums["correct"] / max(sums["count"], 1.0)
        if self.compute_metrics is not None and predictions:
            extra = self.compute_metrics(EvalPrediction(self._gather(predictions), self._gather(labels)))
            metrics.update({k if k.startswith(prefix + "_") else f"{prefix}_{k}": v for k, v in extra.items()})
        metrics[f"{prefix}_runtime"] = round(seconds, 4)
        metrics[f"{prefix}_samples_per_second"] = round(num_examples / max(seconds, 1e-9), 3)
        return metrics

    def _evaluate_state(self, state, frozen, dataset, prefix: str, step: int, epoch: float) -> dict:
        started = time.perf_counter()
        sums, predictions, labels = self._run_eval(state.trainable, frozen, dataset,
                                                   keep_predictions=self.compute_metrics is not None)
        metrics = self._metrics(sums, predictions, labels, prefix, time.perf_counter() - started,
                                len(self._features(dataset)))
        metrics.update(step=step, epoch=round(epoch, 4))
        self._log(metrics)
        return metrics

    def _current(self):
        if self.model.active_adapter is None:  # a PeftModel without adapters: the base model, all frozen
            return partition(self.model.params, jax.tree_util.tree_map(lambda _: False, self.model.params))
        return partition(self.model.params, self.model.trainable_mask)

    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict:
        """Evaluates the model's current parameters; returns ``{"eval_loss": ..., ...}`` (see the class docstring
        for the built-in metrics; ``compute_metrics``' are added)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate needs an eval_dataset (to the Trainer or to evaluate)")
        trainable, frozen = self._current()
        started = time.perf_counter()
        sums, predictions, labels = self._run_eval(trainable, frozen, dataset,
                                                   keep_predictions=self.compute_metrics is not None)
        metrics = self._metrics(sums, predictions, labels, metric_key_prefix, time.perf_counter() - started,
                                len(self._features(dataset)))
        step = int(self.state.step) if self.state is not None else 0
        metrics["epoch"] = next((r["epoch"] for r in reversed(self.log_history) if "epoch" in r), 0.0)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._log({**metrics, "step": step})
        self._note_written("metrics.jsonl")
        return metrics

    def predict(self, test_dataset: Any, metric_key_prefix: str = "test") -> PredictionOutput:
        """The logits for every example of ``test_dataset`` (token-level ones padded with -100 to the longest),
        its labels when it has them, and the metrics as ``evaluate`` computes them (prefix ``test_``)."""
        trainable, frozen = self._current()
        started = time.perf_counter()
        sums, predictions, labels = self._run_eval(trainable, frozen, test_dataset, keep_predictions=True)
        has_labels = bool(labels) and all(len(b) for b in labels)
        metrics = self._metrics(sums, predictions if has_labels else [], labels, metric_key_prefix,
                                time.perf_counter() - started, len(self._features(test_dataset)))
        if not has_labels:
            metrics = {k: v for k, v in metrics.items() if k.endswith(("runtime", "per_second"))}
        return PredictionOutput(self._gather(predictions), self._gather(labels) if has_labels else None, metrics)

    # ----- saving -----

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """Writes the model's adapters in the HF PEFT format (and the tokenizer, when the Trainer has one) to
        ``output_dir`` (default ``args.output_dir``)."""
        folder = os.fspath(output_dir if output_dir is not None else self.args.output_dir)
        params = self.model.params
        if jax.process_count() > 1:  # every process takes part in gathering the adapters' sharded leaves
            from jax.experimental import multihost_utils

            gathered = jax.tree_util.tree_map_with_path(
                lambda path, leaf: multihost_utils.process_allgather(leaf, tiled=True)
                if any(key in ADAPTER_KEYS for key in training._path_keys(path)) else leaf, params)
            if jax.process_index() != 0:  # the first process writes
                return
            self.model.params = gathered
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        try:
            self.model.save_pretrained(folder)
        finally:
            self.model.params = params
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
        self._note_saved(folder, before)

    def _note_saved(self, folder: str, before: set[str]) -> None:
        """Lists what ``save_model`` wrote in ``output_dir`` in its manifest: the new files when it saved there, or
        the top entry of ``output_dir`` that holds ``folder``."""
        root, target = os.path.realpath(self.output_dir), os.path.realpath(folder)
        if target == root:
            self._note_written(*(set(os.listdir(folder)) - before - {outputs.MANIFEST_NAME, outputs.LOCK_NAME}))
        elif os.path.commonpath([root, target]) == root:
            self._note_written(os.path.relpath(target, root).split(os.sep)[0])
