"""Sharded training with JAX's own runtime: a device mesh, logical-axis rules, and shardings for adapters.

The models of ``jaxpeft.models`` name the axes of every parameter (``embed``, ``mlp``, ``heads``, ``kv``,
``vocab``, ``layers``); any linen model that boxes its parameters with ``nn.with_logical_partitioning`` does the
same. ``rules`` map those names to the axes of a mesh (``data``, ``fsdp``, ``tensor``), and each adapter leaf takes
its axes from the weight it adapts, as its method declares (``jaxpeft.tree.LEAF_LAYOUTS``): LoRA's A follows the
weight's input axes, B its output axes, the rank axis is never sharded, and scanned layers keep their layer axis.
Leaves on a module's own parameter (``own_params``, ``target_parameters``) keep that parameter's axes, so an
expert's A and B are sharded as the expert tensor is (``exp``, replicated by the default rules). A leaf without
logical names is replicated.

Over several hosts, each process calls ``initialize_distributed`` first, builds the same mesh over all devices,
and passes its own rows of each batch to ``shard_batch`` (``jax.make_array_from_process_local_data``).

Example:
    >>> import jax, transformers, jaxpeft
    >>> from jaxpeft import sharding
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> base = AutoModelForCausalLM.from_config(transformers.LlamaConfig(hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    >>> model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    >>> mesh = sharding.make_mesh(data=-1)
    >>> specs = sharding.param_specs(model.params, base.logical_axes())
    >>> specs["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_A"]["default"]
    P('embed', None)
    >>> model.params = sharding.shard_params(model.params, mesh, base.logical_axes())
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpeft import quantization
from jaxpeft._tracing import PARAM_SLOTS
from jaxpeft.tree import ADAPTER_KEYS, LEAF_LAYOUTS, SAVED_MODULES_KEY, flatten, shape_of, unflatten_like

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis name -> mesh axes. Batches split over data and fsdp; fsdp shards the model's width, tensor the
# heads, key/value heads, MLP and vocabulary; the layer axis of scanned stacks is never split.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("exp", None),
)
WEIGHT_NAMES = ("kernel", "embedding")
ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

logger = logging.getLogger(__name__)


class ShardingError(ValueError):
    """A mesh, rule or parameter tree that cannot be sharded as asked; the message says what to change."""


# ----------------------------------------------------------------------------------------------- the mesh


def parse_mesh(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """Mesh axis sizes from ``"data=4,fsdp=2"`` (or a dict); missing axes get 1, and one size may be -1 (the rest
    of the devices). ``None`` or ``""`` is ``{"data": -1}``: data parallel over every device.

    Example:
        >>> parse_mesh("fsdp=2,data=-1")
        {'data': -1, 'fsdp': 2, 'tensor': 1}
    """
    if text is None or text == "":
        sizes: dict[str, Any] = {"data": -1}
    elif isinstance(text, Mapping):
        sizes = dict(text)
    else:
        sizes = {}
        for item in str(text).split(","):
            name, _, value = item.strip().partition("=")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ShardingError(f"mesh {text!r}: {item.strip()!r} is not NAME=SIZE; write e.g. 'data=4,fsdp=2'"
                                    ) from None
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"mesh axes {unknown} are unknown; use {list(MESH_AXES)}, e.g. 'data=4,fsdp=2'")
    return {name: int(sizes.get(name, 1)) for name in MESH_AXES}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every device of every process); one size may be
    -1 for the devices left over.

    Example:
        >>> mesh = make_mesh(data=-1)
        >>> mesh.axis_names, mesh.devices.size == jax.device_count()
        (('data', 'fsdp', 'tensor'), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sum(size == -1 for size in sizes) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ShardingError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: give positive sizes, at most one "
                            "of them -1")
    known = int(np.prod([size for size in sizes if size != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into a mesh with fixed sizes "
                                f"{dict(zip(MESH_AXES, sizes, strict=True))}; use sizes whose product divides "
                                f"{len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ShardingError(f"a mesh of data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                            f"{int(np.prod(sizes))} devices, there are {len(devices)}; make the sizes multiply to "
                            f"{len(devices)} or set one of them to -1")
    # Auto axes: XLA propagates the shardings of parameters and batch through any model, annotated or not.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def mesh_from(mesh: Mesh | str | Mapping[str, int] | None) -> Mesh:
    """``mesh`` itself, or the mesh that ``parse_mesh`` describes.

    Example:
        >>> dict(mesh_from("data=-1").shape)["fsdp"]
        1
    """
    if isinstance(mesh, Mesh):
        return mesh
    return make_mesh(**parse_mesh(mesh))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Starts JAX's multi-process runtime (``jax.distributed.initialize``) when this is one process of several.

    The arguments come from the call, else from the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of them, ``auto=True`` lets JAX detect the cluster
    (TPU pods, Slurm, Open MPI); otherwise nothing is started (one process). Call it before any other JAX work.
    Returns whether the runtime was started here.

    Example:
        >>> initialize_distributed()  # one process: nothing to start
        False
    """
    values = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for (name, value), variable in zip(list(values.items()), ENVIRONMENT, strict=True):
        if value is None and os.environ.get(variable):
            values[name] = os.environ[variable]
    given = {name: value for name, value in values.items() if value is not None}
    if not given and not auto:
        return False
    if given and len(given) < 3:
        missing = sorted(set(values) - set(given))
        raise ShardingError(f"a multi-process start needs coordinator_address, num_processes and process_id; "
                            f"{missing} missing (pass them or set {', '.join(ENVIRONMENT)})")
    if given:
        try:
            values["num_processes"], values["process_id"] = int(values["num_processes"]), int(values["process_id"])
        except ValueError:
            raise ShardingError(f"num_processes and process_id must be integers, got {values['num_processes']!r} "
                                f"and {values['process_id']!r}") from None
        if not 0 <= values["process_id"] < values["num_processes"]:
            raise ShardingError(f"process_id {values['process_id']} is outside 0..{values['num_processes'] - 1}")
    if jax.process_count() > 1:
        return False  # started already
    jax.distributed.initialize(**given)
    return True


