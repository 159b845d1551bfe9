"""The functional training step for your own loops: state, optimizer, jitted train and eval steps, losses.

In the style of optax: plain functions over a small state. Only the trainable subtree (the first half of
``jaxpeft.partition``) is in the state, with the optimizer state, the step count and the seed's key, so a
checkpoint of the state holds exactly what training changes; the frozen base is handed to ``make_train_step``
once and never copied into the state or differentiated.

Example:
    >>> import jax.numpy as jnp, jaxpeft
    >>> from jaxpeft import training
    >>> params = {"w": jnp.ones(2), "lora": jnp.zeros(2)}
    >>> trainable, frozen = jaxpeft.partition(params, {"w": False, "lora": True})
    >>> optimizer, schedule = training.make_optimizer(0.1, total_steps=10, schedule="constant")
    >>> state = training.init_train_state(params, {"w": False, "lora": True}, optimizer, seed=0)
    >>> def loss_fn(params, batch, rng):
    ...     return jnp.mean((batch["x"] @ (params["w"] + params["lora"]) - batch["y"]) ** 2)
    >>> step = training.make_train_step(loss_fn, optimizer, frozen, schedule=schedule)
    >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros(4)}
    >>> state, metrics = step(state, batch)
    >>> int(state.step), float(metrics["loss"]), bool(metrics["is_finite"])
    (1, 4.0, True)
    >>> training.full_params(state, frozen)["w"].tolist()  # the frozen leaf never moves
    [1.0, 1.0]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxpeft import quantization, sharding
from jaxpeft.config import HEAD_TASK_TYPES as TASKS
from jaxpeft.data import IGNORE_INDEX
from jaxpeft.losses import DEFAULT_CHUNK_SIZE, chunked_causal_lm_sums
from jaxpeft.methods.prompt_tuning import extend_labels
from jaxpeft.tree import ADAPTER_KEYS, CONSTANT_KEYS, SAVED_MODULES_KEY, combine, partition

SCHEDULES = ("linear", "cosine", "constant")


@flax.struct.dataclass
class TrainState:
    """What training changes, and nothing else: the checkpoint of a run.

    Attributes:
        step: int32 scalar, the number of updates applied.
        trainable: the trainable subtree (``None`` where a leaf is frozen), float32 adapter leaves.
        opt_state: the optimizer's state for ``trainable``.
        rng: the run's key as raw ``uint32`` key data (plain array, so checkpoints need no key handling); each
            step uses ``fold_in(rng, step)``, so a run and its resumption draw the same dropout masks.
    """

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(params: Any, mask: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh ``TrainState`` for the leaves of ``params`` that ``mask`` (e.g. ``PeftModel.trainable_mask``) marks.

    The trainable leaves are copied: the train step donates the state's buffers, and ``params`` (say a PeftModel's
    ``.params``) must stay usable.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = init_train_state({"w": jnp.ones(2), "b": jnp.ones(3)}, {"w": False, "b": True}, optax.sgd(0.1))
        >>> state.trainable["w"] is None, state.trainable["b"].shape, int(state.step)
        (True, (3,), 0)
    """
    quantized = quantization.is_quantized
    if (jax.tree_util.tree_structure(params, is_leaf=quantized)
            != jax.tree_util.tree_structure(mask, is_leaf=quantized)):
        raise ValueError("mask must have the structure of params; pass e.g. peft_model.trainable_mask with "
                         "peft_model.params")
    trainable, _ = partition(params, mask)
    trainable = jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, copy=True), trainable)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("the mask selects no trainable leaf; is the adapter loaded with is_trainable=True?")
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable),
                      rng=rng)


def full_params(state: TrainState, frozen: Any) -> Any:
    """The whole variables tree again: the state's trainable leaves put back into ``frozen``."""
    return combine(state.trainable, frozen)


# ----- optimizer -----


