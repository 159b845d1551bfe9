"""Checkpoints of a training run with Orbax: save, keep the last few and the best, resume exactly.

A checkpoint holds what training changes and nothing else: the ``jaxpeft.training.TrainState`` (trainable leaves,
optimizer state, step count, seed key; never the frozen base), the data position (where the batch iterator
resumes) and the metrics of that step. On disk, ``directory/<step>/`` holds

- ``state/``: the TrainState's arrays (Orbax's pytree format);
- ``run/``: JSON with the data position, the metrics and a CRC32 of every array, so a corrupt file is reported
  instead of resumed from;
- ``metrics/``: the metric that ranks checkpoints, when ``best_metric`` is set.

A step is written into a temporary folder (``<step>.orbax-checkpoint-tmp``) and renamed to ``<step>`` once
complete, so a run killed in the middle of a save leaves the previous checkpoint as the latest one; the leftover
temporary folder is removed when the next writing ``CheckpointManager`` opens the directory (a manager opened with
``read_only=True``, e.g. to export from a run in progress, changes nothing on disk). Restoring places every array on
the sharding of the state passed as ``like``. Use one writing manager per directory at a time (the Trainer holds the
run folder's lock, see ``jaxpeft.outputs``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
import pathlib
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft.training import TrainState

STATE_ITEM = "state"  # the TrainState's arrays
RUN_ITEM = "run"  # JSON: data position, metrics, checksums
FORMAT_VERSION = 1
TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX  # a step is written to "<step><TMP_SUFFIX>", then renamed


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or restored as asked; the message names the folder or step and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read back as saved (truncated, overwritten, missing); ``step`` names it."""

    def __init__(self, message: str, step: int, cause: str):
        super().__init__(message)
        self.step = step
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``CheckpointManager.restore`` returns.

    Attributes:
        step: the optimizer step the checkpoint was taken after.
        state: the ``TrainState``, its arrays on the shardings of the ``like`` passed to ``restore``.
        data_position: where the data iterator resumes, e.g. ``{"epoch": 1, "step_in_epoch": 7}``.
        metrics: the metrics saved with it (e.g. ``{"eval_loss": 0.3}``), possibly ``{}``.
    """

    step: int
    state: TrainState
    data_position: dict
    metrics: dict


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by dotted path (``trainable.params.h_0.attn.lora_A.default``), as Orbax names them."""
    return {".".join(_key_name(entry) for entry in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _checksum(leaf: Any) -> int | None:
    """CRC32 of the array's bytes; ``None`` for an array this process does not hold entirely (multi-host)."""
    if not getattr(leaf, "is_fully_addressable", True):
        return None
    return zlib.crc32(np.ascontiguousarray(jax.device_get(leaf)).tobytes())


def _best_step(scored: Iterable[tuple[int, Any]], greater_is_better: bool) -> int | None:
    """The step with the best finite score; on a tie the earlier one (a later step must strictly improve)."""
    best, best_score = None, None
    for step, score in sorted(scored, key=operator.itemgetter(0)):
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            continue
        if best_score is None or (score > best_score if greater_is_better else score < best_score):
            best, best_score = step, score
    return best


@dataclasses.dataclass
class _LatestAndBest:
    """Orbax preservation policy: the last ``max_to_keep`` steps (all when None) and the best one by the metric."""

    max_to_keep: int | None
    best_metric: str | None
    greater_is_better: bool

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        steps = sorted(info.step for info in checkpoints)
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep:])
        if self.best_metric is not None:
            keep.add(_best_step(((info.step, (info.metrics or {}).get(self.best_metric)) for info in checkpoints),
                                self.greater_is_better))
        return [info.step in keep for info in checkpoints]


def _step_number(step: Any) -> int:
    try:
        number = operator.index(step)
    except TypeError:
        number = None
    if number is None or number < 0 or isinstance(step, bool):
        raise CheckpointError(f"step must be an int >= 0 (the optimizer step), got {step!r}")
    return number


