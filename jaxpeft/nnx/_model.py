"""``PeftModel`` for Flax NNX: an ``nnx.Module`` that runs a model with adapters, trained the NNX way."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpeft import core, hf_format, quantization, sharding
from jaxpeft._tracing import PARAM_SLOTS
from jaxpeft.config import PeftConfig
from jaxpeft.nnx._graph import (
    ADAPT,
    AdaptedModule,
    AdapterConstant,
    Static,
    find,
    independent_copy,
    param_variables,
    selecting,
    set_child,
    unseen_modules,
    view,
    wrap_quantized,
)
from jaxpeft.quantization import QuantizationConfig
from jaxpeft.tree import ADAPTER_KEYS, ParameterCount, flatten, shape_of, strip_adapters

DEFAULT = "default"


def _abstract(example: Any) -> Any:
    """Example inputs with arrays replaced by their shapes and dtypes (kept without holding device memory)."""
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)) if hasattr(leaf, "shape") else leaf,
        example)


def _concrete(example: Any) -> Any:
    """Zeros in place of the shapes ``_abstract`` kept (token ids of 0 are valid inputs)."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.zeros(leaf.shape, leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf, example)


def _nnx_child(node: Any, segment: Any) -> Any:
    if isinstance(node, (nnx.List, list, tuple, nnx.Dict, dict)):
        return node[segment]
    return getattr(node, segment)


def _replace_variable(root: nnx.Module, nnx_path: tuple, variable: nnx.Variable) -> None:
    parent = root
    for segment in nnx_path[:-1]:
        parent = _nnx_child(parent, segment)
    if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
        parent[nnx_path[-1]] = variable
    else:
        setattr(parent, nnx_path[-1], variable)


def _sharding_of(variable: nnx.Variable) -> tuple | None:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def _leaf_specs(variables: Any, existing: dict) -> tuple[dict, Any]:
    """The sharding names of every leaf (adapter leaves take theirs from the weight they adapt: A its input axes,
    B its output axes, the rank none), and the mesh the base weights are placed on (or None)."""
    base = {path: PartitionSpec(*_sharding_of(var)) for path, (_, var) in existing.items() if _sharding_of(var)}
    if not base:
        return {}, None
    specs = flatten(sharding.param_specs({"params": variables["params"]},
                                         {"params": flax.traverse_util.unflatten_dict(base)})["params"])
    meshes = [var.get_value().sharding.mesh for _, (_, var) in existing.items()
              if isinstance(getattr(var.get_value(), "sharding", None), NamedSharding)]
    return specs, (meshes[0] if meshes else None)


def _new_leaf(kind: type, value: Any, spec: PartitionSpec | None, mesh: Any) -> nnx.Variable:
    """An adapter leaf variable, with ``out_sharding`` metadata and placed on ``mesh`` where its weight is."""
    if spec is None or not any(spec):
        return kind(value)
    names = tuple(spec)
    if mesh is not None and all(name is None or name in mesh.axis_names for name in names):
        value = jax.device_put(value, NamedSharding(mesh, PartitionSpec(*names)))
    return kind(value, out_sharding=names, eager_sharding=False)


def _wrappers(root: nnx.Module) -> list[AdaptedModule]:
    return [node for _, node in nnx.iter_modules(root) if isinstance(node, AdaptedModule)]


def _first_adapter_key(path: tuple[str, ...]) -> int | None:
    """Where a leaf's path leaves its module: at an adapter key, or a slot for adapters on one parameter."""
    return next((i for i, segment in enumerate(path) if segment in ADAPTER_KEYS or segment in PARAM_SLOTS), None)


def _retyped(variable: nnx.Variable, kind: type, value: Any) -> nnx.Variable:
    """``variable`` as a variable of type ``kind`` holding ``value``, with its metadata (sharding, ...)."""
    return kind.from_metadata(value, dict(variable.get_metadata()))