def _names(path: tuple[str, ...]) -> tuple[list[str], str]:
    """The module names on ``path`` and the leaf's name in its layer, adapter keys and names left out: ``lora_A``
    for ``.../lora_A/<adapter>``, ``bias`` for an adapter's copy ``.../modules_to_save/<adapter>/.../bias``."""
    modules: list[str] = []
    i = 0
    while i < len(path) - 1:
        if path[i] in ADAPTER_KEYS:
            if path[i] != SAVED_MODULES_KEY:
                return modules, path[i]
            i += 2  # the key and the adapter's name
            continue
        modules.append(path[i])
        i += 1
    return modules, path[-1]


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))) for entry in path)


def decays(path: tuple[str, ...]) -> bool:
    """Whether weight decay applies to the leaf at ``path``: not to biases (any leaf name holding ``bias``, such
    as ``bias``, ``bitfit_bias``, ``adapter_up_bias``), nor to normalization parameters (``scale``, and every leaf
    of a module named like ``LayerNorm``, ``ln_f``, ``norm``). Everything else decays, embeddings, LoRA, IA3 and
    prompt leaves included, as in HF ``Trainer``.

    Example:
        >>> decays(("params", "h_0", "attn", "c_attn", "lora_A", "default"))
        True
        >>> decays(("params", "classifier", "modules_to_save", "default", "bias"))
        False
        >>> decays(("params", "h_0", "ln_1", "scale")), decays(("params", "bert", "LayerNorm", "weight"))
        (False, False)
    """
    modules, name = _names(path)
    is_norm = any("norm" in key.lower() or key.startswith("ln_") or key == "ln" for key in modules)
    return not ("bias" in name or name == "scale" or is_norm)


def decay_mask(params: Any) -> Any:
    """A bool tree like ``params`` (``None`` leaves stay ``None``): True where weight decay applies (see
    ``decays``).

    Example:
        >>> import jax.numpy as jnp
        >>> decay_mask({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "frozen": None})
        {'dense': {'bias': False, 'kernel': True}, 'frozen': None}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(_path_keys(path)), params)


def make_schedule(learning_rate: float, *, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``"linear"`` decay to 0 at
    ``total_steps``, ``"cosine"`` decay to 0 at ``total_steps`` (half a cosine), or ``"constant"``: the schedules
    of transformers' ``get_linear_schedule_with_warmup`` and friends.

    Example:
        >>> lr = make_schedule(1.0, total_steps=10, warmup_steps=2)
        >>> [round(float(lr(s)), 3) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; use one of {list(SCHEDULES)}")
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(f"total_steps must be a positive int (the number of optimizer updates), got {total_steps!r}")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < total_steps):
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    decay_steps = total_steps - warmup_steps
    after = {
        "linear": optax.linear_schedule(learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
        "constant": optax.constant_schedule(learning_rate),
    }[schedule]
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])


def make_optimizer(learning_rate: float, *, total_steps: int, warmup_steps: int = 0, schedule: str = "linear",
                   weight_decay: float = 0.0, max_grad_norm: float | None = None, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8,
                   weight_decay_mask: Any = decay_mask) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup and a decay schedule (``make_schedule``), weight decay off for biases and norms
    (``decay_mask``; pass your own bool tree or function as ``weight_decay_mask``), and gradient clipping by
    global norm when ``max_grad_norm`` is given. Defaults are HF ``TrainingArguments``'.

    Returns ``(optimizer, schedule)``; the schedule maps a step to its learning rate (give it to
    ``make_train_step`` to log it).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> optimizer, lr = make_optimizer(1e-3, total_steps=100, warmup_steps=10)
        >>> round(float(lr(5)), 6), float(lr(100))
        (0.0005, 0.0)
        >>> optimizer, _ = make_optimizer(0.1, total_steps=10, schedule="constant", weight_decay=0.5)
        >>> params = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
        >>> zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
        >>> updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        >>> [round(float(updates["dense"][name][0]), 6) + 0.0 for name in ("kernel", "bias")]  # -0.1 * 0.5 * 1
        [-0.05, 0.0]
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    lr = make_schedule(learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    if max_grad_norm is None:
        return adamw, lr
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), lr


# ----- steps -----


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating leaves in ``dtype``; fixed constants (LoRA's scaling, ...) are kept as they are."""

    def cast(path, leaf):
        if quantization.is_quantized(leaf):  # the codes stay; the weight is dequantized straight to ``dtype``
            return leaf.replace(dtype_name=jnp.dtype(dtype).name)
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or any(key in CONSTANT_KEYS for key in _path_keys(path)):
            return leaf
        return leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, tree, is_leaf=quantization.is_quantized)


