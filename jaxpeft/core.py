"""The functional PEFT core: create adapter leaves, rewrite an apply function, mask, merge.

A method (LoRA, IA3, ...) stores its leaves inside the parameters of the layer it adapts, keyed by method and
adapter name (``params/<layer path>/lora_A/<adapter>``). Kept in the ``params`` collection, they are stacked,
sliced and sharded by ``nn.scan``/``nn.vmap``/``nn.remat`` exactly like the layer's own kernel, so any linen model
works unchanged. ``rewrite`` wraps the apply function in a method interceptor opened *inside* the wrapped
function, so every trace of the rewritten apply sees the adapters and the original apply never does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import unicodedata
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxpeft import _targets, _tracing, quantization
from jaxpeft._tracing import OWN_PARAMS, PARAM_SLOTS, TARGET_PARAMS, Layer, Trace, trace_layers
from jaxpeft.config import PeftConfig
from jaxpeft.method import method_for
from jaxpeft.tree import ADAPTER_KEYS, SAVED_MODULES_KEY, adapter_names, flatten, strip_adapters, unflatten_like

logger = logging.getLogger(__name__)
Path = tuple[str, ...]
BASE = "__base__"  # in a mixed batch: the row runs the base model, no adapter


class AdapterError(ValueError):
    """Variables and adapter do not fit together (missing adapter, duplicate name, wrong shapes, ...)."""


# An adapter name becomes a folder name (HF PEFT saves a non-default adapter in ``<folder>/<name>``): at most
# 255 bytes on most file systems, less the room the staging folder of ``hf_format.save_adapter`` takes.
MAX_ADAPTER_NAME_BYTES = 200
RESERVED_ADAPTER_NAMES = {BASE: "runs the base model in a mixed batch"}
# Unicode categories that never belong in a name: control, format (invisible), surrogate, line and paragraph breaks.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
ADAPTER_NAME_RULE = (f"an adapter name is a non-empty str of at most {MAX_ADAPTER_NAME_BYTES} bytes without path "
                     "separators, control characters or spaces at either end, other than '.', '..' and "
                     f"{', '.join(map(repr, RESERVED_ADAPTER_NAMES))} (e.g. 'default', 'my-adapter_2')")


def _shown(name: str, limit: int = 60) -> str:
    """``name`` quoted on one line (control characters escaped), cut after ``limit`` characters."""
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


def _adapter_name_problem(name: str) -> str | None:
    """What makes the str ``name`` unfit as an adapter name, or None."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "names a folder itself or its parent"
    if name in RESERVED_ADAPTER_NAMES:
        return f"is reserved: it {RESERVED_ADAPTER_NAMES[name]}"
    separator = next((sep for sep in ("/", "\\", os.sep, os.altsep) if sep and sep in name), None)
    if separator is not None:
        return f"contains the path separator {separator!r}"
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return "is an absolute path"
    invisible = next((char for char in name if unicodedata.category(char) in _INVISIBLE_CATEGORIES), None)
    if invisible is not None:
        return f"contains the control or invisible character U+{ord(invisible):04X}"
    if name != name.strip():
        return "begins or ends with a space"
    size = len(name.encode("utf-8"))
    if size > MAX_ADAPTER_NAME_BYTES:
        return f"is {size} bytes long"
    return None


def check_adapter_name(name: Any) -> str:
    """``name`` if it is fit to name an adapter, else a one-line ``AdapterError`` saying why.

    Adapter names become folder names when adapters are saved (``<folder>/<name>`` for any adapter but
    ``"default"``, as in HF PEFT), so a name that is a path (``"../x"``, ``"/tmp/x"``, ``"."``) is refused
    wherever a name enters jaxpeft, as are control characters and the reserved ``"__base__"``.

    Example:
        >>> from jaxpeft.core import check_adapter_name
        >>> check_adapter_name("my-adapter_2"), check_adapter_name("é")
        ('my-adapter_2', 'é')
        >>> check_adapter_name("../x")
        Traceback (most recent call last):
        ...
        jaxpeft.core.AdapterError: adapter name '../x' contains the path separator '/'; an adapter name is a ...
    """
    if not isinstance(name, str):
        raise AdapterError(f"an adapter name must be a str, not {type(name).__name__}; {ADAPTER_NAME_RULE}")
    problem = _adapter_name_problem(name)
    if problem is not None:
        raise AdapterError(f"adapter name {_shown(name)} {problem}; {ADAPTER_NAME_RULE}")
    return name


def _check_apply_fn(apply_fn: Callable) -> None:
    if hasattr(apply_fn, "lower") and hasattr(apply_fn, "eval_shape"):
        raise TypeError("pass the un-jitted apply function (e.g. model.apply) and jit what jaxpeft returns: a "
                        "jitted function reuses traces made without the adapters")


