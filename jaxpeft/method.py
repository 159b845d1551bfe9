"""What a PEFT method is to jaxpeft: one ``Method`` value, built in the method's own file and registered once.

A method file (``jaxpeft/methods/lora.py``, or one of your own anywhere) defines its config class and the pure
functions below, puts them in a ``Method`` and passes it to ``register``. Every hook the core may call is a field
here with its default, so the core asks ``method.call is not None`` rather than probing attributes, and a method
that lacks what it needs fails at registration with one line, not at its first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxpeft import config as config_module
from jaxpeft import tree
from jaxpeft.config import PeftConfig


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: a registry key
class Method:
    """A PEFT method: its config class, the leaves it keeps, and the functions the core calls.

    Required:
        config_class: the method's config, a ``PeftConfig`` dataclass with a ``peft_type``.
        leaf_keys: keys of the leaves every adapted layer holds (``params/<layer>/<key>/<adapter>``); the first
            marks a layer as adapted.
        create: ``(key, config, trace, dtype) -> {(layer path, leaf key): array}``, the new leaves of the layers
            the config targets in a traced model (``jaxpeft.core.resolve_layers`` finds them).
        interceptor *or* call: how the adapter runs. ``interceptor(config, adapter_name, dropout)`` returns a
            ``flax.linen.intercept_methods`` interceptor (layer-level methods); ``call(config, adapter_name,
            apply_fn, variables, args, kwargs, dropout)`` runs the whole call instead (prompt and prefix tuning,
            whose leaves sit at the top of ``params``).

    Optional (``None``: the method does not do it):
        trainable_keys: ``config -> keys`` of the leaves that train (default: all but ``constant_keys``).
        constant_keys: leaf keys that hold fixed values (masks, scalings), never trained or counted.
        optional_leaf_keys: keys some adapted layers hold and others not (DoRA's magnitude).
        leaf_layouts: ``{leaf key: layout}``: how each leaf's axes follow the layer's weight, for sharding (see
            ``jaxpeft.tree.LEAF_LAYOUTS``).
        finish: ``(key, config, trace, new_leaves, flat_params) -> (new_leaves, flat_params)``, steps that need the
            base weights' values (DoRA's magnitude, PiSSA, data-free inits).
        merge_layer: ``(config, layer_params, leaves, sign) -> layer_params`` with the adapter added (``sign=1``)
            or taken out (``-1``); a method without it cannot be merged.
        unmerge_layer: ``(config, layer_params, leaves, original_params) -> layer_params`` when ``sign=-1`` is
            not exact.
        mixed_interceptor: ``(configs, index, names, dropout) -> adapt(next_fun, args, kwargs, context, here)``,
            one pass through a layer for several of the method's adapters in a mixed batch (``None`` from
            ``adapt`` falls back to one pass per adapter).
        prepare: ``(config, model) -> config``, options filled from a ``jaxpeft.models`` model (prompt learning's
            ``token_dim``); run by ``get_peft_model``.
        task_defaults: ``(config, model) -> {option: value}``, HF PEFT's per-architecture defaults (the targets
            of ``model.config.model_type``) for options the config leaves unset.
        torch_tensors: ``(config, layer, name, shapes) -> {tensor name suffix: (leaf key, (torch shape, to_hf,
            from_hf))}``, the HF PEFT tensors of one adapted layer (default: each trainable leaf under its own key,
            in its own shape). ``layer`` is None for a module that is not a Dense, DenseGeneral, Embed, Conv or
            Einsum layer (e.g. a norm).
        torch_param_tensors: ``(layer, shapes) -> {suffix: (leaf key, layout)}``, the same for an adapter on one
            parameter (``target_parameters``, or a module's own parameters).
        hf_tensors / leaves_from_hf: ``(config, variables, adapter_name) -> {tensor name: array}`` and back, for
            tensors that are not one layer's (prompt tables, shared projections).
        loss_term: ``(config, params, adapter_name) -> scalar``, added to the training loss (not to evaluation's):
            AdaLoRA's orthogonal regularization. ``params`` is the whole variables tree.
        wrap_optimizer: ``(config, optimizer, variables, adapter_name) -> optimizer``, the optax transformation
            that trains the adapter in place of ``optimizer`` (AdaLoRA's rank allocator); ``variables`` is the
            model's whole tree (its constants say e.g. which layers are adapted), and the optimizer's state, which
            checkpoints keep, holds whatever the method tracks.
        trained_config: ``(config, opt_state, apply_fn, variables, sample_args, sample_kwargs, adapter_name) ->
            config``, the config to save after training with the state of ``wrap_optimizer``'s optimizer
            (AdaLoRA's ``rank_pattern``); ``apply_fn(variables, *sample_args, **sample_kwargs)``, the base model's
            call, is traced to name the layers.
        cli_name: the ``jaxpeft train --method`` name (default: ``peft_type`` in lower case).

    Example:
        >>> import jaxpeft
        >>> jaxpeft.method.method_for(jaxpeft.IA3Config()).leaf_keys
        ('ia3_l', 'ia3_active')
        >>> jaxpeft.method.Method(jaxpeft.IA3Config, ("x",), create=lambda *a: {})
        Traceback (most recent call last):
        ...
        TypeError: Method for IA3: give exactly one of interceptor= and call=
    """

    config_class: type[PeftConfig]
    leaf_keys: tuple[str, ...]
    create: Callable
    interceptor: Callable | None = None
    call: Callable | None = None
    trainable_keys: Callable[[Any], tuple[str, ...]] | None = None
    constant_keys: tuple[str, ...] = ()
    optional_leaf_keys: tuple[str, ...] = ()
    leaf_layouts: dict[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)
    finish: Callable | None = None
    merge_layer: Callable | None = None
    unmerge_layer: Callable | None = None
    mixed_interceptor: Callable | None = None
    prepare: Callable | None = None
    task_defaults: Callable | None = None
    torch_tensors: Callable | None = None
    torch_param_tensors: Callable | None = None
    hf_tensors: Callable | None = None
    leaves_from_hf: Callable | None = None
    loss_term: Callable | None = None
    wrap_optimizer: Callable | None = None
    trained_config: Callable | None = None
    cli_name: str = ""

    def __post_init__(self):
        cls = self.config_class
        if not (isinstance(cls, type) and issubclass(cls, PeftConfig) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"Method: config_class must be a PeftConfig dataclass, got {cls!r}")
        name = f"Method for {cls.peft_type or cls.__name__}"
        if not cls.peft_type:
            raise TypeError(f"{name}: {cls.__name__} sets no peft_type")
        if not self.leaf_keys or not all(isinstance(key, str) and key for key in self.leaf_keys):
            raise TypeError(f"{name}: leaf_keys must be a non-empty tuple of str")
        if (self.interceptor is None) == (self.call is None):
            raise TypeError(f"{name}: give exactly one of interceptor= and call=")
        for hook in dataclasses.fields(self):
            value = getattr(self, hook.name)
            if hook.name not in ("config_class", "leaf_keys", "constant_keys", "optional_leaf_keys", "leaf_layouts",
                                 "cli_name") and value is not None and not callable(value):
                raise TypeError(f"{name}: {hook.name} must be a function, got {type(value).__name__}")
        if self.unmerge_layer is not None and self.merge_layer is None:
            raise TypeError(f"{name}: unmerge_layer needs merge_layer")
        if not self.cli_name:
            object.__setattr__(self, "cli_name", cls.peft_type.lower())

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type

    @property
    def all_leaf_keys(self) -> tuple[str, ...]:
        return self.leaf_keys + self.optional_leaf_keys

    def trainable(self, config: PeftConfig) -> tuple[str, ...]:
        """Keys of the leaves that train for ``config``."""
        if self.trainable_keys is not None:
            return tuple(self.trainable_keys(config))
        return tuple(key for key in self.all_leaf_keys if key not in self.constant_keys)


_METHODS: dict[str, Method] = {}


def _shared(key: str, first: Method, second: Method) -> bool:
    """Whether two methods may both keep leaves under ``key`` (LoRA's ``trainable_token_indices`` rows are the
    trainable-tokens method's): both give it the same layout and neither holds it constant."""
    return (key in first.leaf_layouts and first.leaf_layouts.get(key) == second.leaf_layouts.get(key)
            and key not in first.constant_keys + second.constant_keys)


def register(method: Method) -> Method:
    """Makes ``method`` the implementation of configs of its ``peft_type``: the config loads from
    ``adapter_config.json``, the core runs it, ``jaxpeft train --method <cli_name>`` offers it. Registering a
    ``peft_type`` again replaces it. Returns ``method``.

    Example:
        >>> import jaxpeft
        >>> {"lora", "ia3", "adapter"} <= {m.cli_name for m in jaxpeft.method.registered()}
        True
    """
    if not isinstance(method, Method):
        raise TypeError(f"register takes a jaxpeft.method.Method, got {type(method).__name__}")
    clash = [key for other in _METHODS.values() if other.peft_type != method.peft_type
             for key in other.all_leaf_keys + other.constant_keys
             if key in method.all_leaf_keys + method.constant_keys and not _shared(key, other, method)]
    if clash:
        raise TypeError(f"Method for {method.peft_type}: leaf key(s) {sorted(set(clash))} belong to another method")
    taken = {other.cli_name: other.peft_type for other in _METHODS.values()}
    if taken.get(method.cli_name, method.peft_type) != method.peft_type:
        raise TypeError(f"Method for {method.peft_type}: cli_name {method.cli_name!r} is {taken[method.cli_name]}'s")
    _METHODS[method.peft_type] = method
    config_module.CONFIG_CLASSES[method.peft_type] = method.config_class
    trainable = tuple(key for key in method.all_leaf_keys if key not in method.constant_keys)
    tree.register_adapter_keys(trainable, constant=method.constant_keys, layouts=method.leaf_layouts)
    return method


def method_for(config: Any) -> Method:
    """The registered method of ``config`` (a ``LoraConfig``, ``IA3Config``, ...)."""
    if not isinstance(config, PeftConfig) or config.peft_type not in _METHODS:
        raise TypeError(f"expected a jaxpeft config such as LoraConfig, got {type(config).__name__}")
    return _METHODS[config.peft_type]


def registered() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def by_cli_name(name: str) -> Method:
    """The method ``jaxpeft train --method name`` means (its ``cli_name``, or its ``peft_type``)."""
    for method in _METHODS.values():
        if name.lower() in (method.cli_name, method.peft_type.lower()):
            return method
    raise KeyError(name)