def _loss_and_aux(loss_fn: Callable, params: Any, batch: Any, rng: Any) -> tuple[jax.Array, dict]:
    """Calls ``loss_fn`` and always returns ``(scalar loss, aux dict)``."""
    out = loss_fn(params, batch, rng)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    if jnp.ndim(loss) != 0:
        raise ValueError(f"loss_fn must return a scalar loss (or (loss, aux)), got shape {jnp.shape(loss)}; "
                         "take the mean over the batch")
    if not isinstance(aux, Mapping):
        raise ValueError(f"loss_fn's aux must be a dict of scalar metrics, got {type(aux).__name__}")
    return loss.astype(jnp.float32), dict(aux)


def _micro_batches(batch: Any, count: int) -> Any:
    def split(leaf):
        if jnp.ndim(leaf) == 0 or leaf.shape[0] % count:
            raise ValueError(f"grad_accum_steps={count} must divide the batch's leading axis, got a leaf of shape "
                             f"{jnp.shape(leaf)}; use a batch size that is a multiple of {count}")
        # Micro-batch j takes rows j, j + count, ...: spread over the devices that share the batch's leading axis.
        return jnp.swapaxes(leaf.reshape(leaf.shape[0] // count, count, *leaf.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _compute_dtype(compute_dtype: Any):
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError as error:
        raise ValueError(f"compute_dtype={compute_dtype!r} is not a dtype; use e.g. 'bfloat16'") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype such as 'bfloat16', got {dtype}")
    return dtype


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, frozen: Any, *,
                    schedule: optax.Schedule | None = None, grad_accum_steps: int = 1, compute_dtype: Any = None,
                    donate: bool = True, state_sharding: Any = None,
                    batch_sharding: Any = None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The jitted train step ``(state, batch, proceed=True) -> (state, metrics)``.

    Args:
        loss_fn: ``loss_fn(params, batch, rng) -> loss`` or ``-> (loss, aux)``, with ``params`` the whole variables
            tree, ``rng`` a key for dropout (``None`` means evaluation: no dropout) and ``aux`` a dict of scalar
            metrics added to the step's metrics. ``peft_loss_fn`` builds one for a PeftModel.
        optimizer: e.g. the first half of ``make_optimizer``'s result; it sees the trainable subtree only.
        frozen: the frozen half of ``jaxpeft.partition`` (no gradient is ever computed for it).
        schedule: the learning-rate schedule, to report ``learning_rate`` in the metrics.
        grad_accum_steps: splits the batch's leading axis into this many micro-batches (micro-batch ``j`` takes
            rows ``j, j + grad_accum_steps, ...``), run one after another (``lax.scan``: memory of one micro-batch)
            with their gradients averaged. That is the big batch's
            gradient when the loss is a mean over examples of equal weight; a per-token mean (``causal_lm_loss``)
            then weighs each micro-batch's tokens by its own count.
        compute_dtype: e.g. ``"bfloat16"``: the frozen base is stored in that dtype (cast once, here) and the
            trainable leaves are cast to it for the forward pass, while the state keeps them, their gradients and
            the optimizer's update in float32. The model's own ``dtype`` decides the matmuls' precision: build it
            with ``dtype="bfloat16"`` for bf16 matmuls.
        donate: donate the state's buffers to the step (the state passed in is deleted; use the one returned).
        state_sharding, batch_sharding: for a sharded step (``jaxpeft.sharding``): the state's shardings
            (``sharding.state_shardings``) and the batch's (``sharding.batch_sharding``); the step is then jitted
            with these as explicit input and output shardings, ``frozen`` keeps the shardings it has, and metrics
            come back replicated.

    Metrics: ``step`` (the step this batch ran as), ``loss``, ``grad_norm`` (before clipping), ``learning_rate``
    (with ``schedule``), ``is_finite`` (loss and gradient norm finite) and the aux metrics, averaged over
    micro-batches. A step whose loss or gradients are not finite changes nothing: the state comes back as it was,
    so a loop can stop on ``not metrics["is_finite"]`` naming ``metrics["step"]`` and still save the last good
    state. ``proceed=False`` (a device bool) makes the step change nothing either, and its ``is_finite`` False:
    pass the previous step's ``metrics["is_finite"]`` and check it after dispatching this step, so the loop never
    waits for the device, yet nothing moves past the first bad step. ``step.lower(state, batch)`` lowers the step as
    ``jax.jit``'s ``lower`` does, e.g. for ``.compile().memory_analysis()``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones(2), "lora": jnp.zeros(2)}
        >>> mask = {"w": False, "lora": True}
        >>> state = init_train_state(params, mask, optax.sgd(0.5))
        >>> step = make_train_step(lambda p, batch, rng: jnp.sum(p["lora"] * batch), optax.sgd(0.5),
        ...                        partition(params, mask)[1], grad_accum_steps=2)
        >>> state, metrics = step(state, jnp.ones((4, 2)))
        >>> state.trainable["lora"].tolist(), float(metrics["loss"])
        ([-1.0, -1.0], 0.0)
    """
    if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
    dtype = _compute_dtype(compute_dtype)
    frozen = frozen if dtype is None else _cast_floats(frozen, dtype)

    def loss_of_trainable(trainable, frozen, batch, rng):
        if dtype is not None:
            trainable = _cast_floats(trainable, dtype)  # the cast's gradient brings float32 gradients back
        return _loss_and_aux(loss_fn, combine(trainable, frozen), batch, rng)

    if quantization.has_quantized(frozen):  # QLoRA: the float weights are rebuilt in the backward pass, not kept
        loss_of_trainable = quantization.recompute_dequantized(loss_of_trainable)
    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

    def gradients(trainable, frozen, batch, rng):
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(trainable, frozen, batch, jax.random.fold_in(rng, 0))
            return loss, aux, grads

        def one_micro_batch(grads_sum, indexed):
            index, micro_batch = indexed
            (loss, aux), grads = grad_fn(trainable, frozen, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree_util.tree_map(jnp.add, grads_sum, grads), (loss, aux)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        indices = jnp.arange(grad_accum_steps)
        grads_sum, (losses, aux) = jax.lax.scan(one_micro_batch, zeros,
                                                (indices, _micro_batches(batch, grad_accum_steps)))
        grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads_sum)
        return losses.mean(), jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), aux), grads

    def train_step(state: TrainState, frozen: Any, batch: Any, proceed: jax.Array):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, aux, grads = gradients(state.trainable, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                                  opt_state=opt_state)
        is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & proceed
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(is_finite, new, old), new_state, state)
        metrics = {**aux, "step": state.step, "loss": loss, "grad_norm": grad_norm, "is_finite": is_finite}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    donated = (0,) if donate else ()
    if state_sharding is None and batch_sharding is None:
        jitted = jax.jit(train_step, donate_argnums=donated)
    else:
        if state_sharding is None or batch_sharding is None:
            raise ValueError("a sharded train step needs both state_sharding and batch_sharding (see "
                             "jaxpeft.sharding.state_shardings and batch_sharding)")
        whole = sharding.replicated(batch_sharding.mesh)
        frozen_sharding = jax.tree_util.tree_map(lambda leaf: getattr(leaf, "sharding", whole), frozen)
        jitted = jax.jit(train_step, donate_argnums=donated,
                         in_shardings=(state_sharding, frozen_sharding, batch_sharding, whole),
                         out_shardings=(state_sharding, whole))

    def step(state: TrainState, batch: Any, proceed: Any = True) -> tuple[TrainState, dict]:
        return jitted(state, frozen, batch, jnp.asarray(proceed, bool))

    step.lower = lambda state, batch, proceed=True: jitted.lower(state, frozen, batch, jnp.asarray(proceed, bool))
    return step


def make_eval_step(loss_fn: Callable, frozen: Any, *, compute_dtype: Any = None) -> Callable[[TrainState, Any], dict]:
    """The jitted ``(state, batch) -> metrics`` (``loss`` and the aux metrics) for ``loss_fn`` as in
    ``make_train_step``, called with ``rng=None`` (no dropout). Nothing is donated.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones(2), "lora": jnp.zeros(2)}
        >>> mask = {"w": False, "lora": True}
        >>> evaluate = make_eval_step(lambda p, batch, rng: jnp.sum((p["w"] + p["lora"]) * batch),
        ...                           partition(params, mask)[1])
        >>> float(evaluate(init_train_state(params, mask, optax.sgd(0.1)), jnp.ones(2))["loss"])
        2.0
    """
    dtype = _compute_dtype(compute_dtype)
    frozen = frozen if dtype is None else _cast_floats(frozen, dtype)

    @jax.jit
    def eval_step(state: TrainState, frozen: Any, batch: Any) -> dict:
        trainable = state.trainable if dtype is None else _cast_floats(state.trainable, dtype)
        loss, aux = _loss_and_aux(loss_fn, combine(trainable, frozen), batch, None)
        return {**aux, "loss": loss}

    def step(state: TrainState, batch: Any) -> dict:
        return eval_step(state, frozen, batch)

    return step


# ----- losses -----


def loss_sums(logits: jax.Array, labels: Any, task: str, weights: Any = None,
              ignore_index: int = IGNORE_INDEX) -> dict[str, jax.Array]:
    """The loss of a batch as sums that add up over batches: ``{"loss_sum", "count", "correct"}``, float32
    scalars, with ``loss_sum / count`` the mean loss and ``correct / count`` the accuracy of the argmax.

    ``task``: ``"causal_lm"`` sums the next-token cross-entropy (the logits at position t predict ``labels[t + 1]``,
    as transformers) and ``"token_cls"`` the cross-entropy of every token, both over the labels that are not
    ``ignore_index``; ``"seq_cls"`` sums the cross-entropy of every example (``(batch, classes)`` logits), or its
    squared error for one output (regression, with ``correct`` 0). ``weights``, one per example, scale each
    example's terms: weight-0 rows (the filler rows of a fixed-shape last batch) count for nothing.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5], [1.0, 1.0]]]))
        >>> sums = loss_sums(logits, [[0, 1, -100]], "causal_lm")  # only label 1 at position 1 counts: -log 0.75
        >>> round(float(sums["loss_sum"]), 4), float(sums["count"]), float(sums["correct"])
        (0.2877, 1.0, 1.0)
        >>> sums = loss_sums(jnp.zeros((3, 4)), [0, 1, 2], "seq_cls", weights=[1, 1, 0])  # the third is filler
        >>> round(float(sums["loss_sum"]), 4), float(sums["count"])  # 2 log 4
        (2.7726, 2.0)
    """
    if task not in TASKS:
        raise ValueError(f"no loss for task {task!r}; use one of {sorted(TASKS)}")
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if task == "seq_cls":
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"a classification loss needs logits (batch, classes) and labels (batch,), got "
                             f"{logits.shape} and {labels.shape}")
        keep = jnp.ones(labels.shape, bool)
        if logits.shape[1] == 1:
            losses = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
            correct = jnp.zeros(labels.shape, bool)
        else:
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            correct = jnp.argmax(logits, -1) == labels
    else:
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match: labels need the shape "
                             "of the logits without their last axis")
        keep = labels != ignore_index
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
        correct = keep & (jnp.argmax(logits, -1) == labels)
    weight = keep.astype(jnp.float32)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != labels.shape[:1]:
            raise ValueError(f"weights must have one value per example, shape {labels.shape[:1]}, got "
                             f"{weights.shape}")
        weight = weight * weights.reshape(weights.shape + (1,) * (keep.ndim - 1))
    counted = weight > 0  # weight-0 terms are left out: a NaN or inf there cannot spread
    return {"loss_sum": jnp.sum(jnp.where(counted, losses * weight, 0.0)), "count": jnp.sum(weight),
            "correct": jnp.sum(jnp.where(counted & correct, weight, 0.0))}


def _mean(sums: Mapping[str, jax.Array], name: str = "loss_sum") -> jax.Array:
    return sums[name] / jnp.maximum(sums["count"], 1.0)


def causal_lm_loss(logits: jax.Array, labels: Any, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Next-token cross-entropy as transformers computes it: the logits at position t predict ``labels[t + 1]``;
    mean over the labels that are not ``ignore_index`` (0 when there are none).

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
        >>> round(float(causal_lm_loss(logits, [[0, 1, -100]])), 4)  # only label 1 at position 1 counts
        0.6931
    """
    return _mean(loss_sums(logits, labels, "causal_lm", ignore_index=ignore_index))