def _params(variables: Any) -> Any:
    if "params" not in variables:
        raise AdapterError("variables have no 'params' collection; pass what model.init returned")
    return variables["params"]


def init_adapters(key: jax.Array, config: PeftConfig, apply_fn: Callable, variables: Any, *sample_args,
                  adapter_name: str = "default", adapter_dtype: Any = "float32", **sample_kwargs) -> Any:
    """Adds a new adapter's leaves to ``variables`` and returns the new tree (the input is not changed).

    The targeted layers and their shapes are found by tracing ``apply_fn(variables, *sample_args,
    **sample_kwargs)`` with ``jax.eval_shape`` (nothing is computed). Adapter leaves are ``adapter_dtype``
    (float32) whatever the base dtype.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])  # layers named layers_0, layers_2
        >>> x = jnp.ones((1, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> config = jaxpeft.LoraConfig(r=2, target_modules=["layers_0"])
        >>> variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, variables, x)
        >>> variables["params"]["layers_0"]["lora_A"]["default"].shape
        (4, 2)
    """
    check_adapter_name(adapter_name)
    method = method_for(config)
    _check_apply_fn(apply_fn)
    params = _params(variables)
    if adapter_name in adapter_names(variables):
        raise AdapterError(f"an adapter named {adapter_name!r} already exists; pass another adapter_name=")
    trace = trace_layers(apply_fn, variables, sample_args, sample_kwargs)
    create_key, finish_key = jax.random.split(key)
    new_leaves = method.create(create_key, config, trace, adapter_dtype)
    flat = flatten(params)
    if method.finish is not None:  # steps that need the base weights' values (DoRA's magnitude, PiSSA)
        new_leaves, flat = method.finish(finish_key, config, trace, new_leaves, flat)
    for (path, leaf_key), value in new_leaves.items():
        flat[path + (leaf_key, adapter_name)] = value
    for path in _saved_module_paths(config, trace):
        for leaf_path, leaf in list(flat.items()):
            rel = leaf_path[len(path):]
            if leaf_path[:len(path)] == path and not any(k in ADAPTER_KEYS for k in rel):
                flat[path + (SAVED_MODULES_KEY, adapter_name) + rel] = jax.numpy.array(leaf, copy=True)
    return _with_params(variables, unflatten_like(flat, params))


def _with_params(variables: Any, params: Any) -> Any:
    if isinstance(variables, dict):
        return {**variables, "params": params}
    return variables.copy({"params": params})


def _saved_module_paths(config: PeftConfig, trace: Trace) -> list[Path]:
    wanted = getattr(config, "modules_to_save", None)
    if not wanted:
        return []
    found = []
    for path, virtual in trace.module_virtual_paths.items():
        if path and any(_targets.matches_saved(name, wanted) for name in virtual.values()):
            if not any(path[:len(p)] == p for p in found):
                found.append(path)
    missing = [m for m in wanted if not any(_targets.matches_saved(n, [m]) for p in found
                                            for n in trace.module_virtual_paths[p].values())]
    if missing:
        raise AdapterError(f"modules_to_save {missing} matched no module; modules that exist: "
                           f"{trace.existing_paths()}")
    return found


def _swap_saved_modules(variables: Any, adapter_name: str) -> Any:
    """The variables with each module in modules_to_save replaced by the adapter's trained copy."""
    flat = flatten(_params(variables))
    marker = (SAVED_MODULES_KEY, adapter_name)
    copies = {}
    for path, leaf in flat.items():
        for i in range(len(path) - 1):
            if path[i:i + 2] == marker:
                copies[path[:i] + path[i + 2:]] = leaf
                break
    if not copies:
        return variables
    flat.update(copies)
    return _with_params(variables, unflatten_like(flat, variables["params"]))


def _dropout_requested(kwargs: dict) -> bool:
    rngs = kwargs.get("rngs") or {}
    deterministic = kwargs.get("deterministic", False) or kwargs.get("train", True) is False
    return "dropout" in rngs and not deterministic