# --------------------------------------------------------------------------------------------- parameters


def logical_axes(module: nn.Module, *init_args, **init_kwargs) -> Any:
    """The logical axis names of a linen module's variables (``PartitionSpec`` leaves; unannotated leaves ``None``),
    from an abstract ``init`` that computes nothing. The models of ``jaxpeft.models`` have ``.logical_axes()``.

    Example:
        >>> import jax.numpy as jnp
        >>> dense = nn.Dense(4, kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")))
        >>> logical_axes(dense, jnp.ones((1, 2)))["params"]["kernel"]
        P('embed', 'mlp')
    """
    abstract = jax.eval_shape(lambda rng: module.init(rng, *init_args, **init_kwargs), jax.random.key(0))
    return nn.get_partition_spec(abstract)


def _spec_tuple(spec: Any, ndim: int) -> tuple:
    names = tuple(spec) if spec is not None else ()
    if len(names) > ndim:
        raise ShardingError(f"a logical spec {spec} has more axes than its array ({ndim})")
    return names + (None,) * (ndim - len(names))


def _layer_reference(base: dict, layer: tuple[str, ...], layout: tuple) -> tuple | None:
    """The logical axes of the layer's weight (its bias for a ``("bias",)`` layout, or for layers without one)."""
    names = ("bias",) if layout == ("bias",) else WEIGHT_NAMES + ("bias", "scale")
    for name in names:
        if layer + (name,) in base:
            return base[layer + (name,)]
    return None


def _param_slot_spec(path: tuple[str, ...], shape: tuple[int, ...], base: dict) -> tuple | None:
    """The logical axes of a leaf on a module's own parameter (``<module>/<slot>/<parameter>/<key>/<adapter>``):
    such leaves keep the parameter's axes in its order (size 1 where they do not vary), then their own (the rank).
    None when ``path`` is not in a slot."""
    index = next((i for i, key in enumerate(path[:-3]) if key in PARAM_SLOTS), None)
    if index is None:
        return None
    reference = base.get(path[:index] + (path[index + 1],))
    if reference is None:
        return (None,) * len(shape)
    kept = tuple(None if size == 1 else name for name, size in zip(reference, shape, strict=False))
    return kept + (None,) * (len(shape) - len(kept))