def token_classification_loss(logits: jax.Array, labels: Any, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Cross-entropy per token, mean over the labels that are not ``ignore_index`` (no shift).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(token_classification_loss(jnp.zeros((1, 2, 4)), [[3, -100]])), 4)  # log 4
        1.3863
    """
    return _mean(loss_sums(logits, labels, "token_cls", ignore_index=ignore_index))


def classification_loss(logits: jax.Array, labels: Any) -> jax.Array:
    """Mean cross-entropy of ``(batch, classes)`` logits against integer labels; for one output
    (``num_labels=1``) the mean squared error against float targets, as transformers' regression.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(classification_loss(jnp.zeros((2, 3)), [0, 2])), 4)  # log 3
        1.0986
    """
    return _mean(loss_sums(logits, labels, "seq_cls"))


def _task_of(peft_model, task: str | None) -> str:
    return _task_of_name(getattr(peft_model, "base_model", peft_model).head if task is None else task)


def _task_of_name(task: str) -> str:
    by_hf_name = {hf: ours for ours, hf in TASKS.items()}
    task = by_hf_name.get(task, task)
    if task not in TASKS:
        raise ValueError(f"no loss for task {task!r}; use one of {sorted(TASKS)} or write your own loss_fn")
    return task


def _model_inputs(batch: Mapping, accepted: set[str], rng: jax.Array | None) -> dict:
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    unknown = sorted(set(inputs) - accepted)
    if unknown:
        raise ValueError(f"the batch has {unknown}, which the model does not take; it takes "
                         f"{sorted(accepted - {'deterministic'})} and 'labels'")
    if "deterministic" in accepted:
        inputs["deterministic"] = rng is None
    return inputs


def _batch_labels(batch: Mapping, task: str, ignore_index: int) -> jax.Array:
    """The batch's labels; a causal-LM batch without them scores its ``input_ids`` (padding ignored)."""
    labels = batch.get("labels")
    if labels is None:
        if task != "causal_lm":
            raise ValueError(f"the batch needs 'labels' for the {task} loss")
        labels = batch["input_ids"]
        if batch.get("attention_mask") is not None:
            labels = jnp.where(jnp.asarray(batch["attention_mask"]) == 0, ignore_index, labels)
    return jnp.asarray(labels)