def _plain(model: nnx.Module, params: Mapping, trained_base: frozenset) -> nnx.Module:
    """A copy of ``model`` without adapter wrappers, its parameters set from ``params`` (a linen-style tree); the
    base parameters that trained as ``nnx.LoRAParam`` (``trained_base``, by path) are ``nnx.Param`` again, and the
    modules that hold quantized weights are wrapped to run (``wrap_quantized``)."""
    plain = independent_copy(model)
    for wrapper in sorted(_wrappers(plain), key=lambda w: -len(w.layer_path)):
        if wrapper.layer_path:
            set_child(find(plain, wrapper.layer_path[:-1]), wrapper.layer_path[-1], wrapper.base_layer)
        else:
            plain = wrapper.base_layer
    values = flatten(params)
    for path, (nnx_path, variable) in param_variables(plain).items():
        value = values.get(path, variable.get_value())
        if path in trained_base:
            _replace_variable(plain, nnx_path, _retyped(variable, nnx.Param, value))
        else:
            variable.set_value(value)
    return wrap_quantized(plain)


class PeftModel(nnx.Module):
    """An NNX model with adapters, called like the model itself.

    ``base_model`` is a copy of the model (sharing its arrays) in which every adapted module is an
    ``AdaptedModule``; the adapters' trainable leaves are ``nnx.LoRAParam``, so ``nnx.Optimizer(peft, tx,
    wrt=nnx.LoRAParam)`` trains exactly them. Calls take ``adapter_names=`` (one adapter name, or
    ``"__base__"``, per example: a mixed batch in one call). Make one with ``get_peft_model`` or
    ``PeftModel.from_pretrained``.

    Adapter dropout (``lora_dropout``) draws from ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` stream) while the
    model is in training mode; ``peft.eval()`` turns it off, ``peft.train()`` on again, as for NNX's own dropout.

    Example:
        >>> import jax.numpy as jnp, optax, jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> x = jnp.ones((3, 4))
        >>> peft = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["layers.0"]), x)
        >>> bool(jnp.allclose(peft(x), model(x)))  # B starts at zero
        True
        >>> optimizer = nnx.Optimizer(peft, optax.adam(1e-2), wrt=nnx.LoRAParam)
        >>> loss = lambda m: jnp.mean(m(x) ** 2)
        >>> _ = optimizer.update(peft, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(peft))
        >>> str(peft.trainable_parameters())
        'trainable params: 24 || all params: 82 || trainable%: 29.2683'
    """

    def __init__(self, model: nnx.Module, example: tuple[tuple, dict], seed: int = 0):
        self.base_model = model
        self.peft_configs = Static({})
        self.example = Static(_abstract(example))
        self.active_adapter: str | None = None
        self.disabled = False
        self.rngs = nnx.Rngs(dropout=seed)  # adapter dropout, while not ``deterministic`` (``.eval()``)
        self.deterministic = False
        self.trained_base = frozenset()  # paths of base parameters that train (bias="all"), as nnx.LoRAParam

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """``{adapter name: config}``."""
        return dict(self.peft_configs.value)

    def __call__(self, *args, adapter_names: Sequence[str] | core.AdapterMix | None = None, **kwargs):
        if self.disabled:
            selection = None
        elif adapter_names is not None:
            selection = adapter_names if isinstance(adapter_names, core.AdapterMix) else core.AdapterMix.of(
                adapter_names)
        else:
            selection = self.active_adapter
        dropout = not self.deterministic and any(getattr(config, "lora_dropout", 0) > 0
                                                 for config in self.peft_configs.value.values())
        with selecting(selection, self.rngs.dropout() if dropout else None):
            return self.base_model(*args, **kwargs)

    def _view(self):
        return view(self.base_model)

    def _example_inputs(self) -> tuple[tuple, dict]:
        return _concrete(self.example.value)

    def add_adapter(self, adapter_name: str, config: PeftConfig, *, key: jax.Array | int = 0) -> None:
        """Adds a new adapter (initialised as the config says; ``key`` seeds its random leaves)."""
        core.check_adapter_name(adapter_name)
        if adapter_name in self.peft_configs.value:
            raise core.AdapterError(f"an adapter named {adapter_name!r} already exists; pass another adapter_name")
        apply_fn, variables = self._view()
        args, kwargs = self._example_inputs()
        key = jax.random.key(key) if isinstance(key, int) else key
        try:
            new = core.init_adapters(key, config, apply_fn, variables, *args, adapter_name=adapter_name, **kwargs)
        except core.AdapterError as error:
            unseen = [] if args or kwargs else unseen_modules(apply_fn.trace_without_inputs())
            if not unseen:
                raise
            raise core.AdapterError(f"{error}; without example inputs only stock layers are seen: pass inputs "
                                    f"after the config, e.g. get_peft_model(model, config, tokens), to adapt "
                                    f"modules such as {', '.join(unseen[:3])}") from None
        self._attach(new, {adapter_name: config})

    def _attach(self, variables: Any, configs: dict[str, PeftConfig]) -> None:
        """Puts the new adapters' leaves (and any changed base values) of ``variables`` into the model."""
        masks = [flatten(core.trainable_mask(variables, config, name)["params"]) for name, config in configs.items()]
        trains = {path for mask in masks for path, on in mask.items() if on}
        flat = flatten(variables["params"])
        existing = param_variables(self.base_model)
        for path, (nnx_path, variable) in existing.items():
            value = flat.get(path, variable.get_value())
            if path in trains and not isinstance(variable, nnx.LoRAParam):  # a bias that trains (bias="all")
                _replace_variable(self.base_model, nnx_path, _retyped(variable, nnx.LoRAParam, value))
                self.trained_base = self.trained_base | {path}
            elif value is not variable.get_value():  # PiSSA leaves the residual in the kernel
                variable.set_value(value)
        specs, mesh = _leaf_specs(variables, existing)
        groups: dict[tuple[str, ...], dict] = {}
        for path, value in flat.items():
            cut = _first_adapter_key(path)
            if path in existing or cut is None:
                continue
            kind = nnx.LoRAParam if path in trains else AdapterConstant
            groups.setdefault(path[:cut], {})[path[cut:]] = _new_leaf(kind, value, specs.get(path), mesh)
        self.peft_configs = Static({**self.peft_configs.value, **configs})
        for module_path in sorted(groups, key=len, reverse=True):
            self._wrapper_at(module_path).add_leaves(groups[module_path])
        for wrapper in _wrappers(self.base_model):
            wrapper.peft_configs = self.peft_configs
        if self.active_adapter is None:
            self.set_adapter(next(iter(configs)))

    def _wrapper_at(self, path: tuple[str, ...]) -> AdaptedModule:
        node = find(self.base_model, path)
        if isinstance(node, AdaptedModule):
            return node
        wrapper = AdaptedModule(node, path, self.peft_configs, ADAPT, self.active_adapter)
        if path:
            set_child(find(self.base_model, path[:-1]), path[-1], wrapper)
        else:
            self.base_model = wrapper
        return wrapper

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the adapter that calls run."""
        if adapter_name not in self.peft_configs.value:
            raise core.AdapterError(f"no adapter named {adapter_name!r} (adapters: {sorted(self.peft_configs.value)})")
        self.active_adapter = adapter_name
        for wrapper in _wrappers(self.base_model):
            wrapper.active_adapter = adapter_name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, calls run the base model (as HF PEFT's ``disable_adapter``)."""
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False

    def _name(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.peft_configs.value:
            raise core.AdapterError(f"no adapter named {name!r} (adapters: {sorted(self.peft_configs.value)})")
        return name

    def merge_and_unload(self, adapter_name: str | None = None, requantize: bool = False) -> nnx.Module:
        """The model (its own classes, no adapter variables) with the adapter folded into its weights; this
        ``PeftModel`` is not changed. On a quantized base (``jaxpeft.nnx.quantize``) the result is a float model
        (every weight dequantized); with ``requantize`` the merged weights are quantized again as they were (the
        error that adds is logged) and the others stay quantized, as ``jaxpeft.merge`` does."""
        name = self._name(adapter_name)
        _, variables = self._view()
        merged = core.merge(variables, self.peft_configs.value[name], name, requantize=requantize)
        return _plain(self.base_model, merged["params"], self.trained_base)

    def unload(self) -> nnx.Module:
        """The base model without any adapter (its own classes and weights)."""
        _, variables = self._view()
        return _plain(self.base_model, strip_adapters(variables)["params"], self.trained_base)

    def trainable_parameters(self) -> ParameterCount:
        """Trainable (``nnx.LoRAParam``) and total parameter counts, as HF PEFT's
        ``print_trainable_parameters`` reports them."""
        def size(state):  # a quantized weight counts as the weight it holds, as jaxpeft.count_parameters counts it
            leaves = jax.tree_util.tree_leaves(state, is_leaf=quantization.is_quantized)
            return sum(math.prod(shape_of(leaf)) for leaf in leaves)
        return ParameterCount(size(nnx.state(self, nnx.LoRAParam)), size(nnx.state(self, nnx.Param)))

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters())

    def functional(self, task: str = "causal_lm") -> FunctionalPeftModel:
        """This model as ``params`` + ``apply_fn`` (for ``jaxpeft.Trainer``, ``jaxpeft.training``); ``task`` is
        the loss the training code uses by default."""
        return FunctionalPeftModel(self, task)

    def set_params(self, params: Any) -> None:
        """Sets every parameter and adapter leaf from ``params`` (``functional().params``'s layout)."""
        values = flatten(params["params"] if "params" in params else params)
        for path, (_, variable) in param_variables(self.base_model).items():
            if path in values:
                variable.set_value(values[path])

    def save_pretrained(self, folder: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        key_mapping: Mapping[str, str] | None = None) -> list[str]:
        """Writes each adapter as an HF PEFT folder (``folder`` for ``"default"``, ``folder/<name>`` for the
        others); ``key_mapping`` (``{regex: replacement}``) renames module paths into a transformers model's.
        Returns the folders written."""
        apply_fn, variables = self._view()
        args, kwargs = self._example_inputs()
        names = list(self.peft_configs.value) if selected_adapters is None else list(selected_adapters)
        return [hf_format.save_adapter(folder, variables, self.peft_configs.value[self._name(name)], apply_fn,
                                       *args, adapter_name=name, key_mapping=key_mapping, **kwargs)
                for name in names]

    def load_adapter(self, folder: str | os.PathLike, adapter_name: str = DEFAULT,
                     key_mapping: Mapping[str, str] | None = None) -> PeftConfig:
        """Reads an HF PEFT adapter folder (torch PEFT's or ``save_pretrained``'s) as a new adapter; returns its
        config."""
        if adapter_name in self.peft_configs.value:
            raise core.AdapterError(f"an adapter named {adapter_name!r} already exists; pass another adapter_name")
        apply_fn, variables = self._view()
        args, kwargs = self._example_inputs()
        loaded, config = hf_format.load_adapter(folder, apply_fn, variables, *args, adapter_name=adapter_name,
                                                key_mapping=key_mapping, **kwargs)
        self._attach(loaded, {adapter_name: config})
        return config

    @classmethod
    def from_pretrained(cls, model: nnx.Module, folder: str | os.PathLike, *example_args,
                        adapter_name: str = DEFAULT, key_mapping: Mapping[str, str] | None = None,
                        is_trainable: bool = False, **example_kwargs) -> PeftModel:
        """``model`` with the adapter in ``folder`` (an HF PEFT folder); ``model`` itself is not changed. The
        result is in ``.eval()`` mode (no dropout) unless ``is_trainable``, as HF PEFT loads for inference; its
        adapter leaves are ``nnx.LoRAParam`` either way (an optimizer with ``wrt=nnx.LoRAParam`` trains them)."""
        peft = cls(independent_copy(model), (example_args, example_kwargs))
        peft.load_adapter(folder, adapter_name, key_mapping)
        if not is_trainable:
            peft.eval()
        return peft