def _adapter_spec(path: tuple[str, ...], shape: tuple[int, ...], base: dict, flat_shapes: dict) -> tuple:
    """The logical axes of the adapter leaf at ``path``, from the weight it adapts."""
    slot_spec = _param_slot_spec(path, shape, base)
    if slot_spec is not None:
        return slot_spec
    index = next(i for i, key in enumerate(path[:-1]) if key in ADAPTER_KEYS)
    key = path[index]
    if key == SAVED_MODULES_KEY:  # an adapter's own copy of a module: the original's axes
        original = path[:index] + path[index + 2:]
        return base.get(original, (None,) * len(shape))
    layout = LEAF_LAYOUTS.get(key)
    layer, adapter = path[:index], path[index + 1]
    reference = _layer_reference(base, layer, layout) if layout is not None and layer else None
    if reference is None:
        return (None,) * len(shape)
    if layout in (("kernel",), ("bias",)):
        if len(reference) != len(shape):
            return (None,) * len(shape)
        return tuple(None if size == 1 else name for name, size in zip(reference, shape, strict=True))
    stack_key = next((k for k, v in LEAF_LAYOUTS.items() if v == ("stack",) and layer + (k, adapter) in flat_shapes),
                     None)
    stack_ndim = len(flat_shapes[layer + (stack_key, adapter)]) if stack_key else 0
    spans = len(shape) - layout.count(None) - (stack_ndim if "stack" in layout else 0)  # axes of "in" or "out"
    names: list = []
    for token in layout:
        if token == "stack":
            names += reference[:stack_ndim]
        elif token == "in":
            names += reference[stack_ndim:stack_ndim + spans]
        elif token == "out":
            names += reference[len(reference) - spans:]
        else:
            names.append(None)
    if len(names) != len(shape):
        return (None,) * len(shape)
    return tuple(names)


def param_specs(params: Any, base_axes: Any) -> Any:
    """``PartitionSpec``s of logical axis names for every leaf of ``params`` (a PeftModel's variables).

    ``base_axes`` holds the base model's specs (``model.logical_axes()``, or ``logical_axes(module, ...)``); the
    adapter leaves get theirs from the weight they adapt, by their method's layout (``jaxpeft.tree.LEAF_LAYOUTS``).
    Leaves with no logical names get ``PartitionSpec()`` (replicated).

    Example:
        >>> import jax.numpy as jnp
        >>> P = PartitionSpec
        >>> params = {"params": {"dense": {"kernel": jnp.ones((3, 8, 4)), "lora_A": {"a": jnp.ones((3, 8, 2))},
        ...     "lora_B": {"a": jnp.ones((3, 2, 4))}, "lora_scaling": {"a": jnp.ones(3)}}}}
        >>> specs = param_specs(params, {"params": {"dense": {"kernel": P("layers", "embed", "mlp")}}})
        >>> specs["params"]["dense"]["lora_A"]["a"], specs["params"]["dense"]["lora_B"]["a"]
        (P('layers', 'embed', None), P('layers', None, 'mlp'))
    """
    flat = flatten(params)
    shapes = {path: shape_of(leaf) for path, leaf in flat.items()}
    base = {path: _spec_tuple(spec, len(shapes[path])) for path, spec in flatten(base_axes or {}).items()
            if path in shapes and isinstance(spec, (PartitionSpec, type(None)))}
    specs = {}
    for path, shape in shapes.items():
        if path in base:
            names = base[path]
        elif any(key in ADAPTER_KEYS for key in path[:-1]):
            names = _adapter_spec(path, shape, base, shapes)
        else:
            names = (None,) * len(shape)
        specs[path] = PartitionSpec(*names)
    return unflatten_like(specs, params)


def _mesh_spec(path: tuple[str, ...], shape: tuple[int, ...], logical: PartitionSpec, mesh: Mesh,
               rules: Sequence[tuple[str, Any]], replicated: list) -> PartitionSpec:
    axes = nn.logical_to_mesh_axes(tuple(logical), rules)
    kept = []
    for size, axis in zip(shape, tuple(axes) + (None,) * (len(shape) - len(axes)), strict=True):
        devices = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))])) if axis else 1
        if axis is not None and size % devices:
            replicated.append(f"{'/'.join(path)} ({size} over {axis})")
            axis = None
        kept.append(axis)
    return PartitionSpec(*kept)


