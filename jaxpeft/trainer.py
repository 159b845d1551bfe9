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

import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import data as data_lib
from jaxpeft import pipelines, sharding, training
from jaxpeft.tree import ADAPTER_KEYS, combine, partition

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
    adapter weights, their gradients and the optimizer state stay float32. ``max_grad_norm=0`` turns clipping off. A
    fresh ``train()`` into an ``output_dir`` whose ``checkpoints/`` holds an earlier run's checkpoints refuses to
    start unless ``overwrite_output_dir`` (then they are deleted first).

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

    def __post_init__(self):
        self.output_dir = os.fspath(self.output_dir)
        sharding.parse_mesh(self.mesh)
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"TrainingArguments.{name} must be an int >= 1, got {value!r}")
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                raise ValueError(f"TrainingArguments.{name}={getattr(self, name)!r}; use one of {list(STRATEGIES)}")
        if self.lr_scheduler_type not in training.SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r}; use one of {list(training.SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("give num_train_epochs > 0 or max_steps > 0: nothing says how long to train")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
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


def _pad_token_id(tokenizer: Any, model_config: Any) -> int:
    for source in (tokenizer, model_config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def default_collator(task: str, tokenizer: Any = None, model_config: Any = None, max_length: int | None = None):
    """The collator for ``task`` (``"seq_cls"``, ``"token_cls"``, ``"causal_lm"``), padding with the tokenizer's
    pad token (else the model config's pad or EOS token, else 0) to bucketed lengths.

    Example:
        >>> collate = default_collator("seq_cls")
        >>> collate([{"input_ids": [5, 6], "labels": 1}])["input_ids"].shape
        (1, 16)
    """
    pad = _pad_token_id(tokenizer, model_config)
    collators = {"seq_cls": data_lib.SequenceClassificationCollator, "token_cls": data_lib.TokenClassificationCollator,
                 "causal_lm": data_lib.CausalLMCollator}
    if task not in collators:
        raise ValueError(f"no default collator for task {task!r}; pass data_collator=")
    return collators[task](pad_token_id=pad, max_length=max_length)


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
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rewrite_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, path)


def plot_history(log_history: list[dict], path: str | os.PathLike) -> pathlib.Path | None:
    """Writes a PNG of the training loss and each evaluation metric against the step (None: nothing to plot).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     png = plot_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, },
        ...                         {"step": 2, "eval_loss": 1.5}], pathlib.Path(folder) / "curves.png")
        ...     png.read_bytes()[:4]
        b'\\x89PNG'
    """
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (e.g. a notebook's inline one) stays

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    eval_names = sorted({k for r in log_history for k in r if k.startswith("eval_") and isinstance(r[k], float)
                         and not k.endswith(("runtime", "per_second"))})
    if not train and not eval_names:
        return None
    panels = [("training loss", [("loss", train)])] if train else []
    for name in eval_names:
        panels.append((name, [(name, [(r["step"], r[name]) for r in log_history if name in r])]))
    figure = Figure(figsize=(4.5 * len(panels), 3.5))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels, strict=True):
        for label, points in series:
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return path


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
        self.data_collator = data_collator or default_collator(self.task, self.tokenizer, model.base_model.config,
                                                               args.max_length)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.log_history: list[dict] = []
        self.state: training.TrainState | None = None
        self.output_dir = pathlib.Path(args.output_dir)
        self._prepared: dict[int, Any] = {}
        self._eval_fn = None

    # ----- data -----

    def _features(self, dataset: Any) -> Any:
        key = id(dataset)
        if key not in self._prepared:
            self._prepared[key] = (dataset, _prepare_dataset(dataset, self.tokenizer, self.task,
                                                             self.args.max_length, self.label2id))
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
        """The run's ``(optimizer, schedule)`` for ``total_steps`` updates: what a checkpoint's state was made with."""
        args = self.args
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
        return training.make_optimizer(
            args.learning_rate, total_steps=total_steps, warmup_steps=min(warmup, total_steps - 1),
            schedule=args.lr_scheduler_type, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm or None, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon)

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
            if manager.latest_step() is None:
                raise ValueError(f"resume_from_checkpoint=True but {manager.directory} holds no checkpoint; train "
                                 "without it to start fresh")
            return manager.restore(like)
        path = pathlib.Path(resume_from_checkpoint)
        folder, step = (path.parent, int(path.name)) if path.name.isdigit() else (path, None)
        if folder.resolve() == manager.directory.resolve():
            restored = manager.restore(like, step)
        else:
            with checkpoints.CheckpointManager(folder) as source:
                restored = source.restore(like, step)
        later = [s for s in manager.all_steps() if s > restored.step]
        if later:
            raise ValueError(f"{manager.directory} has checkpoints after step {restored.step} ({later}); resuming "
                             "from an earlier step would overwrite them: delete them, or resume from the latest")
        return restored

    def _check_no_earlier_checkpoints(self) -> None:
        """A fresh run would overwrite (and be mixed up with) an earlier run's checkpoints: refuse before any work,
        unless ``overwrite_output_dir`` says to delete them."""
        folder = self.output_dir / "checkpoints"
        steps = sorted(int(path.name) for path in folder.iterdir() if path.name.isdigit()) if folder.is_dir() else []
        if steps and not self.args.overwrite_output_dir:
            raise ValueError(f"{folder} holds the checkpoints of an earlier run (steps {steps}); pass "
                             "resume_from_checkpoint=True to go on, or overwrite_output_dir=True to start afresh")

    def _should(self, strategy: str, every: int, step: int, epoch_end: bool) -> bool:
        return (strategy == "steps" and step % every == 0) or (strategy == "epoch" and epoch_end)

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Trains the model's active adapter; returns ``(global_step, training_loss, metrics)``.

        ``resume_from_checkpoint``: ``True`` for the latest checkpoint in ``output_dir/checkpoints``, or the path
        of a checkpoint folder (one step's folder or a ``checkpoints`` folder). A loss that is not finite stops the
        run with ``TrainingStopped``; the model keeps the last good parameters (a non-finite step changes nothing)
        and the checkpoints on disk stay as they were.
        """
        from tqdm import tqdm

        args = self.args
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs train_dataset=")
        fresh = resume_from_checkpoint in (None, False)
        if fresh:
            self._check_no_earlier_checkpoints()
        features = self._features(self.train_dataset)
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
            training.peft_loss_fn(self.model, self.task), optimizer, frozen, schedule=schedule,
            grad_accum_steps=args.gradient_accumulation_steps, compute_dtype="bfloat16" if args.bf16 else None,
            **step_options)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if fresh and args.overwrite_output_dir:
            shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
        manager = self._checkpoints() if args.save_strategy != "no" or resume_from_checkpoint else None
        restored = self._resume(resume_from_checkpoint, manager, state) if manager is not None else None
        metrics_file = self.output_dir / "metrics.jsonl"
        if restored is not None:
            state = restored.state
            self.log_history = [r for r in _read_jsonl(metrics_file) if r.get("step", 0) <= restored.step]
        if jax.process_index() == 0:
            _rewrite_jsonl(metrics_file, self.log_history)  # a fresh run starts the file anew
        step = int(state.step)
        last_saved = step if restored is not None else None
        window: list[dict] = []
        losses: list[float] = []
        examples_seen = tokens_seen = 0
        started = window_started = time.perf_counter()
        progress = tqdm(total=total_steps, initial=step, disable=args.disable_tqdm, desc="training", unit="step")
        unchecked = None  # the last step's metrics and place, its is_finite not read yet
        proceed: Any = True

        def stop_if_not_finite(unchecked):
            # After a bad step every later step was a no-op (proceed), so ``state`` holds the last good parameters.
            metrics, number, epoch, batch_index = unchecked
            if bool(metrics["is_finite"]):
                return
            self.state = state
            self.model.params = training.full_params(state, frozen)
            kept = f"the last checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
            raise TrainingStopped(
                f"the loss is {float(metrics['loss'])} at step {number} (epoch {epoch}, batch {batch_index}); "
                f"training stopped with the parameters of step {number - 1}, {kept}; lower learning_rate or check "
                "that batch")

        try:
            while step < total_steps:
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                for indices in self._batch_indices(features, epoch, step_in_epoch):
                    batch = self.data_collator([features[int(i)] for i in _local_rows(indices)])
                    state, metrics = train_step(state, _device_batch(batch, mesh), proceed)
                    if unchecked is not None:  # read the previous step's flag while this one runs
                        stop_if_not_finite(unchecked)
                    proceed, unchecked = metrics["is_finite"], (metrics, step + 1, epoch, step_in_epoch)
                    step += 1
                    step_in_epoch += 1
                    window.append(metrics)
                    examples_seen += len(indices)
                    tokens_seen += int(np.sum(batch["attention_mask"])) if "attention_mask" in batch else 0
                    progress.update(1)
                    epoch_end = step_in_epoch == steps_per_epoch
                    log = step % args.logging_steps == 0 or step == total_steps
                    evaluate = self.eval_dataset is not None and self._should(args.eval_strategy, args.eval_steps,
                                                                             step, epoch_end)
                    save = manager is not None and (self._should(args.save_strategy, args.save_steps, step, epoch_end)
                                                    or step == total_steps)
                    if log or evaluate or save:
                        stop_if_not_finite(unchecked)
                        unchecked = None
                    if log:
                        record = self._log_window(window, step, steps_per_epoch, examples_seen, tokens_seen,
                                                  time.perf_counter() - window_started)
                        losses.append(record["loss"])
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('learning_rate', 0):.2e}",
                                             samples_per_s=f"{record['samples_per_second']:.1f}")
                        window, examples_seen, tokens_seen = [], 0, 0
                        window_started = time.perf_counter()
                    eval_metrics = None
                    if evaluate:
                        eval_metrics = self._evaluate_state(state, frozen, self.eval_dataset, "eval", step,
                                                            step / steps_per_epoch)
                    if save:
                        manager.save(step, state, data_position={"epoch": step // steps_per_epoch,
                                                                 "step_in_epoch": step % steps_per_epoch},
                                     metrics=self._checkpoint_metrics(eval_metrics))
                        last_saved = step
                    if step >= total_steps:
                        break
            self.state = state
            self.model.params = training.full_params(state, frozen)
            if args.load_best_model_at_end and manager is not None:
                manager.wait_until_finished()
                best = manager.best_step()
                if best is not None and best != step:
                    best_state = manager.restore(state, best).state
                    self.model.params = training.full_params(best_state, frozen)
        finally:
            progress.close()
            if manager is not None:
                manager.wait_until_finished()
                manager.close()
            if jax.process_index() == 0:
                plot_history(self.log_history, self.output_dir / "training_curves.png")
        runtime = time.perf_counter() - started
        training_loss = float(np.mean(losses)) if losses else float("nan")
        summary = {"train_runtime": round(runtime, 4), "train_loss": training_loss, "epoch": step / steps_per_epoch,
                   "step": step}
        self._log(summary)
        return TrainOutput(step, training_loss, summary)

    def _checkpoint_metrics(self, eval_metrics: Mapping | None) -> dict | None:
        if eval_metrics is None:
            return None
        return {k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))}

    def _log(self, record: dict) -> None:
        self.log_history.append(record)
        if jax.process_index() == 0:  # one writer in a multi-process run
            _write_jsonl(self.output_dir / "metrics.jsonl", record)

    def _log_window(self, window: list[dict], step: int, steps_per_epoch: int, examples: int, tokens: int,
                    seconds: float) -> dict:
        host = jax.device_get(window)
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                  "loss": float(np.mean([m["loss"] for m in host])),
                  "grad_norm": float(np.mean([m["grad_norm"] for m in host]))}
        if "learning_rate" in host[-1]:
            record["learning_rate"] = float(host[-1]["learning_rate"])
        for name in host[-1]:
            if name not in ("loss", "grad_norm", "learning_rate", "step", "is_finite"):
                record[name] = float(np.mean([m[name] for m in host]))
        record["samples_per_second"] = examples / max(seconds, 1e-9)
        if tokens:
            record["tokens_per_second"] = tokens / max(seconds, 1e-9)
        self._log(record)
        return record

    # ----- evaluation -----

    def _eval_function(self):
        """The jitted ``(trainable, frozen, batch, weights) -> (sums, logits)``: ``training.peft_outputs_fn``, the
        loss of training, without dropout."""
        if self._eval_fn is None:
            outputs = training.peft_outputs_fn(self.model, self.task)
            compute_dtype = jnp.bfloat16 if self.args.bf16 else None

            def evaluate(trainable, frozen, batch, weights):
                if compute_dtype is not None:
                    trainable = training._cast_floats(trainable, compute_dtype)
                    frozen = training._cast_floats(frozen, compute_dtype)
                return outputs(combine(trainable, frozen), batch, None, weights)

            self._eval_fn = jax.jit(evaluate)
        return self._eval_fn

    def _run_eval(self, trainable: Any, frozen: Any, dataset: Any, keep_predictions: bool):
        features = self._features(dataset)
        evaluate = self._eval_function()
        sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        predictions, labels = [], []
        labelled = any(key in features[0] for key in ("labels", "label")) or self.task == "causal_lm"
        mesh = run_mesh(self.args.mesh)
        size = self.args.per_device_eval_batch_size * (1 if mesh is None else sharding.data_parallel_size(mesh))
        # one batch shape: the last batch is filled up with weight-0 copies
        for filled in pipelines.filled_batches(features, size):
            rows = filled.rows
            if not labelled:  # predictions only: placeholder labels that the collator accepts
                rows = [{**row, "labels": 0 if self.task == "seq_cls" else [training.IGNORE_INDEX] *
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
                         constant_values=training.IGNORE_INDEX) for a in arrays]
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
        try:
            self.model.save_pretrained(folder)
        finally:
            self.model.params = params
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