def runs_head_apart(peft_model) -> bool:
    """Whether the model's causal-LM loss can run its output head a chunk at a time (``jaxpeft.losses``): a
    ``jaxpeft.models`` causal LM (``hidden_states`` and ``lm_logits``) whose active adapter, if any, changes
    layers rather than the whole call (prompt tuning adds positions)."""
    from jaxpeft.method import method_for

    base = getattr(peft_model, "base_model", peft_model)
    module = getattr(base, "module", None)
    if not (hasattr(module, "hidden_states") and hasattr(module, "lm_logits")):
        return False
    name = getattr(peft_model, "active_adapter", None)
    return name is None or method_for(peft_model.peft_config[name]).call is None


def peft_outputs_fn(peft_model, task: str | None = None, ignore_index: int = IGNORE_INDEX, *,
                    lm_loss_chunk_size: int | None = None) -> Callable:
    """``outputs(params, batch, rng, weights=None) -> (sums, logits)``: runs a PeftModel's active adapter (the base
    model when it has none, or a ``jaxpeft.models`` model itself) on a batch and scores it with ``loss_sums``: the
    loss of training and evaluation alike.

    ``batch`` is a dict of the model's inputs (``input_ids``, ``attention_mask``, ``token_type_ids``, ...) plus
    ``labels``; for ``"causal_lm"`` a batch without labels scores its ``input_ids`` (padding, attention mask 0,
    ignored). ``task`` (``"causal_lm"``, ``"seq_cls"``, ``"token_cls"`` or HF's ``"CAUSAL_LM"``, ...) defaults to
    the model's head. Dropout runs when ``rng`` is a key. When the logits carry virtual tokens (prompt tuning) the
    labels are extended as ``jaxpeft.extend_labels`` does, and the returned float32 ``logits`` are those of the
    batch's own positions. With ``lm_loss_chunk_size`` a causal LM's loss runs the output head that many tokens at
    a time (``jaxpeft.losses.chunked_causal_lm_sums``, where ``runs_head_apart``) and ``logits`` is None: the
    ``(batch, seq, vocab)`` logits are never held (adapter dropout on the head itself does not run then).

    Example:
        >>> import jax, transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForSequenceClassification
        >>> base = AutoModelForSequenceClassification.from_config(transformers.BertConfig(vocab_size=20,
        ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
        >>> model = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(num_virtual_tokens=2))
        >>> outputs = peft_outputs_fn(model)
        >>> batch = {"input_ids": jax.numpy.array([[1, 5, 2], [1, 6, 2]]), "labels": jax.numpy.array([0, 1])}
        >>> sums, logits = outputs(model.params, batch, None, weights=jax.numpy.array([1.0, 0.0]))
        >>> float(sums["count"]), logits.shape
        (1.0, (2, 2))
    """
    task = _task_of(peft_model, task)
    apply_fn = peft_model.apply_fn
    base = getattr(peft_model, "base_model", peft_model)
    accepted = set(inspect.signature(type(base.module).__call__).parameters) - {"self"}
    chunked = bool(lm_loss_chunk_size) and task == "causal_lm" and runs_head_apart(peft_model)

    def outputs(params: Any, batch: Mapping, rng: jax.Array | None, weights: Any = None):
        inputs = _model_inputs(batch, accepted, rng)
        labels = _batch_labels(batch, task, ignore_index)
        rngs = None if rng is None else {"dropout": rng}
        if chunked:
            hidden = apply_fn(params, **inputs, rngs=rngs, method="hidden_states")
            sums = chunked_causal_lm_sums(hidden, labels, lambda h: apply_fn(params, h, method="lm_logits"),
                                          chunk_size=lm_loss_chunk_size, weights=weights, ignore_index=ignore_index)
            return sums, None
        out = apply_fn(params, **inputs, rngs=rngs)
        logits = (out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)).astype(jnp.float32)
        extra = logits.shape[1] - labels.shape[1] if task != "seq_cls" else 0
        if extra > 0:  # virtual tokens in front (prompt tuning)
            labels = extend_labels(labels, extra, ignore_index)
        sums = loss_sums(logits, labels, task, weights, ignore_index)
        return sums, logits[:, extra:] if extra > 0 else logits

    return outputs