def param_shardings(params: Any, mesh: Mesh, base_axes: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``NamedSharding``s on ``mesh`` for every leaf of ``params``: ``param_specs`` mapped by ``rules``.

    An axis whose size the mesh axes do not divide (GPT-2's vocabulary of 50257 over 2 devices) stays whole on
    that leaf, with a warning naming it.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh(data=-1)
        >>> shardings = param_shardings({"w": jnp.ones((4, 2))}, mesh, {"w": PartitionSpec("embed", "mlp")})
        >>> shardings["w"].spec
        P('fsdp', 'tensor')
    """
    specs = flatten(param_specs(params, base_axes))
    leaves = flatten(params)
    replicated: list[str] = []
    shardings = {path: NamedSharding(mesh, _mesh_spec(path, shape_of(leaves[path]), spec, mesh, rules, replicated))
                 for path, spec in specs.items()}
    shardings = {path: quantization.child_shardings(leaves[path], sharding) if quantization.is_quantized(leaves[path])
                 else sharding for path, sharding in shardings.items()}
    if replicated:
        logger.warning("not sharded, the mesh axes do not divide them: %s", ", ".join(replicated))
    return unflatten_like(shardings, params)


def shard_params(params: Any, mesh: Mesh, base_axes: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``params`` placed on ``mesh`` by ``param_shardings`` (every process passes the same full values).

    Example:
        >>> import jax.numpy as jnp
        >>> placed = shard_params({"w": jnp.ones((4, 2))}, make_mesh(), {"w": PartitionSpec("embed", None)})
        >>> placed["w"].sharding.spec
        P('fsdp', None)
    """
    shardings = param_shardings(params, mesh, base_axes, rules)
    return jax.tree_util.tree_map(_put, params, shardings)


def _put(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(leaf, sharding)
    value = np.asarray(jax.device_get(leaf)) if not isinstance(leaf, np.ndarray) else leaf
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ----------------------------------------------------------------------------------------- training state


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: Any, trainable_shardings: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> Any:
    """Shardings for a ``training.TrainState``: the trainable leaves as given, the optimizer's per-parameter state
    (Adam's moments, ...) like its parameters, the step, key and counters replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxpeft import training
        >>> mesh = make_mesh()
        >>> state = training.init_train_state({"w": jnp.ones(4)}, {"w": True}, optax.adam(0.1))
        >>> shardings = state_shardings(state, {"w": NamedSharding(mesh, PartitionSpec("fsdp"))}, optax.adam(0.1), mesh)
        >>> shardings.opt_state[0].mu["w"].spec, shardings.step.spec
        (P('fsdp',), P())
    """
    whole = replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, state.opt_state,
                                          trainable_shardings, transform_non_params=lambda _: whole)
    return state.replace(step=whole, trainable=trainable_shardings, opt_state=opt_shardings, rng=whole)


def shard_state(state: Any, shardings: Any) -> Any:
    """``state`` placed on ``shardings`` (from ``state_shardings``).

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh()
        >>> placed = shard_state({"w": jnp.ones(4)}, {"w": NamedSharding(mesh, PartitionSpec("fsdp"))})
        >>> placed["w"].sharding.spec
        P('fsdp',)
    """
    return jax.tree_util.tree_map(_put, state, shardings)


# ------------------------------------------------------------------------------------------------ batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: its leading axis split over the mesh's ``data`` and ``fsdp`` axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp).

    Example:
        >>> data_parallel_size(make_mesh(data=-1)) == jax.device_count()
        True
    """
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process provides (``jax.process_index``'s equal share).

    Example:
        >>> process_rows(8)  # one process: every row
        slice(0, 8, None)
    """
    count = jax.process_count()
    if global_batch_size % count:
        raise ShardingError(f"a batch of {global_batch_size} rows cannot be split over {count} processes; use a "
                            f"multiple of {count}")
    share = global_batch_size // count
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """A global batch on ``mesh`` from this process's rows (``jax.make_array_from_process_local_data``): with P
    processes each passes ``global_batch / P`` rows, in process order (``process_rows``).

    Example:
        >>> batch = shard_batch({"input_ids": np.zeros((8, 16), np.int32)}, make_mesh())
        >>> batch["input_ids"].shape, batch["input_ids"].sharding.spec
        ((8, 16), P(('data', 'fsdp'),))
    """
    sharding = batch_sharding(mesh)
    split = data_parallel_size(mesh)

    def place(leaf):
        local = np.asarray(leaf)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        if global_shape[0] % split:
            raise ShardingError(f"a global batch of {global_shape[0]} rows cannot be split {split} ways (data x "
                                f"fsdp); use a batch size that is a multiple of {split}")
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map(place, local_batch)