@flax.struct.dataclass
class AdapterMix:
    """Which adapter each example of a batch runs (HF PEFT's mixed-adapter batches), as one jittable value.

    Row ``i`` runs adapter ``names[index[i]]``; the name ``"__base__"`` runs the plain base model. Pass it as
    ``adapter_name=`` to a rewritten apply: the whole batch is computed in one call. A layer that holds only LoRA
    adapters runs once, each row adding its own adapter's update (eight adapters cost about what one does); other
    layers compute the output of each adapter present and every row takes its own. ``names`` is static (a new set
    of names traces again, their order does not), ``index`` is an ordinary array.

    Example:
        >>> import jaxpeft
        >>> mix = jaxpeft.AdapterMix.of(["a", "__base__", "a"])
        >>> mix.names, mix.index.tolist()
        (('__base__', 'a'), [1, 0, 1])
    """

    index: jax.Array
    names: tuple[str, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def of(cls, adapter_names: Any) -> AdapterMix:
        """The mix for one adapter name per example."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list with one adapter name (or '__base__') per example")
        names = tuple(sorted(set(adapter_names)))  # any order of the same names reuses one trace
        for name in names:
            if name != BASE:
                check_adapter_name(name)
        return cls(jnp.asarray([names.index(n) for n in adapter_names], jnp.int32), names)


def _own_adapter_names(module: nn.Module) -> set[str]:
    """Names of the adapters that keep leaves in this module's own parameters (not its submodules')."""
    params = module.variables.get("params", {})
    found: set[str] = set()
    for key in ADAPTER_KEYS.intersection(params):
        found.update(params[key])
    for slot in PARAM_SLOTS:  # adapters on the module's own parameters
        for leaves in params.get(slot, {}).values():
            for key in ADAPTER_KEYS.intersection(leaves):
                found.update(leaves[key])
    return found


def own_param_leaves(module: nn.Module, adapter_name: str, leaf_keys: tuple[str, ...],
                     slot: str = OWN_PARAMS) -> dict[str, dict[str, Any]]:
    """``{parameter: {leaf key: leaf}}`` of the named adapter on the module's own parameters (kept in ``slot``)."""
    found = {}
    for name, leaves in module.variables.get("params", {}).get(slot, {}).items():
        if adapter_name in leaves.get(leaf_keys[0], {}):
            found[name] = {key: nn.meta.unbox(leaves[key][adapter_name]) for key in leaf_keys if key in leaves}
    return found


class OwnParamCalls:
    """Runs module calls that hold an adapter on their own parameters through their jaxpr, once per module: the
    module's inner calls (one method calling another) run plainly inside that trace, so nothing is adapted
    twice."""

    def __init__(self):
        self._active: set[tuple] = set()

    def __call__(self, module: nn.Module, next_fun: Callable, args, kwargs, through: Callable[[], Any]) -> Any:
        key = (tuple(module.path), id(module.scope))
        if key in self._active:
            return next_fun(*args, **kwargs)
        self._active.add(key)
        try:
            with quantization.pinning():
                return through()
        finally:
            self._active.discard(key)


def _run_saved_copy(name: str, args, kwargs, context):
    """A module in ``modules_to_save`` run with the named adapter's copy of its parameters."""
    module = context.module
    copy = module.variables["params"][SAVED_MODULES_KEY][name]
    rngs = {"dropout": module.make_rng("dropout")} if module.scope.has_rng("dropout") else None
    return module.clone(parent=None).apply({"params": copy}, *args, rngs=rngs,
                                           method=context.method_name, **kwargs)


