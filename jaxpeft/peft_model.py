"""``get_peft_model`` and ``PeftModel``: Hugging Face PEFT's workflow over jaxpeft's functional core.

A PeftModel wraps a ``jaxpeft.models`` model. It never changes the base model: it holds its own variables tree (the
base parameters, shared, plus the adapters) and calls the base module through ``jaxpeft.rewrite``. The functional
pieces stay in reach for users with their own training loops: ``.apply_fn`` (the rewritten apply of the active
adapter), ``.params`` and ``.trainable_mask``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax

from jaxpeft import core, tree
from jaxpeft.config import PeftConfig


def _sample_inputs(model) -> dict:
    from jaxpeft.models.auto import _init_inputs

    return _init_inputs(model.module)


HEAD_TASKS = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
_MIXED = object()  # the key of the mixed-batch runner among the runners by adapter name (no name can equal it)


def _with_task_defaults(config: PeftConfig, model) -> PeftConfig:
    """HF PEFT's defaults: the method's ``task_defaults`` (the architecture's ``target_modules``) and, for
    classification tasks, the classifier head (``classifier`` or ``score``) in ``modules_to_save``. Without a
    ``task_type`` the model's head gives it (a sequence classifier is ``SEQ_CLS``)."""
    changes = {}
    if config.task_type is None and model.head in HEAD_TASKS:
        # HF PEFT cannot know the task without task_type and leaves a new classifier head frozen; the model knows.
        changes["task_type"] = HEAD_TASKS[model.head]
    task_type = changes.get("task_type", config.task_type)
    task_defaults = core.method_for(config).task_defaults
    if task_defaults is not None:
        changes.update(task_defaults(config, model))
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and hasattr(config, "modules_to_save"):
        # Matched as plain name suffixes, as in HF PEFT: DistilBERT's pre_classifier is saved too.
        heads = [name for name in ("classifier", "score") if any(m.endswith(name) for m in model.params["params"])]
        saved = list(config.modules_to_save or [])
        changes["modules_to_save"] = saved + [name for name in heads if name not in saved]
    return dataclasses.replace(config, **changes) if changes else config


class PeftModel:
    """A base model with one or more named adapters, used like HF PEFT's ``PeftModel``.

    Example:
        >>> import transformers, jaxpeft
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> base = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
        ...     vocab_size=100, n_positions=64))
        >>> model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4))  # GPT-2's default target: c_attn
        >>> model.print_trainable_parameters()
        trainable params: 1,024 || all params: 31,744 || trainable%: 3.2258
        >>> model(input_ids=[[1, 2, 3]]).logits.shape
        (1, 3, 100)
    """

    def __init__(self, model, config: PeftConfig | None, adapter_name: str = "default", seed: int = 0):
        core.check_adapter_name(adapter_name)
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.params = model.params
        self.active_adapter: str | None = None
        self.adapter_folders: dict[str, str] = {}  # where loaded adapters came from (a tokenizer may sit there)
        self._disabled = False
        self._runners: dict[Any, Any] = {}
        if config is not None:
            self.add_adapter(adapter_name, config, seed=seed)
            self.set_adapter(adapter_name)

    # ----- adapters -----

    def add_adapter(self, adapter_name: str, config: PeftConfig, seed: int = 0) -> None:
        """Adds a new adapter (not made active: ``set_adapter`` does that)."""
        core.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose another name or delete_adapter it")
        config = _with_task_defaults(config, self.base_model)
        if config.base_model_name_or_path is None:  # as HF PEFT: torch's AutoPeftModel finds the base model by it
            name = getattr(self.base_model.config, "name_or_path", "") or None
            config = dataclasses.replace(config, base_model_name_or_path=name)
        method = core.method_for(config)
        if method.prepare is not None:  # e.g. prompt learning: num_layers, token_dim, ... from the model's config
            config = method.prepare(config, self.base_model)
        self.params = core.init_adapters(jax.random.key(seed), config, self.base_model.apply_fn, self.params,
                                         adapter_name=adapter_name, **_sample_inputs(self.base_model))
        self.peft_config[adapter_name] = config
        self._runners.clear()

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the active adapter."""
        self._check_name(adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter and its leaves; if it was active, the first remaining adapter becomes active."""
        self._check_name(adapter_name)
        flat = tree.flatten(self.params)
        kept = {path: leaf for path, leaf in flat.items()
                if not any(path[i] in tree.ADAPTER_KEYS and path[i + 1] == adapter_name
                           for i in range(len(path) - 1))}
        self.params = tree.unflatten_like(kept, self.params)
        del self.peft_config[adapter_name]
        self._runners.clear()
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)

    def _check_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise core.AdapterError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the ``with`` block the model runs as the plain base model (also if the block raises)."""
        previous, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = previous

    # ----- the functional pieces -----

    @property
    def apply_fn(self):
        """The rewritten apply of the active adapter (the base apply while ``disable_adapter`` is on, or before any
        adapter is added)."""
        if not self.peft_config:
            return self.base_model.apply_fn
        name = None if self._disabled or self.active_adapter is None else self.active_adapter
        return functools.partial(core.rewrite(self.base_model.apply_fn, self.peft_config), adapter_name=name)

    @property
    def trainable_mask(self):
        """True for the leaves that train for the active adapter (none if it was loaded for inference)."""
        mask = core.trainable_mask(self.params, self.peft_config[self.active_adapter], self.active_adapter)
        if self.peft_config[self.active_adapter].inference_mode:
            mask = jax.tree_util.tree_map(lambda _: False, mask)
        return mask

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        count = tree.count_parameters(self.params, self.trainable_mask)
        return count.trainable, count.total

    def print_trainable_parameters(self) -> None:
        """Prints HF PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
        print(tree.count_parameters(self.params, self.trainable_mask))

    # ----- running -----

    def _runner(self):
        from jaxpeft.models.auto import PretrainedModel

        name = None if self._disabled else self.active_adapter
        if name not in self._runners:
            base = self.base_model
            runner = PretrainedModel(base.module, self.params, base.config, base.family, base.head)
            runner.apply_fn = self.apply_fn
            self._runners[name] = runner
        return self._runners[name]

    def _mixed_runner(self, adapter_names: Any, batch_size: int):
        """The runner for a batch with one adapter per example, and the ``AdapterMix`` to pass it."""
        from jaxpeft.models.auto import PretrainedModel

        names = list(adapter_names)
        if len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch_size}; give one per example")
        mix = core.AdapterMix.of(names)
        unknown = sorted({n for n in names if n != core.BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names mentions {unknown}, which are not adapters of this model; adapters: "
                             f"{sorted(self.peft_config)} (or '{core.BASE}' for the base model)")
        if _MIXED not in self._runners:
            base = self.base_model
            runner = PretrainedModel(base.module, self.params, base.config, base.family, base.head)
            runner.apply_fn = core.rewrite(base.apply_fn, self.peft_config)
            runner._accepted = runner._accepted | {"adapter_name"}
            self._runners[_MIXED] = runner
        return self._runners[_MIXED], mix

    def __call__(self, *args, params: Any = None, adapter_names: Any = None, **kwargs):
        """Runs the model with the active adapter; arguments as for the base model.

        ``adapter_names`` (one adapter name, or ``"__base__"``, per example) runs a mixed batch in one jitted call.
        """
        params = self.params if params is None else params
        if adapter_names is None:
            return self._runner()(*args, params=params, **kwargs)
        input_ids = args[0] if args else kwargs.get("input_ids")
        runner, mix = self._mixed_runner(adapter_names, len(input_ids))
        return runner(*args, params=params, adapter_name=mix, **kwargs)

    def generate(self, *args, params: Any = None, adapter_names: Any = None, **kwargs):
        """Generates with the active adapter; arguments as for the base model's ``generate``.

        ``adapter_names`` (one per example, ``"__base__"`` for none) generates a mixed batch.
        """
        params = self.params if params is None else params
        if adapter_names is None:
            return self._runner().generate(*args, params=params, **kwargs)
        input_ids = args[0] if args else kwargs.get("input_ids")
        runner, mix = self._mixed_runner(adapter_names, len(input_ids))
        model_kwargs = {**(kwargs.pop("model_kwargs", None) or {}), "adapter_name": mix}
        return runner.generate(*args, params=params, model_kwargs=model_kwargs, **kwargs)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True) -> None:
        """Adds ``adapter_name``, a weighted combination of LoRA ``adapters`` (``"svd"``, ``"linear"`` or ``"cat"``,
        as HF PEFT; see ``jaxpeft.weighted_adapter``). It is not made active: ``set_adapter`` does that."""
        from jaxpeft import weighted_adapter

        core.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose another name or delete_adapter it")
        self.params, config = weighted_adapter.add_weighted_adapter(
            self.params, self.peft_config, adapters, weights, adapter_name, self.base_model.apply_fn,
            combination_type=combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices, **_sample_inputs(self.base_model))
        self.peft_config[adapter_name] = config
        self._runners.clear()

    # ----- files in the HF PEFT format -----

    def save_pretrained(self, folder: str, selected_adapters: list[str] | None = None) -> None:
        """Writes each adapter as HF PEFT does: ``default`` in ``folder``, any other in ``folder/<name>``.

        Every adapter's folder is checked to lie inside ``folder`` (off the default adapter's files) before
        anything is written (``jaxpeft.hf_format.adapter_folder``).
        """
        from jaxpeft import hf_format

        names = selected_adapters or list(self.peft_config)
        for name in names:
            self._check_name(name)
            hf_format.adapter_folder(folder, name)
        for name in names:
            hf_format.save_adapter(folder, self.params, self.peft_config[name], self.base_model.apply_fn,
                                   adapter_name=name, **_sample_inputs(self.base_model))

    def load_adapter(self, folder: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Adds the adapter saved in ``folder`` (HF PEFT format, written by jaxpeft or torch PEFT)."""
        from jaxpeft import hf_format

        core.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose another name or delete_adapter it")
        params, config = hf_format.load_adapter(folder, self.base_model.apply_fn, self.params,
                                                adapter_name=adapter_name, **_sample_inputs(self.base_model))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        # Nothing above changed the model: a failed load leaves it as it was.
        self.params = params
        self.peft_config[adapter_name] = config
        self.adapter_folders[adapter_name] = os.fspath(folder)
        self._runners.clear()

    @classmethod
    def from_pretrained(cls, model, folder: str, adapter_name: str = "default", is_trainable: bool = False):
        """A PeftModel of ``model`` with the adapter saved in ``folder``; frozen unless ``is_trainable``."""
        peft_model = cls(model, None)
        peft_model.load_adapter(folder, adapter_name, is_trainable=is_trainable)
        peft_model.set_adapter(adapter_name)
        return peft_model

    # ----- back to a plain model -----

    def merge_and_unload(self, adapter_name: str | None = None, requantize: bool = False):
        """A plain model (same class as the base) with the adapter merged into its weights.

        On a quantized base the result is a float model; ``requantize=True`` quantizes the merged weights again
        (logging the error that adds) and keeps the others quantized.
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_name(name)
        return self._plain_model(core.merge(self.params, self.peft_config[name], name, requantize=requantize))

    def unload(self):
        """The base model without any adapter (the weights untouched)."""
        return self._plain_model(tree.strip_adapters(self.params))

    def _plain_model(self, params):
        from jaxpeft.models.auto import PretrainedModel

        base = self.base_model
        return PretrainedModel(base.module, params, base.config, base.family, base.head)


def get_peft_model(model, peft_config: PeftConfig, adapter_name: str = "default", seed: int = 0) -> PeftModel:
    """Wraps a ``jaxpeft.models`` model with a new adapter; the model itself is not changed.

    ``target_modules=None`` takes HF PEFT's default for the architecture (GPT-2 ``c_attn``, BERT/RoBERTa
    ``query``/``value``, DistilBERT ``q_lin``/``v_lin``, Llama family ``q_proj``/``v_proj``).
    """
    return PeftModel(model, peft_config, adapter_name=adapter_name, seed=seed)