def peft_loss_fn(peft_model, task: str | None = None, ignore_index: int = IGNORE_INDEX, *,
                 lm_loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> Callable:
    """A ``loss_fn(params, batch, rng)`` for ``make_train_step`` that runs a PeftModel's active adapter.

    The batch, ``task``, dropout and ``lm_loss_chunk_size`` (None: the full logits) are as for
    ``peft_outputs_fn``; the loss is its ``loss_sum / count``: the mean
    over the examples (``"seq_cls"``) or over the labelled tokens, plus, in training (``rng`` a key), the active
    adapter's method's ``loss_term`` (AdaLoRA's orthogonal regularization). For ``"seq_cls"`` the aux metric
    ``accuracy`` is returned too.

    Example:
        >>> import jax, transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=10, n_positions=8, bos_token_id=0, eos_token_id=0))
        >>> model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2))
        >>> loss_fn = peft_loss_fn(model)
        >>> bool(loss_fn(model.params, {"input_ids": jax.numpy.array([[1, 2, 3]])}, None) > 0)
        True
    """
    task = _task_of(peft_model, task)
    outputs = peft_outputs_fn(peft_model, task, ignore_index, lm_loss_chunk_size=lm_loss_chunk_size)
    extra_term = method_loss_term(peft_model)

    def loss_fn(params: Any, batch: Mapping, rng: jax.Array | None):
        sums, _ = outputs(params, batch, rng)
        loss = _mean(sums)
        if extra_term is not None and rng is not None:  # training only, as HF PEFT's model.train()
            loss = loss + extra_term(params)
        if task == "seq_cls":
            return loss, {"accuracy": _mean(sums, "correct")}
        return loss

    return loss_fn


# ----- what the active adapter's method adds to training (``jaxpeft.method.Method``'s training hooks) -----


def _active_method(peft_model):
    """``(name, config, method)`` of a PeftModel's active adapter (``jaxpeft.method.Method``), or None."""
    from jaxpeft.method import method_for

    name = peft_model.active_adapter
    if name is None:
        return None
    config = peft_model.peft_config[name]
    return name, config, method_for(config)


def method_loss_term(peft_model) -> Callable[[Any], jax.Array] | None:
    """``params -> scalar``: the active adapter's method's ``loss_term`` (``jaxpeft.method.Method``), or None."""
    active = _active_method(peft_model)
    if active is None or active[2].loss_term is None:
        return None
    name, config, method = active
    return lambda params: method.loss_term(config, params, name)


def method_optimizer(peft_model, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` as the active adapter's method trains with it: its ``wrap_optimizer`` (AdaLoRA's rank
    allocator), or ``optimizer`` itself."""
    active = _active_method(peft_model)
    if active is None or active[2].wrap_optimizer is None:
        return optimizer
    name, config, method = active
    return method.wrap_optimizer(config, optimizer, peft_model.params, name)


def keep_trained_config(peft_model, opt_state: Any) -> None:
    """Gives a ``PeftModel``'s active adapter the config its method's ``trained_config`` makes of ``opt_state``
    (the state of ``method_optimizer``'s optimizer after training), so that ``save_pretrained`` writes it: AdaLoRA's
    ``rank_pattern``. Models of other kinds (NNX) keep their config."""
    from jaxpeft.peft_model import PeftModel, _sample_inputs

    active = _active_method(peft_model) if isinstance(peft_model, PeftModel) else None
    if active is None or active[2].trained_config is None:
        return
    name, config, method = active
    base = peft_model.base_model
    peft_model.peft_config[name] = method.trained_config(config, opt_state, base.apply_fn, peft_model.params, (),
                                                         _sample_inputs(base), name)