def _mixed_apply(apply_fn: Callable, configs: dict[str, PeftConfig], variables: Any, mix: AdapterMix,
                 args: tuple, kwargs: dict) -> Any:
    present = adapter_names(variables)
    for name in mix.names:
        if name == BASE:
            continue
        if name not in configs or name not in present:
            raise AdapterError(f"adapter_names mentions {name!r}, which is not an adapter here (adapters: "
                               f"{sorted(set(configs) & set(present))}; use '__base__' for the base model)")
        if method_for(configs[name]).call is not None:
            raise AdapterError(f"adapter {name!r} is {configs[name].peft_type}, which changes the whole call and "
                               "cannot share a batch with other adapters; run it on its own")
    dropout = _dropout_requested(kwargs)
    single = {name: method_for(configs[name]).interceptor(configs[name], name, dropout)
              for name in mix.names if name != BASE}
    names_by_method: dict[Any, list[str]] = {}
    for name in single:
        names_by_method.setdefault(method_for(configs[name]), []).append(name)
    # (names, adapt): one pass through a layer for several adapters of one method
    one_pass = [(set(names), method.mixed_interceptor({n: configs[n] for n in names}, mix.index, mix.names, dropout))
                for method, names in names_by_method.items() if method.mixed_interceptor is not None]
    batch_size = mix.index.shape[0]
    running: list[str] = []  # inside an adapted module: the adapter that module and its submodules run

    def run_as(name, next_fun, args, kwargs, context):
        if name == BASE:
            return next_fun(*args, **kwargs)
        if name in context.module.variables["params"].get(SAVED_MODULES_KEY, {}):
            return _run_saved_copy(name, args, kwargs, context)
        return single[name](next_fun, args, kwargs, context)

    def call_again_as(name, args, kwargs, context):
        # A fresh call of the module (flax runs a compact method once per call), intercepted as ``name``.
        running.append(name)
        try:
            return getattr(context.module, context.method_name)(*args, **kwargs)
        finally:
            running.pop()

    fresh_as: dict[tuple, str] = {}  # a module (path, scope) called afresh -> the adapter its own parameters take

    def own_params_as(name, args, kwargs, context):
        # A fresh call in which only the module's own parameters take adapter ``name``: its submodules stay mixed.
        key = (tuple(context.module.path), id(context.module.scope))
        fresh_as[key] = name
        try:
            return getattr(context.module, context.method_name)(*args, **kwargs)
        finally:
            fresh_as.pop(key, None)

    def select(row_mask, adapted, out):
        if jnp.ndim(out) == 0 or jnp.shape(out)[0] != batch_size:
            raise AdapterError(f"a mixed batch needs the batch on axis 0 of every adapted module's output; got an "
                               f"output shaped {jnp.shape(out)} for a batch of {batch_size}")
        return jnp.where(row_mask.reshape((batch_size,) + (1,) * (jnp.ndim(out) - 1)), adapted, out)

    def mixed(next_fun, args, kwargs, context):
        if running:  # inside a module that runs as one adapter: it and its submodules run as that adapter
            return run_as(running[-1], next_fun, args, kwargs, context)
        fresh = fresh_as.pop((tuple(context.module.path), id(context.module.scope)), None)
        if fresh is not None:
            return next_fun(*args, **kwargs) if fresh == BASE else single[fresh](next_fun, args, kwargs, context)
        # Adapters change public methods (``__call__``; ``attend`` of an Embed with trainable rows); saved copies
        # (modules_to_save) replace every one. Other methods (setup, private helpers) run once, as they are.
        params = context.module.variables.get("params", {})
        saved_copies = params.get(SAVED_MODULES_KEY, {})
        own_params = any(slot in params for slot in PARAM_SLOTS)
        method = context.method_name
        if method != "__call__" and (method.startswith("_") or method == "setup"):
            return next_fun(*args, **kwargs)
        here = [name for name in mix.names if name in _own_adapter_names(context.module)]
        if not here:
            return next_fun(*args, **kwargs)
        for names, adapt in one_pass:
            if set(here) <= names and not saved_copies:
                out = adapt(next_fun, args, kwargs, context, here)
                if out is not None:
                    return out
        run = own_params_as if own_params and not saved_copies else call_again_as
        out = run(BASE, args, kwargs, context)
        for name in here:
            adapted = run(name, args, kwargs, context)
            row_mask = mix.index == mix.names.index(name)
            out = jax.tree_util.tree_map(functools.partial(select, row_mask), adapted, out)
        return out

    with nn.intercept_methods(mixed):
        return apply_fn(variables, *args, **kwargs)


def rewrite(apply_fn: Callable, config: PeftConfig | dict[str, PeftConfig]) -> Callable:
    """Returns ``apply_fn`` rewritten to use adapters: same signature plus a keyword ``adapter_name``.

    ``config`` is one config (its adapter is named ``"default"``) or a dict ``{adapter name: config}``; the
    first name is the active one unless the call passes ``adapter_name=`` (``None`` runs the plain base model, an
    ``AdapterMix`` runs a different adapter per example).
    The result is a pure function: jit it (with ``static_argnames="adapter_name"`` to switch adapters in a
    jitted call), differentiate it, vmap it. Adapter dropout runs when the call passes a
    ``'dropout'`` rng and not ``deterministic=True``/``train=False`` (and the config's dropout rate is not 0).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> model = nn.Dense(3)
        >>> x = jnp.ones((1, 4))
        >>> config = jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
        >>> variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
        ...                                   model.init(jax.random.key(1), x), x)
        >>> adapted = jax.jit(jaxpeft.rewrite(model.apply, config))
        >>> bool(jnp.allclose(adapted(variables, x), model.apply(variables, x)))
        False
        >>> bool(jnp.array_equal(adapted(variables, x, adapter_name=None), model.apply(variables, x)))
        True
    """
    _check_apply_fn(apply_fn)
    configs = {"default": config} if isinstance(config, PeftConfig) else dict(config)
    if not configs:
        raise ValueError("rewrite needs at least one config")
    for name, each in configs.items():
        check_adapter_name(name)
        method_for(each)
    first_name = next(iter(configs))

    @functools.wraps(apply_fn)
    def adapted_apply(variables, *args, adapter_name: str | AdapterMix | None = first_name, **kwargs):
        if adapter_name is None:
            return apply_fn(variables, *args, **kwargs)
        if isinstance(adapter_name, AdapterMix):
            return _mixed_apply(apply_fn, configs, variables, adapter_name, args, kwargs)
        if adapter_name not in configs:
            raise AdapterError(f"no config for adapter {adapter_name!r}; this apply knows {sorted(configs)}")
        present = adapter_names(variables)
        if adapter_name not in present:
            raise AdapterError(f"the variables lack adapter {adapter_name!r} (they hold {present or 'none'}); "
                               "create it with jaxpeft.init_adapters first")
        active = configs[adapter_name]
        method = method_for(active)
        dropout = _dropout_requested(kwargs)
        variables = _swap_saved_modules(variables, adapter_name)
        if method.call is not None:
            return method.call(active, adapter_name, apply_fn, variables, args, kwargs, dropout)
        with nn.intercept_methods(method.interceptor(active, adapter_name, dropout)):
            return apply_fn(variables, *args, **kwargs)

    return adapted_apply