class ModelInfo:
    """What jaxpeft's training code reads of a base model: its config (labels, pad token), head (the task), module
    (the call's parameters) and logical axes (none: NNX variables carry their sharding themselves)."""

    def __init__(self, model: nnx.Module, task: str):
        self.module = model
        self.head = task
        config = getattr(model, "config", None)
        self.config = config if hasattr(config, "num_labels") else types.SimpleNamespace(
            num_labels=getattr(config, "num_labels", None), pad_token_id=getattr(config, "pad_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None))

    def logical_axes(self) -> None:
        return None


class FunctionalPeftModel:
    """An NNX ``PeftModel`` as jaxpeft's functional models are: ``params`` (a linen-style tree of every parameter
    and adapter leaf), ``apply_fn(params, *inputs, rngs=None)`` running the active adapter, ``trainable_mask``.
    ``jaxpeft.Trainer`` and ``jaxpeft.training`` take it; setting ``params`` writes the values back into the NNX
    model, so training through it trains the NNX model.

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> peft = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["layers.0"]))
        >>> functional = peft.functional()
        >>> jaxpeft.count_parameters(functional.params, functional.trainable_mask)
        ParameterCount(trainable=24, total=82)
        >>> bool(jnp.allclose(functional.apply_fn(functional.params, jnp.ones((1, 4))), peft(jnp.ones((1, 4)))))
        True
    """

    def __init__(self, peft: PeftModel, task: str = "causal_lm"):
        self.peft = peft
        self.base_model = ModelInfo(peft.base_model, task)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.peft.peft_config

    @property
    def active_adapter(self) -> str | None:
        return self.peft.active_adapter

    @property
    def params(self) -> dict:
        return self.peft._view()[1]

    @params.setter
    def params(self, params: Any) -> None:
        self.peft.set_params(params)

    @property
    def apply_fn(self):
        apply_fn, _ = self.peft._view()
        if self.active_adapter is None or self.peft.disabled:
            return apply_fn
        return functools.partial(core.rewrite(apply_fn, self.peft_config), adapter_name=self.active_adapter)

    @property
    def trainable_mask(self) -> Any:
        name = self.active_adapter
        return core.trainable_mask(self.params, self.peft_config[name], name)

    def save_pretrained(self, folder: str | os.PathLike, selected_adapters: Sequence[str] | None = None) -> None:
        self.peft.save_pretrained(folder, selected_adapters)


def get_peft_model(model: nnx.Module, config: PeftConfig, *example_args, adapter_name: str = DEFAULT,
                   key: jax.Array | int = 0, **example_kwargs) -> PeftModel:
    """``model`` with a new adapter, as a ``PeftModel`` (an ``nnx.Module``); ``model`` itself is not changed (the
    result shares its arrays, nothing is copied on the device).

    ``example_args`` / ``example_kwargs`` are inputs the model can be called with: jaxpeft runs the model on them
    abstractly (``jax.eval_shape``, nothing is computed) to see which modules the config targets and how each
    module that is not a stock layer uses its parameters. Without them, the stock layers (``nnx.Linear``,
    ``LinearGeneral``, ``Einsum``, ``Embed``, ``Conv``) are found from the NNX graph alone, as HF PEFT finds
    torch layers; other modules then need the inputs (the error says so). ``key`` seeds the adapter's random
    initial values.

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> config = jaxpeft.LoraConfig(r=2, target_modules=["layers.0"], init_lora_weights=False)
        >>> peft = peft_nnx.get_peft_model(model, config, jnp.ones((1, 4)))
        >>> peft.base_model.layers[0].lora_A["default"].shape, peft.base_model.layers[0].lora_B["default"].shape
        ((4, 2), (2, 8))
        >>> merged = peft.merge_and_unload()
        >>> type(merged.layers[0]).__name__, bool(jnp.allclose(merged(jnp.ones((1, 4))), peft(jnp.ones((1, 4)))))
        ('Linear', True)
    """
    peft = PeftModel(independent_copy(model), (example_args, example_kwargs),
                     seed=key if isinstance(key, int) else 0)
    peft.add_adapter(adapter_name, config, key=key)
    return peft




def _quantize_selected(model: nnx.Module, qconfig: QuantizationConfig,
                       target_modules: Sequence[str] | str | None) -> tuple[int, list[str]]:
    """Sets each selected float weight of ``model`` (changed in place) to its ``QuantizedArray``; returns how many
    weights are selected (those quantized already included) and the paths of every weight of two or more axes."""
    selected, weights = 0, []
    for path, (_, variable) in param_variables(model).items():
        value = variable.get_value()
        if not isinstance(variable, nnx.Param) or isinstance(variable, nnx.LoRAParam) or len(shape_of(value)) < 2:
            continue
        weights.append(".".join(path))
        is_float = quantization.is_quantized(value) or jnp.issubdtype(jnp.result_type(value), jnp.floating)
        if is_float and quantization.selects(qconfig, path, shape_of(value), target_modules):
            selected += 1
            if not quantization.is_quantized(value):
                variable.set_value(quantization.quantize_array_jit(value, qconfig))
    return selected, weights


def quantize(model: nnx.Module, qconfig: QuantizationConfig,
             target_modules: Sequence[str] | str | None = None) -> nnx.Module:
    """A copy of ``model`` whose selected weights are ``QuantizedArray`` values of their ``nnx.Param`` (QLoRA's
    frozen base); ``model`` itself is not changed (the other arrays are shared).

    The selection is ``jaxpeft.quantize``'s, by NNX graph path: by default the ``kernel`` of every linear layer
    (``nnx.Linear``, ``LinearGeneral``, ``Einsum``) outside ``qconfig.skip_modules`` (the heads ``lm_head``,
    ``score``, ``classifier``, ``qa_outputs``); embeddings, norms and biases stay float. With ``target_modules``
    (names or a regular expression over the dotted module path) every float parameter of two or more axes of
    those modules is quantized: raw einsum weights, ``(experts, d, f)`` expert tensors. Each module that holds a
    quantized weight becomes an ``AdaptedModule`` without adapters, whose calls read its weights dequantized (in
    the jitted computation, as a linen layer reads a ``QuantizedArray``). Weights quantized already are kept as
    they are, so quantizing twice gives the same model. ``get_peft_model`` then adapts it; ``merge_and_unload()``
    returns a float model, ``merge_and_unload(requantize=True)`` a quantized one.

    Example:
        >>> import jax.numpy as jnp, jaxpeft
        >>> from flax import nnx
        >>> from jaxpeft import nnx as peft_nnx
        >>> model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 2, rngs=nnx.Rngs(1)))
        >>> quantized = peft_nnx.quantize(model, jaxpeft.QuantizationConfig("nf4"))
        >>> quantized.layers[0].kernel.get_value()
        QuantizedArray(nf4, shape=(64, 32), dtype=float32)
        >>> x = jnp.ones((3, 64))
        >>> float(jnp.abs(quantized(x) - model(x)).max()) < 0.2  # the nf4 rounding
        True
        >>> peft = peft_nnx.get_peft_model(quantized, jaxpeft.LoraConfig(r=2, target_modules=["layers.0"]))
        >>> type(peft.merge_and_unload().layers[0]).__name__
        'Linear'
    """
    if not isinstance(qconfig, QuantizationConfig):
        raise TypeError(f"quantize takes a jaxpeft.QuantizationConfig, not {type(qconfig).__name__}")
    quantized = independent_copy(model)
    selected, weights = _quantize_selected(quantized, qconfig, target_modules)
    if not selected:
        chosen = (f"target_modules={target_modules!r}" if target_modules is not None
                  else "by default the kernels of linear layers")
        shown = ", ".join(weights[:12]) + (f", ... ({len(weights)} in all)" if len(weights) > 12 else "")
        raise ValueError(f"quantize selected no weight of {type(model).__name__} ({chosen}, outside skip_modules "
                         f"{list(qconfig.skip_modules or quantization.DEFAULT_SKIP_MODULES)}); its weights of two or "
                         f"more axes: {shown or 'none'}")
    return wrap_quantized(quantized)