def _json_mapping(values: Mapping | None, what: str, kind: type) -> dict:
    """``values`` as a JSON-ready dict of str to ``kind`` (int or float), numpy and jax scalars included."""
    if values is None:
        return {}
    described = "an int" if kind is int else "a number"
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{what} must be a dict of str to {kind.__name__}, got {type(values).__name__}")
    converted = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{what} keys must be str, got {name!r}")
        try:
            number = np.asarray(value).item()
        except (TypeError, ValueError):
            number = None
        if isinstance(number, bool) or not isinstance(number, numbers.Integral if kind is int else numbers.Real):
            raise CheckpointError(f"{what}[{name!r}] must be {described}, got {value!r}")
        converted[name] = kind(number)
    return converted


def _reason(error: BaseException) -> str:
    """The first line of an exception, shortened: what a one-line message can say about the cause."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 160:
        line = line[:157] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _abstract(like: Any) -> Any:
    """Shape, dtype and sharding of each array of ``like``; arrays without a sharding go to the default device."""

    def one(leaf):
        abstract = ocp.utils.to_shape_dtype_struct(leaf)
        if isinstance(abstract, jax.ShapeDtypeStruct) and abstract.sharding is None:
            abstract = jax.ShapeDtypeStruct(abstract.shape, abstract.dtype,
                                            sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return abstract

    return jax.tree_util.tree_map(one, like)


def _remove_unfinished_saves(directory: pathlib.Path) -> None:
    """Deletes the temporary folders of saves that never finished (the process was killed while writing)."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        step, suffix, _ = path.name.partition(TMP_SUFFIX)
        if suffix and step.isdigit() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(STATE_ITEM, args, ocp.handlers.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(RUN_ITEM, args, ocp.handlers.JsonCheckpointHandler)
    return registry


class CheckpointManager:
    """Saves and restores the checkpoints of one run in ``directory``; also a context manager (closes on exit).

    Args:
        directory: the folder holding one sub-folder per saved step; created on the first save.
        max_to_keep: keep only the last this many checkpoints (``None``: all), like HF's ``save_total_limit``.
        best_metric: a key of the ``metrics`` given to ``save`` (e.g. ``"eval_loss"``); the checkpoint with the best
            value is never deleted, whatever ``max_to_keep`` says (HF's ``load_best_model_at_end``). Checkpoints
            saved without that metric do not compete; on a tie the earlier checkpoint stays the best.
        greater_is_better: whether a larger ``best_metric`` is better (accuracy) or a smaller one (loss).
        async_save: ``save`` returns once the arrays are copied to host memory, and the files are written in the
            background (the state may then be donated to the next train step); ``wait_until_finished`` blocks
            until they are on disk.
        read_only: only list and restore; nothing in ``directory`` is changed (the temporary folders of saves in
            progress, or of saves that never finished, are left to the run's writer).

    Example:
        >>> import tempfile, jax.numpy as jnp, optax
        >>> from jaxpeft import training
        >>> state = training.init_train_state({"w": jnp.ones(2), "lora": jnp.zeros(2)}, {"w": False, "lora": True},
        ...                                   optax.adam(0.1))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     with CheckpointManager(directory, max_to_keep=2, best_metric="eval_loss") as manager:
        ...         for step, loss in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        ...             manager.save(step, state.replace(step=jnp.int32(step)),
        ...                          data_position={"epoch": 0, "step_in_epoch": step}, metrics={"eval_loss": loss})
        ...         manager.wait_until_finished()
        ...         restored = manager.restore(like=state)
        ...         print(manager.all_steps(), manager.best_step(), restored.step, int(restored.state.step))
        ...         print(restored.data_position, restored.metrics)
        [1, 2, 3] 1 3 3
        {'epoch': 0, 'step_in_epoch': 3} {'eval_loss': 0.6}
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
                 best_metric: str | None = None, greater_is_better: bool = False, async_save: bool = True,
                 read_only: bool = False):
        if max_to_keep is not None and not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise CheckpointError(f"max_to_keep must be an int >= 1 (or None to keep every checkpoint), got "
                                  f"{max_to_keep!r}")
        if best_metric is not None and not (isinstance(best_metric, str) and best_metric):
            raise CheckpointError(f"best_metric must be the name of a metric such as 'eval_loss', got {best_metric!r}")
        self.directory = pathlib.Path(os.path.abspath(os.fspath(directory)))
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is a file, not a folder; pass a folder for the checkpoints")
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.greater_is_better = bool(greater_is_better)
        self.read_only = bool(read_only)
        options = ocp.CheckpointManagerOptions(
            read_only=self.read_only,
            create=False,  # created by the first save, so a restore from a wrong path leaves nothing behind
            enable_async_checkpointing=async_save,
            preservation_policy=_LatestAndBest(max_to_keep, best_metric, self.greater_is_better),
            # Orbax writes and reads the ranking metric only when a best_fn is set; the policy does the ranking.
            best_fn=None if best_metric is None else (lambda metrics: (metrics or {}).get(best_metric, math.nan)),
        )
        if not self.read_only and jax.process_index() == 0:  # one process cleans up
            _remove_unfinished_saves(self.directory)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())
        except Exception as error:
            raise CheckpointError(f"cannot open the checkpoints in {self.directory} ({_reason(error)}): a step "
                                  "folder in it is damaged; move that folder out to resume from the others") from error
        self._writing: int | None = None  # the step being written in the background
        self._scores: dict[int, Any] = {}
        if best_metric is not None:
            for step in self._manager.all_steps():
                self._scores[step] = (self._manager.metrics(step) or {}).get(best_metric)

    # ----- saving

    def save(self, step: int, state: TrainState, *, data_position: Mapping[str, int],
             metrics: Mapping[str, float] | None = None) -> None:
        """Saves ``state`` as checkpoint ``step`` (asynchronously unless ``async_save=False``), then deletes the
        checkpoints that ``max_to_keep`` and ``best_metric`` no longer keep.

        Args:
            step: the optimizer step the state was taken after; must not be saved already.
            state: a ``jaxpeft.training.TrainState`` (or any pytree of arrays).
            data_position: ints saying where the data iterator resumes, e.g. ``{"epoch": 1, "step_in_epoch": 7}``.
            metrics: numbers to keep with it, e.g. ``{"eval_loss": 0.3}``; ``best_metric`` is looked up here.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory, CheckpointManager(directory) as manager:
            ...     manager.save(10, {"lora": jnp.ones(2)}, data_position={"epoch": 1, "step_in_epoch": 2})
            ...     manager.save(10, {"lora": jnp.ones(2)}, data_position={"epoch": 1, "step_in_epoch": 2})
            Traceback (most recent call last):
            ...
            jaxpeft.checkpoints.CheckpointError: checkpoint step 10 already exists in ...
        """
        step = _step_number(step)
        if self.read_only:
            raise CheckpointError(f"the checkpoints in {self.directory} were opened read_only; open them without it "
                                  "to save")
        position = _json_mapping(data_position, "data_position", int)
        metrics = _json_mapping(metrics, "metrics", float)
        self.wait_until_finished()  # the previous write's failure is reported as that step's, not this one's
        if step in self._manager.all_steps():
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}; save under a new step, "
                                  "or delete that folder first")
        leaves = _leaves_by_name(state)
        if not leaves:
            raise CheckpointError("the state to save has no arrays; pass the TrainState of the run")
        deleted = [name for name, leaf in leaves.items() if getattr(leaf, "is_deleted", lambda: False)()]
        if deleted:
            raise CheckpointError(f"the state's array {deleted[0]} was deleted (donated to a train step?); save the "
                                  "state the step returned, before passing it to the next step")
        run = {"format": FORMAT_VERSION, "data_position": position, "metrics": metrics,
               "checksums": {name: _checksum(leaf) for name, leaf in leaves.items()}}
        ranking = None
        if self.best_metric is not None:
            ranking = {self.best_metric: metrics[self.best_metric]} if self.best_metric in metrics else {}
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), RUN_ITEM: ocp.args.JsonSave(run)})
        try:
            self._manager.save(step, args=args, metrics=ranking, force=True)
            self._writing = step
        except Exception as error:
            self._recover()
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed ({_reason(error)}); "
                                  "check that the folder is writable and has free space") from error
        if self.best_metric is not None:
            self._scores[step] = ranking.get(self.best_metric)

    def _recover(self) -> None:
        """After a failed write: drops its temporary folder and lists the steps from disk again (the failed step
        had already taken the place of the ones it would have made obsolete, which are still there)."""
        _remove_unfinished_saves(self.directory)
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until the checkpoints being written in the background are on disk.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory, CheckpointManager(directory) as manager:
            ...     manager.save(1, {"lora": jnp.ones(2)}, data_position={"epoch": 0})
            ...     manager.wait_until_finished()
            ...     sorted(path.name for path in manager.directory.iterdir())
            ['1']
        """
        step, self._writing = self._writing, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._recover()
            raise CheckpointError(f"writing checkpoint step {step} in {self.directory} failed ({_reason(error)}); "
                                  "check that the folder is writable and has free space") from error

    def close(self) -> None:
        """Waits for the pending writes and deletions, then releases Orbax's resources.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory:
            ...     manager = CheckpointManager(directory)
            ...     manager.save(1, {"lora": jnp.ones(2)}, data_position={"epoch": 0})
            ...     manager.close()
            ...     CheckpointManager(directory).all_steps()
            [1]
        """
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- listing

    def all_steps(self) -> list[int]:
        """The saved steps, ascending (including one still being written in the background).

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as directory:
            ...     CheckpointManager(directory).all_steps()
            []
        """
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The highest saved step, ``None`` when there is none.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory, CheckpointManager(directory) as manager:
            ...     print(manager.latest_step())
            ...     manager.save(4, {"lora": jnp.ones(2)}, data_position={"epoch": 0})
            ...     manager.latest_step()
            None
            4
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric``; ``None`` when no checkpoint has that metric (or no
        ``best_metric`` was given).

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory:
            ...     with CheckpointManager(directory, best_metric="accuracy", greater_is_better=True) as manager:
            ...         for step, accuracy in [(1, 0.5), (2, 0.8), (3, 0.7)]:
            ...             manager.save(step, {"lora": jnp.ones(2)}, data_position={"epoch": 0},
            ...                          metrics={"accuracy": accuracy})
            ...         manager.best_step()
            2
        """
        if self.best_metric is None:
            return None
        kept = set(self._manager.all_steps())
        return _best_step(((step, score) for step, score in self._scores.items() if step in kept),
                          self.greater_is_better)

    # ----- restoring

    def _unreadable(self, step: int, cause: str) -> DamagedCheckpointError:
        earlier = [saved for saved in self.all_steps() if saved < step]
        folder = self.directory / str(step)
        advice = (f"delete that folder to resume from step {earlier[-1]}, or pass step={earlier[-1]}" if earlier
                  else "delete that folder and start the run again")
        return DamagedCheckpointError(f"checkpoint step {step} in {folder} cannot be read ({cause}): {advice}", step,
                                      cause)

    def set_aside(self, step: int) -> pathlib.Path:
        """Renames checkpoint ``step``'s folder to ``<step>.damaged`` (``<step>.damaged-2``, ... when taken), so that
        it is kept for inspection and no longer counts as a checkpoint; returns the new path.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory, CheckpointManager(directory) as manager:
            ...     manager.save(3, {"lora": jnp.ones(2)}, data_position={"epoch": 0})
            ...     manager.set_aside(3).name, manager.all_steps()
            ('3.damaged', [])
        """
        step = _step_number(step)
        if self.read_only:
            raise CheckpointError(f"the checkpoints in {self.directory} were opened read_only; nothing is moved")
        self.wait_until_finished()
        source = self.directory / str(step)
        target, number = source.with_name(f"{step}.damaged"), 1
        while target.exists():
            number += 1
            target = source.with_name(f"{step}.damaged-{number}")
        os.rename(source, target)
        self._manager.reload()
        self._scores.pop(step, None)
        return target

    def _check_fits(self, step: int, saved: Any, target: Any) -> None:
        """Raises when the checkpoint's arrays do not have the names, shapes and dtypes of ``target``'s."""
        saved_leaves = _leaves_by_name(getattr(saved, "tree", saved))
        target_leaves = _leaves_by_name(target)
        where = f"checkpoint step {step} in {self.directory / str(step)} does not fit the state to restore into"
        hint = "build `like` with the adapter and optimizer configuration the run was saved with"
        missing = [name for name in target_leaves if name not in saved_leaves]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{where}: it has no array {missing[0]}{more}, which `like` has; {hint}")
        extra = [name for name in saved_leaves if name not in target_leaves]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{where}: it has an array {extra[0]}{more}, which `like` lacks; {hint}")
        for name, target_leaf in target_leaves.items():
            saved_leaf = saved_leaves[name]
            shape, dtype = getattr(saved_leaf, "shape", None), getattr(saved_leaf, "dtype", None)
            if shape is not None and tuple(shape) != tuple(target_leaf.shape):
                raise CheckpointError(f"{where}: the shapes differ at {name}, {tuple(shape)} in the checkpoint and "
                                      f"{tuple(target_leaf.shape)} in `like` (a different LoRA rank?); {hint}")
            if dtype is not None and np.dtype(dtype) != np.dtype(target_leaf.dtype):
                raise CheckpointError(f"{where}: the dtypes differ at {name}, {np.dtype(dtype)} in the checkpoint "
                                      f"and {np.dtype(target_leaf.dtype)} in `like`; {hint}")

    def restore(self, like: TrainState, step: int | None = None) -> Restored:
        """Restores checkpoint ``step`` (``None``: the latest) onto the shapes, dtypes and shardings of ``like``.

        The arrays come back bit for bit as saved. Raises ``CheckpointError`` when there is no checkpoint, when
        the checkpoint's arrays do not match ``like``'s (naming the first that differs), or when its files are
        damaged (naming the folder to delete to fall back on the step before).

        Args:
            like: a state of the run's structure, e.g. a fresh ``init_train_state`` (its values are not used).
            step: the step to restore; ``None`` for the latest.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> with tempfile.TemporaryDirectory() as directory:
            ...     CheckpointManager(directory).restore(like={"lora": jnp.ones(2)})
            Traceback (most recent call last):
            ...
            jaxpeft.checkpoints.CheckpointError: there is no checkpoint in ...
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"there is no checkpoint in {self.directory}; check the path, or start the run "
                                  "without resuming")
        step = steps[-1] if step is None else _step_number(step)
        if step not in steps:
            raise CheckpointError(f"there is no checkpoint step {step} in {self.directory}; it holds steps {steps}")
        target = _abstract(like)
        try:
            saved = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as error:
            raise self._unreadable(step, _reason(error)) from error
        if saved is None:
            raise self._unreadable(step, f"its '{STATE_ITEM}' folder is missing")
        self._check_fits(step, saved, target)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target), RUN_ITEM: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
            state, run = restored[STATE_ITEM], restored[RUN_ITEM]
        except Exception as error:
            raise self._unreadable(step, _reason(error)) from error
        if not (isinstance(run, Mapping) and isinstance(run.get("data_position"), Mapping)
                and isinstance(run.get("metrics"), Mapping) and isinstance(run.get("checksums"), Mapping)):
            raise self._unreadable(step, f"its '{RUN_ITEM}' file is not what this version writes")
        checksums = run["checksums"]
        for name, leaf in _leaves_by_name(state).items():
            expected = checksums.get(name)
            if expected is not None and _checksum(leaf) not in (None, expected):
                raise self._unreadable(step, f"the data of {name} does not match its checksum: a file is damaged")
        return Restored(step=step, state=state, data_position=dict(run["data_position"]),
                        metrics=dict(run["metrics"]))