def trainable_mask(variables: Any, config: PeftConfig, adapter_name: str = "default") -> Any:
    """A bool tree like ``variables``: True for the leaves that train for this adapter.

    These are the method's adapter leaves, the adapter's copies of ``modules_to_save``, and the biases that the
    ``bias`` option ("all", or "lora_only"/"vera_only": the biases of adapted layers) sets training.
    """
    method = method_for(config)
    keys = set(method.trainable(config))
    bias = getattr(config, "bias", "none")
    flat = flatten(variables)
    adapted = {path[:i] for path in flat for i in range(len(path) - 1)
               if path[i] in method.leaf_keys and path[i + 1] == adapter_name}

    def trains(path: Path) -> bool:
        if path[0] != "params":
            return False
        for i in range(len(path) - 1):
            if path[i] in ADAPTER_KEYS:
                return path[i + 1] == adapter_name and (path[i] in keys or path[i] == SAVED_MODULES_KEY)
        if path[-1] == "bias":
            return bias == "all" or (bias.endswith("_only") and path[:-1] in adapted)
        return False

    if adapter_name not in adapter_names(variables):
        raise AdapterError(f"the variables lack adapter {adapter_name!r} (they hold "
                           f"{adapter_names(variables) or 'none'})")
    return unflatten_like({path: trains(path) for path in flat}, variables)


