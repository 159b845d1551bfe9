"""The base of every method's config: Hugging Face PEFT field names, strict options, JSON round trips."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

# The task names, all in one place: HF PEFT's task types, the jaxpeft head of each that has one, and the other
# spellings (popular tutorials', transformers' pipeline names) each stands for.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
HEAD_TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "token_cls": "TOKEN_CLS"}
TASK_ALIASES = {
    "text-generation": "CAUSAL_LM",
    "causal-lm": "CAUSAL_LM",
    "classification": "SEQ_CLS",
    "text-classification": "SEQ_CLS",
    "sequence-classification": "SEQ_CLS",
    "sentiment-analysis": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "ner": "TOKEN_CLS",
    "question-answering": "QUESTION_ANS",
    "feature-extraction": "FEATURE_EXTRACTION",
    "text2text-generation": "SEQ_2_SEQ_LM",
}
# Aliases -> jaxpeft head names, for the tasks that have a head.
HEAD_ALIASES = {
    alias: head for alias, task_type in TASK_ALIASES.items() for head, type_ in HEAD_TASK_TYPES.items()
    if type_ == task_type
}
# transformers' pipeline task aliases -> the pipeline names.
PIPELINE_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


class ConfigError(ValueError):
    """A config option has a value that cannot work; the message says which and how to fix it."""


def strict_options(cls):
    """Class decorator for a config dataclass: an unknown keyword is a one-line error naming the closest option."""
    init = cls.__init__
    known = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - known)
        if unknown:
            hints = []
            for name in unknown:
                close = [cls.option_hints[name]] if name in cls.option_hints else difflib.get_close_matches(
                    name, known, n=1, cutoff=0.4)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{cls.__name__} got unknown option(s) {', '.join(hints)}; "
                              f"known options: {', '.join(sorted(known))}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@dataclasses.dataclass
class PeftConfig:
    """Fields every Hugging Face PEFT config has; subclasses add their method's options."""

    peft_type: ClassVar[str] = ""
    option_hints: ClassVar[dict[str, str]] = {}  # common misspellings -> the option meant

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        if self.task_type is not None:
            task = str(getattr(self.task_type, "value", self.task_type))
            self.task_type = TASK_ALIASES.get(task.lower().replace("_", "-"), task.upper())
            if self.task_type not in TASK_TYPES:
                raise ConfigError(f"task_type={task!r} is unknown; use one of {', '.join(TASK_TYPES)} "
                                  f"(or {', '.join(TASK_ALIASES)})")

    def to_dict(self) -> dict[str, Any]:
        """The config as the JSON-ready dict of HF PEFT's ``adapter_config.json``."""
        fields = dataclasses.asdict(self)
        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
        return {"peft_type": self.peft_type, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def check(condition: bool, message: str) -> None:
    """Raises ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN, not infinite); numpy scalars count.

    Example:
        >>> is_finite_number(0.5), is_finite_number(float("nan")), is_finite_number("8"), is_finite_number(True)
        (True, False, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    """Whether ``value`` is an integer >= 1 (not a bool); numpy integers count.

    Example:
        >>> is_positive_int(4), is_positive_int(0), is_positive_int(2.0), is_positive_int(True)
        (True, False, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def plain_number(value: numbers.Real) -> int | float:
    """``value`` as a Python int or float (a numpy scalar would not survive ``to_json``)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def layer_indices(name: str, value: Any) -> int | list[int]:
    """``layers_to_transform``-style option ``name``: one layer index, or a list of them, each an int >= 0.

    Example:
        >>> layer_indices("layers_to_transform", (0, 2)), layer_indices("layers_to_transform", 1)
        ([0, 2], 1)
    """
    def is_index(index: Any) -> bool:
        return isinstance(index, numbers.Integral) and not isinstance(index, bool) and index >= 0

    if is_index(value):
        return int(value)
    listed = isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))
    indices = list(value) if listed else []
    check(listed and all(is_index(index) for index in indices),
          f"{name} must be a layer index (an int >= 0) or a list of them, got {name}={value!r}")
    return [int(index) for index in indices]


# peft_type -> config class, filled by ``jaxpeft.method.register`` as each method file is imported.
CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


def check_module_targets(config: Any) -> None:
    """Checks and normalises the module-selection options a config has (HF PEFT's rules): ``target_modules``,
    ``exclude_modules``, ``modules_to_save``, ``layers_pattern`` as a regex string or a list of names;
    ``layers_pattern`` only with ``layers_to_transform``, which needs list targets."""
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, str):
            value = list(value)
            check(all(isinstance(v, str) for v in value), f"{name} must hold module names (strings)")
            setattr(config, name, value)
    check(not getattr(config, "layers_pattern", None) or config.layers_to_transform is not None,
          "layers_pattern needs layers_to_transform (as in HF PEFT); give the layer indices to adapt")
    if getattr(config, "layers_to_transform", None) is not None:
        config.layers_to_transform = layer_indices("layers_to_transform", config.layers_to_transform)
        check(not isinstance(config.target_modules, str),
              f"layers_to_transform cannot be used with target_modules={config.target_modules!r}, a string (as in HF "
              "PEFT); list the module names instead, e.g. target_modules=['q_proj', 'v_proj']")


def option_docs(cls: type) -> dict[str, str]:
    """``{option: its documentation}`` from the ``Attributes:`` section of a config class's docstring, each
    collapsed to one line.

    Example:
        >>> import jaxpeft
        >>> option_docs(jaxpeft.LoraConfig)["r"]
        'the rank.'
    """
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside, indent = True, None
            continue
        if not inside or not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        name, sep, text = stripped.partition(":")
        if depth == indent and sep and name.isidentifier():
            current = name
            docs[name] = text.strip()
        elif current is not None:
            docs[current] += " " + stripped
    return docs


def config_class(peft_type: str) -> type[PeftConfig]:
    """The config class registered for ``peft_type`` (as in an ``adapter_config.json``).

    Example:
        >>> import jaxpeft
        >>> from jaxpeft.config import config_class
        >>> config_class("IA3").__name__
        'IA3Config'
        >>> config_class("XLORA")
        Traceback (most recent call last):
        ...
        jaxpeft.config.ConfigError: peft_type='XLORA' is not supported by jaxpeft; supported: ...IA3, ...LORA...
    """
    if peft_type not in CONFIG_CLASSES:
        raise ConfigError(f"peft_type={peft_type!r} is not supported by jaxpeft; supported: "
                          f"{', '.join(sorted(CONFIG_CLASSES))}")
    return CONFIG_CLASSES[peft_type]


def model_dimensions(model_config: Any) -> dict[str, int | None]:
    """What HF PEFT reads from a transformers config (its text config, for multimodal ones) for prompt learning:
    ``num_layers``, ``token_dim`` and ``num_attention_heads`` (``None`` where absent).

    Example:
        >>> import transformers
        >>> from jaxpeft.config import model_dimensions
        >>> model_dimensions(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4))
        {'num_layers': 2, 'token_dim': 32, 'num_attention_heads': 4}
    """
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()

    def first(names: tuple[str, ...]) -> Any:
        return next((getattr(model_config, n) for n in names if getattr(model_config, n, None) is not None), None)

    return {"num_layers": first(("num_hidden_layers", "num_layers", "n_layer")),
            "token_dim": first(("hidden_size", "n_embd", "d_model")),
            "num_attention_heads": first(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))}