def freeze(optimizer: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``optimizer`` for the leaves ``mask`` marks True; every other leaf gets a zero update, always.

    ``optax.masked`` alone passes the raw gradient through for masked-out leaves; this does not. No optimizer
    state is kept for frozen leaves.

    Example:
        >>> import jax.numpy as jnp, optax, jaxpeft
        >>> params = {"w": jnp.ones(2), "lora": jnp.ones(2)}
        >>> tx = jaxpeft.freeze(optax.sgd(1.0), {"w": False, "lora": True})
        >>> updates, _ = tx.update({"w": jnp.ones(2), "lora": jnp.ones(2)}, tx.init(params), params)
        >>> updates["w"].tolist(), updates["lora"].tolist()
        ([0.0, 0.0], [-1.0, -1.0])
    """
    labels = jax.tree_util.tree_map(lambda trains: "trainable" if trains else "frozen", mask)
    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def layer_groups(variables: Any, adapter_name: str, leaf_keys: tuple[str, ...]) -> dict[Path, dict[str, Any]]:
    """``{layer path: {leaf key: leaf}}`` for the layers holding the named adapter."""
    groups: dict[Path, dict[str, Any]] = {}
    for path, leaf in flatten(_params(variables)).items():
        if len(path) >= 2 and path[-1] == adapter_name and path[-2] in leaf_keys and leaf is not None:
            groups.setdefault(path[:-2], {})[path[-2]] = leaf
    return groups


def _weight_path(group: Path, name: str) -> Path:
    """Where a group of adapter leaves at ``group`` finds base parameter ``name``: beside the leaves in a layer, or,
    for the leaves of one parameter (``<module>/<slot>/<parameter>``), in the module."""
    return group[:-2] + (name,) if len(group) >= 2 and group[-2] in PARAM_SLOTS else group + (name,)


def _weights_of(flat: dict[Path, Any], group: Path) -> dict[str, Any]:
    """The base parameters a group of adapter leaves changes: its layer's, or the one parameter it follows."""
    if len(group) >= 2 and group[-2] in PARAM_SLOTS:
        location = _weight_path(group, group[-1])
        return {group[-1]: flat[location]} if location in flat else {}
    return {p[-1]: leaf for p, leaf in flat.items() if p[:-1] == group}


def _merged_weights(method: Any, config: PeftConfig, layer_params: dict, leaves: dict, sign: float,
                    requantize: bool, path: Path) -> dict[str, Any]:
    """A layer's merged weights; a quantized weight is merged in float and, with ``requantize``, quantized again
    like the original (the largest change that makes is logged)."""
    quantized = {name: leaf for name, leaf in layer_params.items() if quantization.is_quantized(leaf)}
    integers = [name for name, leaf in layer_params.items() if name not in quantized
                and not jnp.issubdtype(jnp.result_type(nn.meta.unbox(leaf)), jnp.inexact)]
    if integers:
        raise AdapterError(f"{'.'.join(path + (integers[0],))} holds integers: merging would round the adapter away; "
                           "hold the base as a jaxpeft.QuantizedArray (jaxpeft.quantize) or in float, then merge")
    floats = {name: quantization.dequantize(leaf) if name in quantized else leaf for name, leaf in layer_params.items()}
    merged = method.merge_layer(config, floats, leaves, sign)
    if not requantize:
        return merged
    for name in set(merged) & set(quantized):
        merged_float = merged[name]
        merged[name] = quantization.requantize_like(merged_float, quantized[name])
        logger.warning("re-quantizing the merged %s changed it by up to %.3g (the float merge is exact; "
                       "requantize=False keeps it)", ".".join(path + (name,)),
                       quantization.merge_error(merged_float, merged[name]))
    return merged


def _apply_to_layers(variables: Any, config: PeftConfig, adapters: Any, adapter_name: str, sign: float,
                     requantize: bool = False) -> Any:
    method = method_for(config)
    if method.merge_layer is None:
        raise AdapterError(f"{config.peft_type} adapters cannot be merged into the base weights; keep running the "
                           "adapted model (PeftModel or jaxpeft.rewrite), or unload() for the base model")
    groups = layer_groups(adapters, adapter_name, method.all_leaf_keys)
    if not groups:
        raise AdapterError(f"no adapter {adapter_name!r} to merge (adapters present: "
                           f"{adapter_names(adapters) or 'none'})")
    flat = flatten(_params(variables))
    original_flat = flatten(_params(adapters)) if sign < 0 and method.unmerge_layer is not None else None
    for path, leaves in groups.items():
        missing = [key for key in method.leaf_keys if key not in leaves]
        if missing and any(key in leaves for key in method.leaf_keys):  # a group of optional leaves stands alone
            raise AdapterError(f"adapter {adapter_name!r} at {'.'.join(path)} lacks {', '.join(missing)}; pass the "
                               "whole variables tree that holds the adapter")
        layer_params = _weights_of(flat, path)
        if not layer_params:
            raise AdapterError(f"layer {'.'.join(path)} of the adapter is not in the variables")
        if original_flat is not None:
            new_params = method.unmerge_layer(config, layer_params, leaves, _weights_of(original_flat, path))
        else:
            new_params = _merged_weights(method, config, layer_params, leaves, sign, requantize, path)
        for name, leaf in new_params.items():
            flat[_weight_path(path, name)] = leaf
    return _with_params(variables, unflatten_like(flat, variables["params"]))


def merge(variables: Any, config: PeftConfig, adapter_name: str = "default", requantize: bool = False) -> Any:
    """The plain base variables with the named adapter folded into the weights (computed in float32).

    Every adapter leaf is dropped from the result, and modules in ``modules_to_save`` take the adapter's
    trained copies: the result runs with the original, un-rewritten apply. On a quantized base the result is a
    float model (every weight dequantized to its compute dtype); with ``requantize`` the merged weights are
    quantized again as they were, the others stay quantized, and the error that re-quantizing adds is logged.
    """
    merged = _apply_to_layers(variables, config, variables, adapter_name, 1.0, requantize)
    merged = strip_adapters(_swap_saved_modules(merged, adapter_name))
    return merged if requantize else quantization.dequantize_tree(merged)


def unmerge(merged_variables: Any, adapters: Any, config: PeftConfig, adapter_name: str = "default") -> Any:
    """Undoes ``merge``: takes the adapter out of the merged weights and puts its leaves back.

    ``adapters`` is a tree holding all the adapter's leaves, constants included: usually the variables that were
    merged. Modules in ``modules_to_save`` get their original weights back from it.
    """
    if adapter_name in adapter_names(merged_variables):
        raise AdapterError(f"adapter {adapter_name!r} is not merged into these variables (they still hold its "
                           "leaves); unmerge takes what merge() returned")
    flat = flatten(_apply_to_layers(merged_variables, config, adapters, adapter_name, -1.0))
    adapter_flat = {path: leaf for path, leaf in flatten(adapters).items() if leaf is not None}
    flat.update({path: leaf for path, leaf in adapter_flat.items() if any(key in ADAPTER_KEYS for key in path)})
    saved_modules = {path[:i] for path in adapter_flat for i in range(len(path))
                     if path[i:i + 2] == (SAVED_MODULES_KEY, adapter_name)}
    for module_path in saved_modules:
        originals = {path: leaf for path, leaf in adapter_flat.items()
                     if path[:len(module_path)] == module_path
                     and not any(key in ADAPTER_KEYS for key in path[len(module_path):])}
        if not originals:
            raise AdapterError(f"the original weights of {'.'.join(module_path[1:])} (in modules_to_save) are "
                               "not in `adapters`; pass the variables that were merged")
        flat.update(originals)
    return unflatten_like(flat, merged_variables)


def virtual_token_advice(max_tokens: int, num_virtual: int) -> str:
    """What to lower when ``num_virtual`` virtual tokens (prompt or prefix tuning) and the input overflow a model
    that takes ``max_tokens`` positions."""
    if max_tokens <= num_virtual:
        return "lower num_virtual_tokens"
    return (f"give at most {max_tokens - num_virtual} tokens (lower max_length, or the prompt and max_new_tokens when "
            "generating) or lower num_virtual_tokens")


def _index_span(indices: list[int]) -> str:
    """``[0, 1, 2]`` as ``"0..2"``; indices with gaps as a list."""
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(indices)


def check_layers_exist(config: Any, trace: Trace) -> None:
    """A one-line error when the config's ``layers_to_transform`` (or bottleneck ``leave_out``) names a layer index
    that no module path of the traced model has (with ``layers_pattern``: none after that name)."""
    pattern = getattr(config, "layers_pattern", None)
    names = [name for paths in trace.module_virtual_paths.values() for name in paths.values() if name]
    existing = _targets.layer_indices_of(names, pattern)
    for option in ("layers_to_transform", "leave_out"):
        wanted = getattr(config, option, None)
        if wanted is None:
            continue
        missing = sorted(set([wanted] if isinstance(wanted, int) else wanted) - set(existing))
        if not missing:
            continue
        after = f" after layers_pattern={pattern!r}" if pattern else ""
        layers = f"its layers are {_index_span(existing)}{after}" if existing else f"it has no numbered layers{after}"
        raise AdapterError(f"{option}={wanted!r} names {'a layer' if len(missing) == 1 else 'layers'} {missing} the "
                           f"model does not have; {layers}")


def resolve_layers(config: Any, trace: Trace, kinds: tuple[str, ...], *, method_name: str) -> dict[Path, Layer]:
    """The layers a config's ``target_modules`` (and ``exclude_modules``, ``layers_to_transform``,
    ``modules_to_save``) select, each with the stack indices it applies to (``Layer.virtual_paths`` restricted).

    Raises a one-line error when nothing matches (listing the modules that exist) or when a matched module is
    of a type the method cannot adapt.
    """
    targets = config.target_modules
    check_layers_exist(config, trace)
    if targets is None:
        raise AdapterError(f"{method_name} needs target_modules for this model (e.g. target_modules=['query', "
                           f"'value'] or 'all-linear'); modules that exist: {trace.existing_paths()}")
    all_linear = targets == "all-linear"

    def targeted(name: str, layer: Layer | None) -> bool:
        if _targets.matches(name, getattr(config, "exclude_modules", None)):
            return False
        if _targets.is_saved_module(name, getattr(config, "modules_to_save", None)):
            return False
        if all_linear:
            return layer is None or layer.kind in ("dense", "dense_general", "einsum") and not layer.is_output
        if not _targets.matches(name, targets):
            return False
        if isinstance(targets, str):
            return True
        return _targets.in_layers(name, getattr(config, "layers_to_transform", None),
                                  getattr(config, "layers_pattern", None))

    selected: dict[Path, Layer] = {}
    unsupported: list[str] = []
    for path, virtual in trace.module_virtual_paths.items():
        layer = trace.layers.get(path)
        hits = {index: name for index, name in virtual.items() if (path or layer) and targeted(name, layer)}
        if not hits:
            continue
        if layer is None and "param" in kinds:
            found = own_parameter_layers(trace, path, hits, method_name, strict=not all_linear)
            if found:
                selected.update(found)
                continue
        if layer is None and all_linear:
            continue
        if layer is None or layer.kind not in kinds:
            kind = trace.module_types[path] if layer is None else type(layer.module).__name__
            unsupported.append(f"{hits[next(iter(hits))]!r} (a {kind})")
            continue
        selected[path] = dataclasses.replace(layer, virtual_paths=hits)
    # A regex may also match the modules that contain layers; a listed name must be a layer.
    if unsupported and (not selected or not isinstance(targets, str)):
        stock = ", ".join(kind for kind in kinds if kind != "param")
        own = " and modules that multiply their own parameters with an input" if "param" in kinds else ""
        raise AdapterError(f"target_modules matched {', '.join(unsupported[:3])}, which {method_name} cannot adapt; "
                           f"it adapts {stock} layers{own}: narrow target_modules")
    if not selected:
        raise AdapterError(f"target_modules={targets!r} matched no layer; modules that exist: "
                           f"{trace.existing_paths()}")
    return selected


def _parameter_candidates(trace: Trace) -> dict[Path, Layer]:
    """Every parameter of two or more axes a ``target_parameters`` entry may name, as a ``"param"`` layer keyed
    ``(*module path, parameter)``: stock layers' kernels, and the parameters other modules use (their roles from
    the contractions they meet, else a kernel's layout)."""
    candidates = {}
    for path, layer in trace.layers.items():
        roles = _tracing.stock_kernel_roles(layer)
        if roles is not None:
            name = "embedding" if layer.kind == "embed" else "kernel"
            candidates[path + (name,)] = dataclasses.replace(layer, path=path + (name,), kind="param", roles=roles)
    for key, use in trace.param_uses.items():
        layer = trace.params.get(key)
        if layer is None or not layer.roles:
            virtual = trace.module_virtual_paths.get(key[:-1], {(): ".".join(key[:-1])})
            full = trace.param_shapes.get(key, use.shape)
            layer = Layer(key, "param", None, use.shape, use.dtype, 0, tuple(full[: len(full) - len(use.shape)]),
                          virtual, False, _tracing.fallback_roles(len(use.shape)))
        candidates[key] = layer
    return candidates


def parameter_layer(trace: Trace, key: Path) -> Layer | None:
    """The ``"param"`` layer of parameter ``(*module path, name)``: the roles of its axes, as ``target_parameters``
    and adapter files see them."""
    return _parameter_candidates(trace).get(key)


def resolve_parameters(config: Any, trace: Trace) -> dict[Path, Layer]:
    """The parameters ``config.target_parameters`` names (``<module path>.<parameter>``, matched as
    ``target_modules`` is: a dotted suffix, or a full-match regex), as ``"param"`` layers keyed
    ``<module path>/target_parameters/<parameter>``; ``exclude_modules`` and ``layers_to_transform`` apply to the
    module's path."""
    targets = config.target_parameters
    selected = {}
    candidates = _parameter_candidates(trace)
    for key, layer in candidates.items():
        hits = {}
        for index, module_name in layer.virtual_paths.items():
            name = f"{module_name}.{key[-1]}" if module_name else key[-1]
            if (_targets.matches(name, targets) and not _targets.matches(module_name, config.exclude_modules)
                    and (isinstance(targets, str) or _targets.in_layers(module_name, config.layers_to_transform,
                                                                        config.layers_pattern))):
                hits[index] = name
        if hits:
            path = key[:-1] + (TARGET_PARAMS, key[-1])
            selected[path] = dataclasses.replace(layer, path=path, virtual_paths=hits)
    if not selected:
        names = [f"{m}.{key[-1]}" if m else key[-1] for key, layer in candidates.items()
                 for m in list(layer.virtual_paths.values())[:1]]
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise AdapterError(f"target_parameters={targets!r} matched no parameter of two or more axes; parameters "
                           f"that exist: {shown or 'none'}")
    return selected


def own_parameter_layers(trace: Trace, path: Path, hits: dict, method_name: str, *,
                         strict: bool = True) -> dict[Path, Layer]:
    """The ``"param"`` layers of a module that ``target_modules`` matched (``hits``: its matched stack indices):
    each of its own parameters that it multiplies with an input, keyed ``<module path>/own_params/<parameter>``.
    A module that uses such a parameter in a way a method cannot follow is a one-line error (``strict``) or is
    left out."""
    name = hits[next(iter(hits))]
    uses = {key[-1]: use for key, use in trace.param_uses.items() if key[:-1] == path}
    layers = trace.param_layers(path)
    if not strict:
        layers = [layer for layer in layers if layer.roles and not uses[layer.param_name].other and not layer.is_output
                  and set(layer.contractions) == {"dot_general"}]
    elif uses and not layers:
        described = ", ".join(f"{param} (in {', '.join(sorted(use.other))})" for param, use in uses.items())
        raise AdapterError(f"target_modules matched {name!r}, which multiplies none of its own parameters with an "
                           f"input (it uses {described}); adapt a parameter with "
                           f"target_parameters=['{name}.<parameter>'] instead")
    for layer in layers:
        use = uses[layer.param_name]
        if not layer.roles or use.other:
            why = (f"also uses it in {', '.join(sorted(use.other))}" if use.other else
                   "multiplies it in contractions that disagree on its input and output axes")
            raise AdapterError(f"{method_name} cannot follow parameter {layer.param_name!r} of {name!r}: the module "
                               f"{why}; adapt it as a whole with target_parameters=['{name}.{layer.param_name}'] "
                               "or exclude the module")
        others = sorted(set(layer.contractions) - {"dot_general"})
        if others:  # adapters follow dot products (einsum, dot, matmul, @); a convolution needs the whole parameter
            raise AdapterError(f"{method_name} cannot follow parameter {layer.param_name!r} of {name!r}, which meets "
                               f"the input in {', '.join(others)}; adapt it as a whole with "
                               f"target_parameters=['{name}.{layer.param_name}'] instead")
    return {path + (OWN_PARAMS, layer.param_name): dataclasses.replace(layer, path=path + (OWN_PARAMS,
                                                                                          layer.param_name),
                                                                        virtual_paths=hits)
            for layer in layers}
