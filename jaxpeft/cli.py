"""The ``jaxpeft`` command line: train, evaluate, generate with, merge and export adapters without writing Python.

::

    jaxpeft train --model ./bert-tiny --method lora --r 8 --task seq_cls --train-file train.jsonl \\
        --eval-file dev.jsonl --output-dir runs/reviews --epochs 3 --learning-rate 2e-4
    jaxpeft eval --run runs/reviews --data test.jsonl              # accuracy and F1 as JSON
    jaxpeft generate --model ./gpt2 --adapter runs/poems/adapter --prompt "Once upon a time"
    jaxpeft merge --run runs/reviews --output merged/              # a checkpoint transformers loads
    jaxpeft export --run runs/reviews --best --output best/        # an HF PEFT folder from a training checkpoint

``train`` writes ``<output-dir>/adapter`` (HF PEFT format), the trainer's checkpoints, metrics and plot, and
``<output-dir>/jaxpeft_run.json``, which records the model, tokenizer, task and adapter config so that the other
commands need only ``--run <output-dir>``. Every command also reads its options from ``--config file.yaml`` (or
``.json``): the keys are the long flag names with underscores (``learning_rate: 2e-4``), and flags given on the
command line win over the file.

Errors in the input (a bad flag, a missing file, an option the method does not have) end the command with a
one-line ``jaxpeft <command>: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jaxpeft
from jaxpeft import core, data, outputs, trainer, training
from jaxpeft import method as methods
from jaxpeft.config import PeftConfig, option_docs

# transformers, the model families and Orbax are imported by the commands that use them, so that ``jaxpeft --help``
# answers quickly.

RUN_FILE = "jaxpeft_run.json"
ADAPTER_FOLDER = "adapter"
TASKS = jaxpeft.config.HEAD_TASK_TYPES  # our task names -> HF's task types
TASK_ALIASES = jaxpeft.config.HEAD_ALIASES  # other spellings -> our task names
TOKENIZER_FILES = data.TOKENIZER_FILES  # copied next to a merged checkpoint


class UsageError(ValueError):
    """A command's options or files cannot work as given; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers an option may take: ``low`` (inclusive, or exclusive with ``low_open``) up to ``high`` (likewise);
    never NaN or an infinity.

    Example:
        >>> Bounds(0, 1, high_open=True).check("--warmup-ratio", 1.0)
        Traceback (most recent call last):
        ...
        jaxpeft.cli.UsageError: --warmup-ratio must be in [0, 1), got 1.0
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, flag: str, value: float) -> None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not math.isfinite(value) or below or above:
            raise UsageError(f"{flag} must be {self}, got {value}")


AT_LEAST_ONE = Bounds(1)
NOT_NEGATIVE = Bounds(0)
POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1, high_open=True)


# ----------------------------------------------------------------------------------------- option values


def comma_list(text: str) -> list[str]:
    """A comma-separated flag value as a list of names (blanks dropped).

    Example:
        >>> comma_list("query, value,")
        ['query', 'value']
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as JSON when it is JSON (``4``, ``true``, ``["a"]``), else as text.

    Example:
        >>> key_value("r=4"), key_value("bias=lora_only"), key_value("target_modules=[\\"q\\", \\"v\\"]")
        (('r', 4), ('bias', 'lora_only'), ('target_modules', ['q', 'v']))
    """
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. lora_dropout=0.1)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def task_name(task: str) -> str:
    """Our task name (``seq_cls``, ``causal_lm``, ``token_cls``) for it or HF's spelling (``SEQ_CLS``,
    ``text-classification``).

    Example:
        >>> task_name("SEQ_CLS"), task_name("text-generation"), task_name("token_cls")
        ('seq_cls', 'causal_lm', 'token_cls')
    """
    name = str(task).strip()
    by_hf_name = {hf: ours for ours, hf in TASKS.items()}
    for candidate in (name, name.lower(), name.upper(), name.lower().replace("_", "-")):
        if candidate in TASKS:
            return candidate
        if candidate in by_hf_name:
            return by_hf_name[candidate]
        if candidate in TASK_ALIASES:
            return TASK_ALIASES[candidate]
    raise UsageError(f"unknown task {task!r}; use one of {', '.join(TASKS)} (or {', '.join(TASKS.values())})")


def json_value(text: str) -> Any:
    """A flag value read as JSON when it is JSON (``true``, ``{"q": 8}``, ``0.5``), else as text.

    Example:
        >>> json_value('{"q_proj": 8}'), json_value("gaussian")
        ({'q_proj': 8}, 'gaussian')
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_KIND_TYPES: dict[str, Callable[[str], Any] | None] = {"str": str, "texts": str, "int": int, "float": float,
                                                       "list": comma_list, "pairs": key_value, "flag": None,
                                                       "json": json_value}


def _file_value(key: str, value: Any, kind: str, choices: Sequence[str] | None) -> Any:
    """A config-file value checked and converted as the flag's own parser would."""
    def wrong(expected: str) -> UsageError:
        return UsageError(f"config key {key!r} must be {expected}, got {value!r}")

    if kind == "flag":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "list":
        if isinstance(value, str):
            return comma_list(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise wrong("a list of names (or one comma-separated string)")
    if kind == "texts":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return value
        raise wrong("a text or a list of texts")
    if kind == "pairs":
        if isinstance(value, Mapping):
            return [(str(k).replace("-", "_"), v) for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
            return [key_value(item) for item in value]
        raise wrong("a mapping of option names to values")
    if kind == "json":
        return value
    if isinstance(value, (dict, list)) or value is None:
        raise wrong(f"a single {kind} value")
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise wrong("an integer")
        try:
            value = int(value)
        except ValueError:
            raise wrong("an integer") from None
    elif kind == "float":
        if isinstance(value, bool):
            raise wrong("a number")
        try:
            value = float(value)
        except ValueError:
            raise wrong("a number") from None
    else:
        value = str(value)
    if choices and value not in choices:
        raise wrong(f"one of {', '.join(map(str, choices))}")
    return value


def load_config_file(path: str) -> dict[str, Any]:
    """The options in a ``.yaml``/``.yml`` or ``.json`` file, as a mapping of option names to values.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = path.write_text("method: lora\\nlearning_rate: 2.0e-4\\ntarget_modules: [query, value]\\n")
        >>> load_config_file(str(path))
        {'method': 'lora', 'learning_rate': 0.0002, 'target_modules': ['query', 'value']}
    """
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if suffix == ".json":
        try:
            content = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise UsageError(f"config file {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or error
            raise UsageError(f"config file {path}{where}: not valid YAML ({problem})") from None
        content = {} if content is None else content
    else:
        raise UsageError(f"config file {path!r} must end in .yaml, .yml or .json")
    if not isinstance(content, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values, "
                         f"got a {type(content).__name__}")
    return content


# --------------------------------------------------------------------------------------------- the parser


class _Command:
    """One subcommand's parser and the kind, default and choices of each of its options (for config files)."""

    def __init__(self, subparsers, name: str, usage: str, help_text: str, description: str, epilog: str,
                 run: Callable):
        self.parser = subparsers.add_parser(
            name, usage=f"jaxpeft {name} {usage}", allow_abbrev=False, help=help_text,
            description=textwrap.fill(description, 79), epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
        self.parser.set_defaults(command=name)
        self.name = name
        self.run = run
        self.kinds: dict[str, str] = {}
        self.defaults: dict[str, Any] = {}
        self.choices: dict[str, Sequence[str] | None] = {}
        self.required: dict[str, str] = {}
        self.bounds: dict[str, Bounds] = {}
        self.option(self.parser, "--debug", "flag", "on an error, print the full traceback (and the libraries' "
                    "log messages)")

    def group(self, title: str):
        return self.parser.add_argument_group(title)

    def option(self, group, flag: str, kind: str, help_text: str, *, default: Any = None,
               choices: Sequence[str] | None = None, metavar: str | None = None, required: bool = False,
               shown_default: Any = None, bounds: Bounds | None = None) -> None:
        """Adds ``flag``; ``default`` applies when neither the command line nor the config file gives it, while
        ``shown_default`` is only said in the help (the value another part of jaxpeft defaults to). A number must
        lie within ``bounds`` (and be finite), whether it comes from the command line or the config file."""
        dest = flag.lstrip("-").replace("-", "_")
        kwargs: dict[str, Any] = {"dest": dest, "help": help_text}
        if kind == "flag":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _KIND_TYPES[kind]
            if not choices:
                kwargs["metavar"] = metavar or {"int": "N", "float": "X", "list": "A,B", "pairs": "KEY=VALUE"}.get(
                    kind, "NAME")
            if kind in ("pairs", "texts"):
                kwargs["action"] = "append"
            if choices:
                kwargs["choices"] = choices
        if required:
            kwargs["help"] += " (required)"
            self.required[dest] = flag
        elif (default if default is not None else shown_default) is not None and kind != "flag":
            kwargs["help"] += f" (default: {default if default is not None else shown_default})"
        group.add_argument(flag, **kwargs)
        self.kinds[dest] = kind
        self.defaults[dest] = default if kind != "flag" else False
        self.choices[dest] = choices
        if bounds is not None or kind == "float":
            self.bounds[dest] = bounds or Bounds()

    def options(self, namespace: argparse.Namespace) -> argparse.Namespace:
        """The options: the command line's, then the config file's, then the defaults (repeatable options
        collect both the file's and the command line's)."""
        given = {key: value for key, value in vars(namespace).items() if key != "command"}
        values: dict[str, Any] = {}
        config_path = given.get("config")
        if config_path:
            content = load_config_file(config_path)
            valid = sorted(key for key in self.kinds if key != "config")
            unknown = sorted(set(content) - set(valid))
            if unknown:
                raise UsageError(f"config file {config_path!r} has unknown key(s) {', '.join(unknown)}; valid keys "
                                 f"for {self.name}: {', '.join(valid)}")
            values = {key: _file_value(key, value, self.kinds[key], self.choices[key])
                      for key, value in content.items()}
        for key, value in given.items():
            values[key] = values.get(key, []) + value if self.kinds.get(key) == "pairs" else value
        for key, default in self.defaults.items():
            values.setdefault(key, default)
        missing = [flag for dest, flag in self.required.items() if values.get(dest) in (None, "", [])]
        if missing:
            raise UsageError(f"the following arguments are required: {', '.join(missing)} (on the command line or "
                             "in the --config file)")
        for dest, bounds in self.bounds.items():
            if values.get(dest) is not None:
                bounds.check("--" + dest.replace("_", "-"), values[dest])
        return argparse.Namespace(command=self.name, **values)


def _model_options(command: _Command) -> None:
    group = command.group("model")
    command.option(group, "--run", "str", "a folder written by `jaxpeft train`: its model, tokenizer, task and "
                   "adapter", metavar="DIR")
    command.option(group, "--model", "str", "base model: a folder with config.json, a hub id, a .gguf file, or a "
                   "Python factory pkg.module:function returning a Flax NNX model",
                   metavar="PATH_OR_ID")
    command.option(group, "--adapter", "str", "adapter folder in the HF PEFT format", metavar="DIR")
    command.option(group, "--tokenizer", "str", "tokenizer folder or hub id (default: the model's)", metavar="PATH")
    command.option(group, "--task", "str", "seq_cls, causal_lm or token_cls (default: the adapter's task_type)",
                   metavar="TASK")
    command.option(group, "--num-labels", "int", "classes of a classification head (default: the run's, else the "
                   "model config's)", bounds=AT_LEAST_ONE)
    command.option(group, "--config", "str", "read options from this YAML or JSON file", metavar="FILE")


def _data_options(group, command: _Command) -> None:
    command.option(group, "--text-column", "str", "column holding the text, a list of words for token_cls "
                   "(default: text, or the run's)", metavar="NAME")
    command.option(group, "--text-pair-column", "str", "column holding the second text of a pair", metavar="NAME")
    command.option(group, "--label-column", "str", "column holding the label, word labels for token_cls "
                   "(default: label, or the run's)", metavar="NAME")
    command.option(group, "--prompt-column", "str", "causal_lm instruction data: column of prompts (no loss on "
                   "them); needs --response-column", metavar="NAME")
    command.option(group, "--response-column", "str", "causal_lm instruction data: column of responses",
                   metavar="NAME")


# TrainingArguments fields behind the train command's hyper-parameter flags, and the numbers each may take.
HYPER_PARAMETERS = (
    ("--epochs", "num_train_epochs", "float", "passes over the training data", POSITIVE),
    ("--max-steps", "max_steps", "int", "stop after this many optimizer steps (overrides --epochs)", AT_LEAST_ONE),
    ("--batch-size", "per_device_train_batch_size", "int", "examples per training step", AT_LEAST_ONE),
    ("--eval-batch-size", "per_device_eval_batch_size", "int", "examples per evaluation batch", AT_LEAST_ONE),
    ("--grad-accum", "gradient_accumulation_steps", "int", "micro-batches per optimizer step", AT_LEAST_ONE),
    ("--learning-rate", "learning_rate", "float", "peak learning rate", POSITIVE),
    ("--lr-scheduler", "lr_scheduler_type", "str", "the learning rate's decay after warmup", None),
    ("--warmup-steps", "warmup_steps", "int", "steps of linear warmup", NOT_NEGATIVE),
    ("--warmup-ratio", "warmup_ratio", "float", "warmup as a fraction of all steps", FRACTION),
    ("--weight-decay", "weight_decay", "float", "AdamW weight decay (not on biases and norms)", NOT_NEGATIVE),
    ("--max-grad-norm", "max_grad_norm", "float", "clip gradients to this global norm (0: no clipping)",
     NOT_NEGATIVE),
    ("--loraplus-lr-ratio", "loraplus_lr_ratio", "float", "LoRA+: train LoRA's B this many times faster than A",
     POSITIVE),
    ("--seed", "seed", "int", "seed of the adapter's init, dropout and data order", NOT_NEGATIVE),
    ("--lm-loss-chunk-size", "lm_loss_chunk_size", "int", "causal_lm: tokens at a time through the output head in "
     "the loss, never holding the whole batch's logits (0: all at once)", NOT_NEGATIVE),
    ("--bf16", "bf16", "flag", "compute in bfloat16 (the adapter stays float32)", None),
    ("--logging-steps", "logging_steps", "int", "log the training loss every N steps", AT_LEAST_ONE),
    ("--eval-strategy", "eval_strategy", "str", "when to evaluate on --eval-file (default: epoch with an "
     "--eval-file, steps with --eval-steps)", None),
    ("--eval-steps", "eval_steps", "int", "evaluate every N steps (sets --eval-strategy steps)", AT_LEAST_ONE),
    ("--save-strategy", "save_strategy", "str", "when to save a checkpoint", None),
    ("--save-steps", "save_steps", "int", "save a checkpoint every N steps", AT_LEAST_ONE),
    ("--save-total-limit", "save_total_limit", "int", "keep at most N checkpoints (and the best)", AT_LEAST_ONE),
    ("--load-best-model-at-end", "load_best_model_at_end", "flag", "end with the best checkpoint's adapter", None),
    ("--metric-for-best-model", "metric_for_best_model", "str", "e.g. eval_loss or eval_accuracy", None),
    ("--group-by-length", "group_by_length", "flag", "batch examples of similar length together", None),
    ("--packing", "packing", "flag", "causal_lm: pack examples into rows of --max-length tokens, each example "
     "attending only to itself", None),
    ("--max-length", "max_length", "int", "truncate examples to this many tokens (default: the model's position "
     "limit, at most 512)", AT_LEAST_ONE),
    ("--no-progress", "disable_tqdm", "flag", "no progress bar", None),
    ("--mesh", "mesh", "str", "shard over the devices as a mesh, e.g. data=4,fsdp=2 or data=2,tensor=4 (default: "
     "data parallel over every device)", None),
)
def _option_kind(field: dataclasses.Field) -> str:
    """The flag kind of a config field, from its annotation: names lists, numbers, text, on/off, else JSON."""
    annotation = str(field.type).replace(" ", "")
    parts = set(annotation.split("|")) - {"None"}
    if any(part in ("Sequence[str]", "list[str]", "tuple[str,...]") for part in parts) and parts <= {
            "str", "Sequence[str]", "list[str]", "tuple[str,...]"}:
        return "list"
    if parts == {"bool"}:
        return "flag" if field.default is False else "json"
    if parts == {"int"}:
        return "int"
    if parts in ({"float"}, {"int", "float"}):
        return "float"
    return "str" if parts == {"str"} else "json"


def methods_in_order() -> list[methods.Method]:
    """jaxpeft's methods in the order of ``jaxpeft.methods.METHODS``, then any other registered method."""
    builtin = [method.peft_type for method in jaxpeft.methods.METHODS]
    return sorted(methods.registered(), key=lambda method: (
        builtin.index(method.peft_type) if method.peft_type in builtin else len(builtin)))


def method_flags() -> dict[str, tuple[str, str, list[str]]]:
    """``{flag: (kind, help, method names)}``: one flag for every option of every registered method's config
    (``--lora-alpha`` for ``LoraConfig.lora_alpha``), its help the config's documentation of the field.

    Example:
        >>> flags = method_flags()
        >>> flags["--lora-alpha"][0], "lora" in flags["--target-modules"][2], flags["--use-dora"][0]
        ('float', True, 'flag')
    """
    common = {field.name for field in dataclasses.fields(PeftConfig)}
    flags: dict[str, tuple[str, str, list[str]]] = {}
    for method in methods_in_order():
        docs = option_docs(method.config_class)
        for field in dataclasses.fields(method.config_class):
            if field.name in common:
                continue
            flag = "--" + field.name.replace("_", "-")
            if flag in flags:
                flags[flag][2].append(method.cli_name)
                continue
            flags[flag] = (_option_kind(field), docs.get(field.name, ""), [method.cli_name])
    return flags


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _Command]]:
    """The ``jaxpeft`` parser and its subcommands by name.

    Example:
        >>> parser, commands = build_parser()
        >>> sorted(commands)
        ['eval', 'export', 'generate', 'merge', 'train']
        >>> commands["merge"].options(parser.parse_args(["merge", "--run", "out", "--output", "merged"])).output
        'merged'
    """
    parser = argparse.ArgumentParser(
        prog="jaxpeft", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning (LoRA, IA3, adapters, prefix/prompt tuning, BitFit) for JAX.",
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(__doc__.split("::\n\n")[1].split("\n\n")[0]), "  ")
        + "\n\nRun `jaxpeft <command> --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"jaxpeft {jaxpeft.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>", dest="command", required=True)
    commands = {}

    train = _Command(subparsers, "train", "--model PATH_OR_ID --task TASK --method METHOD --train-file FILE "
                     "--output-dir DIR [options]\n       jaxpeft train --config FILE [options]",
                     "fine-tune an adapter on a data file",
                     "Fine-tune a parameter-efficient adapter on a .jsonl/.json/.csv/.tsv file.",
                     "example:\n  jaxpeft train --model ./bert --method lora --r 8 --task seq_cls \\\n"
                     "      --train-file train.jsonl --eval-file dev.jsonl --output-dir runs/reviews --epochs 3\n\n"
                     "config file keys are the long flag names with underscores (learning_rate: 2.0e-4);\n"
                     "flags on the command line override the file.", run_train)
    group = train.group("model")
    train.option(group, "--model", "str", "base model: a folder with config.json, a hub id, a .gguf file, or a "
                 "Python factory pkg.module:function returning a Flax NNX model",
                 metavar="PATH_OR_ID", required=True)
    train.option(group, "--tokenizer", "str", "tokenizer folder or hub id (default: the model's)", metavar="PATH")
    train.option(group, "--task", "str", "seq_cls, causal_lm or token_cls (or SEQ_CLS, CAUSAL_LM, TOKEN_CLS)",
                 metavar="TASK", required=True)
    train.option(group, "--num-labels", "int", "classes of the classification head (default: from the labels)",
                 bounds=AT_LEAST_ONE)
    train.option(group, "--quantize", "str", "hold the frozen base quantized (QLoRA): nf4, fp4, int8 or int4",
                 choices=("nf4", "fp4", "int8", "int4"))
    train.option(group, "--double-quant", "flag", "with --quantize nf4/fp4: quantize the block scales too "
                 "(bitsandbytes' double quantization)")
    train.option(group, "--remat-policy", "str", "recompute each layer's values in the backward pass rather than "
                 "keep them (gradient checkpointing): full, dots, dots_with_no_batch_dims, ... (benchmarks/RESULTS.md "
                 "measures time against memory)", metavar="POLICY")
    group = train.group("method")
    train.option(group, "--method", "str", "the PEFT method",
                 choices=tuple(method.cli_name for method in methods_in_order()), required=True)
    for flag, (kind, help_text, names) in method_flags().items():
        if flag.lstrip("-").replace("-", "_") not in train.kinds:
            suffix = f"[{', '.join(names)}]"
            train.option(group, flag, kind, f"{help_text} {suffix}" if help_text else suffix,
                         metavar="JSON" if kind == "json" else None)
    train.option(group, "--option", "pairs", "any other field of the method's config, the value as JSON "
                 "(repeatable), e.g. --option bias=lora_only --option 'layers_to_transform=[0,1]'")
    group = train.group("data")
    train.option(group, "--train-file", "str", "training data: .jsonl, .json, .csv or .tsv", metavar="FILE",
                 required=True)
    train.option(group, "--eval-file", "str", "evaluation data, same format", metavar="FILE")
    _data_options(group, train)
    group = train.group("training (TrainingArguments)")
    defaults = {field.name: field.default for field in dataclasses.fields(trainer.TrainingArguments)}
    choices = {"lr_scheduler_type": training.SCHEDULES, "eval_strategy": trainer.STRATEGIES,
               "save_strategy": trainer.STRATEGIES}
    for flag, field, kind, help_text, bounds in HYPER_PARAMETERS:
        shown = None if field == "eval_strategy" or kind == "flag" or defaults.get(field) == -1 else defaults.get(field)
        train.option(group, flag, kind, help_text, choices=choices.get(field), shown_default=shown, bounds=bounds)
    train.option(group, "--training-arg", "pairs", "any other TrainingArguments field, the value as JSON "
                 "(repeatable)")
    group = train.group("several hosts (jax.distributed; also read from JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    train.option(group, "--coordinator-address", "str", "host:port of process 0, the same for every process",
                 metavar="HOST:PORT")
    train.option(group, "--num-processes", "int", "how many processes take part", bounds=AT_LEAST_ONE)
    train.option(group, "--process-id", "int", "this process's number, 0 .. num-processes - 1", bounds=NOT_NEGATIVE)
    train.option(group, "--distributed", "flag", "let JAX detect the cluster (TPU pod, Slurm, Open MPI)")
    group = train.group("output")
    train.option(group, "--output-dir", "str", "run folder: adapter/, checkpoints, metrics and jaxpeft_run.json",
                 metavar="DIR", required=True)
    train.option(group, "--resume", "flag", "continue from the latest checkpoint in --output-dir")
    train.option(group, "--overwrite", "flag", "start afresh in an --output-dir that holds checkpoints (they are "
                 "deleted)")
    train.option(group, "--config", "str", "read options from this YAML or JSON file", metavar="FILE")
    commands["train"] = train

    evaluate = _Command(subparsers, "eval", "(--run DIR | --model PATH_OR_ID [--adapter DIR]) --data FILE [options]",
                        "evaluate an adapter on a data file (metrics as JSON)",
                        "Evaluate a model with its adapter on a data file and print the metrics as JSON: loss, "
                        "accuracy and F1 for classification; loss and perplexity for causal LM.",
                        "examples:\n  jaxpeft eval --run runs/reviews --data test.jsonl\n"
                        "  jaxpeft eval --model ./gpt2 --adapter runs/poems/adapter --data poems.jsonl", run_eval)
    _model_options(evaluate)
    group = evaluate.group("data")
    evaluate.option(group, "--data", "str", "evaluation data: .jsonl, .json, .csv or .tsv", metavar="FILE",
                    required=True)
    _data_options(group, evaluate)
    evaluate.option(group, "--batch-size", "int", "examples per batch", default=8, bounds=AT_LEAST_ONE)
    evaluate.option(group, "--max-length", "int", "truncate examples to this many tokens (default: the run's, "
                    "else the model's position limit, at most 512)", bounds=AT_LEAST_ONE)
    evaluate.option(group, "--output", "str", "also write the metrics to this JSON file", metavar="FILE")
    commands["eval"] = evaluate

    generate = _Command(subparsers, "generate", "(--run DIR | --model PATH_OR_ID [--adapter DIR]) --prompt TEXT "
                        "[options]", "continue prompts with a causal LM (and its adapter)",
                        "Continue one or more prompts with a causal language model, with or without an adapter.",
                        "example:\n  jaxpeft generate --model ./gpt2 --adapter runs/poems/adapter \\\n"
                        "      --prompt 'Once upon a time' --max-new-tokens 40 --do-sample --temperature 0.8",
                        run_generate)
    _model_options(generate)
    group = generate.group("generation")
    generate.option(group, "--prompt", "texts", "text to continue (repeat --prompt for a batch)", metavar="TEXT",
                    required=True)
    generate.option(group, "--max-new-tokens", "int", "tokens to add", default=32, bounds=AT_LEAST_ONE)
    generate.option(group, "--do-sample", "flag", "sample instead of greedy decoding")
    generate.option(group, "--temperature", "float", "sampling temperature", default=1.0, bounds=POSITIVE)
    generate.option(group, "--top-k", "int", "sample from the k most likely tokens", bounds=AT_LEAST_ONE)
    generate.option(group, "--top-p", "float", "sample from the smallest set of tokens holding this probability",
                    bounds=Bounds(0, 1, low_open=True))
    generate.option(group, "--seed", "int", "seed of the sampling", default=0, bounds=NOT_NEGATIVE)
    generate.option(group, "--json", "flag", "print a JSON list of {prompt, generated_text} instead of the texts")
    commands["generate"] = generate

    merge = _Command(subparsers, "merge", "(--run DIR | --model PATH_OR_ID --adapter DIR) --output DIR [options]",
                     "merge an adapter into the weights (an HF checkpoint)",
                     "Fold an adapter into the base weights and write a plain checkpoint (config.json, "
                     "model.safetensors, tokenizer files) that transformers and jaxpeft load.",
                     "example:\n  jaxpeft merge --run runs/reviews --output merged/\n\n"
                     "LoRA (DoRA), IA3 and BitFit merge; bottleneck adapters, prefix and prompt tuning cannot.",
                     run_merge)
    _model_options(merge)
    group = merge.group("output")
    merge.option(group, "--output", "str", "folder for the merged checkpoint", metavar="DIR", required=True)
    merge.option(group, "--overwrite", "flag", "replace --output if it exists")
    commands["merge"] = merge

    export = _Command(subparsers, "export", "--run DIR [--step N | --best] --output DIR [--overwrite]",
                      "write a training checkpoint's adapter as an HF PEFT folder",
                      "Write the adapter of one of a run's training checkpoints (the latest, --step N or --best) "
                      "as an HF PEFT folder that jaxpeft and torch PEFT load.",
                      "example:\n  jaxpeft export --run runs/reviews --best --output best-adapter/", run_export)
    group = export.group("checkpoint")
    export.option(group, "--run", "str", "a folder written by `jaxpeft train`", metavar="DIR", required=True)
    export.option(group, "--step", "int", "the checkpoint taken after this step (default: the latest)",
                  bounds=NOT_NEGATIVE)
    export.option(group, "--best", "flag", "the checkpoint with the best --metric-for-best-model")
    export.option(group, "--output", "str", "folder for the adapter", metavar="DIR", required=True)
    export.option(group, "--overwrite", "flag", "replace --output if it exists")
    export.option(group, "--config", "str", "read options from this YAML or JSON file", metavar="FILE")
    commands["export"] = export
    return parser, commands


# ---------------------------------------------------------------------------------- files and models


def _check_file(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"{flag} {path!r} {what}; pass a .jsonl, .json, .csv or .tsv file")
    return path


def _local_or_id(name: str) -> str:
    """An absolute path for a local model or tokenizer (so a run folder works from anywhere), else the hub id."""
    return os.path.abspath(name) if os.path.exists(name) else name


def read_run(folder: str) -> dict[str, Any]:
    """What ``jaxpeft train`` recorded in ``<folder>/jaxpeft_run.json``: model, tokenizer, task, adapter config.

    Example:
        >>> read_run("no-such-run")
        Traceback (most recent call last):
        ...
        jaxpeft.cli.UsageError: --run 'no-such-run' has no jaxpeft_run.json; pass the --output-dir of a ...
    """
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--run {folder!r} has no {RUN_FILE}; pass the --output-dir of a `jaxpeft train` run")
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def load_model(name_or_path: str, task: str, *, quiet: bool = False, **config_overrides: Any):
    """The ``jaxpeft.models`` model of ``name_or_path`` (folder, hub id, ``.gguf``) with the head of ``task``, or the
    Flax NNX model a factory ``pkg.module:function`` returns; keywords override the model's config
    (``num_labels=3``). ``quiet`` silences the warning about a newly initialised head (for when an adapter brings
    its trained copy).

    Example:
        >>> import tempfile
        >>> load_model(tempfile.mkdtemp(), "seq_cls")
        Traceback (most recent call last):
        ...
        FileNotFoundError: No config.json in '...'; pass a folder written by save_pretrained.
    """
    if is_factory(name_or_path):
        return load_factory(name_or_path, **config_overrides)
    from jaxpeft import models

    auto = {"seq_cls": models.AutoModelForSequenceClassification, "causal_lm": models.AutoModelForCausalLM,
            "token_cls": models.AutoModelForTokenClassification}[task_name(task)]
    logger = logging.getLogger("jaxpeft")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        return auto.from_pretrained(name_or_path, **config_overrides)
    finally:
        logger.setLevel(level)


def is_factory(name: str) -> bool:
    """Whether ``--model`` names a Python factory (``pkg.module:function``) rather than a folder, hub id or file."""
    return not os.path.exists(name) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", name) is not None


def load_factory(spec: str, **config_overrides: Any):
    """The Flax NNX model that the factory ``pkg.module:function`` returns, called with ``config_overrides`` (e.g.
    ``num_labels``) when it takes them. The module is imported as Python code: name only your own.

    Example:
        >>> load_factory("json:dumps")
        Traceback (most recent call last):
        ...
        jaxpeft.cli.UsageError: --model json:dumps did not return a Flax NNX model (it needs arguments: ...
    """
    import importlib
    import inspect

    from flax import nnx

    module_name, _, attribute = spec.partition(":")
    try:
        factory = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"--model {spec}: {error}; a factory is pkg.module:function, importable from here") from None
    if not callable(factory):
        raise UsageError(f"--model {spec} is a {type(factory).__name__}, not a function returning a Flax NNX model")
    if "id2label" in config_overrides and "num_labels" not in config_overrides:
        config_overrides = {**config_overrides, "num_labels": len(config_overrides["id2label"])}
    signature = inspect.signature(factory)
    wanted = {key: value for key, value in config_overrides.items() if key in signature.parameters}
    try:
        signature.bind(**wanted)
    except TypeError as error:
        raise UsageError(f"--model {spec} did not return a Flax NNX model (it needs arguments: {error})") from None
    model = factory(**wanted)
    if not isinstance(model, nnx.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not a Flax NNX model (nnx.Module)")
    return model


def is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def model_config(model: Any) -> Any:
    """The model's config (an NNX model's ``config`` attribute, if it has one)."""
    return getattr(model, "config", None) if is_nnx(model) else model.config


def _num_labels(model: Any) -> int | None:
    value = getattr(model_config(model), "num_labels", None)
    return None if value is None else int(value)


def _peft_model(model: Any, config: Any, seed: int):
    if is_nnx(model):
        from jaxpeft import nnx as peft_nnx

        return peft_nnx.get_peft_model(model, config, key=seed)
    return jaxpeft.get_peft_model(model, config, seed=seed)


def _with_adapter(base: Any, adapter: str):
    if is_nnx(base):
        from jaxpeft import nnx as peft_nnx

        return peft_nnx.PeftModel.from_pretrained(base, adapter)
    return jaxpeft.PeftModel.from_pretrained(base, adapter)


def _no_nnx(model: Any, command: str) -> None:
    if is_nnx(model):
        raise UsageError(f"jaxpeft {command} works on jaxpeft's model families (a folder, hub id or .gguf file), not "
                         "yet on Flax NNX models from a factory; use jaxpeft.nnx from Python")


def load_tokenizer(name_or_path: str, *, for_batches: bool = True):
    """The transformers tokenizer of a folder, hub id or ``.gguf`` file. With ``for_batches``, a tokenizer that
    has no pad token pads with its EOS token (padding is masked out anyway).

    Example:
        >>> import tempfile
        >>> load_tokenizer(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        jaxpeft.cli.UsageError: no tokenizer could be loaded from '...' (...); pass --tokenizer with a folder or ...
    """
    if name_or_path.endswith(".gguf"):
        from jaxpeft.models import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(name_or_path)
    else:
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError) as error:
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise UsageError(f"no tokenizer could be loaded from {name_or_path!r} ({reason}); pass --tokenizer "
                             "with a folder or hub id that has one") from None
    if for_batches and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_task(adapter: str) -> str | None:
    path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(path):
        raise UsageError(f"adapter folder {adapter!r} has no adapter_config.json; pass a folder in the HF PEFT format")
    with open(path, encoding="utf-8") as file:
        try:
            task_type = json.load(file).get("task_type")
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    return task_name(task_type) if task_type else None


def _adapter_num_labels(adapter: str) -> int | None:
    """The classes of the classifier head saved in an adapter folder (``modules_to_save``), if it holds one."""
    import safetensors

    from jaxpeft.models import hub

    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return None
    problem = hub.safetensors_problem(path)
    if problem is not None:
        raise UsageError(f"{path}: {problem}")
    with safetensors.safe_open(path, framework="np") as file:
        for suffix in (".classifier.out_proj.weight", ".classifier.weight", ".score.weight"):
            for name in file.keys():
                if name.endswith(suffix):
                    return int(file.get_slice(name).get_shape()[0])
    return None


@dataclasses.dataclass
class _Loaded:
    model: Any  # a PeftModel, or the plain model when there is no adapter
    base: Any
    task: str
    tokenizer_source: str
    run: dict


def _load_adapted(options: argparse.Namespace, *, needs_adapter: bool, task: str | None = None) -> _Loaded:
    """The model of ``--run`` or ``--model`` with the adapter of ``--run`` or ``--adapter`` loaded (and the task
    they are for; ``task`` requires one)."""
    run = read_run(options.run) if options.run else {}
    model_source = options.model or run.get("model")
    if not model_source:
        raise UsageError("pass --model (the base model) or --run (a `jaxpeft train` output folder)")
    adapter = options.adapter or (os.path.join(options.run, run.get("adapter", ADAPTER_FOLDER)) if options.run
                                  else None)
    if adapter is None and needs_adapter:
        raise UsageError("pass --adapter (an HF PEFT folder) or --run (a `jaxpeft train` output folder)")
    if adapter is not None and not os.path.isdir(adapter):
        raise UsageError(f"adapter folder {adapter!r} does not exist")
    recorded = options.task or run.get("task") or (_adapter_task(adapter) if adapter else None)
    recorded = task_name(recorded) if recorded else None
    if task is not None and recorded not in (None, task):
        raise UsageError(f"{options.command} needs a {task} model, but the adapter is for {recorded}")
    task = task or recorded
    if task is None:
        raise UsageError("the task is unknown: pass --task seq_cls, causal_lm or token_cls")
    overrides: dict[str, Any] = {}
    if task != "causal_lm":
        if options.num_labels is not None:
            overrides["num_labels"] = options.num_labels
        elif run.get("id2label"):
            overrides["id2label"] = {int(i): label for i, label in run["id2label"].items()}
        elif run.get("num_labels"):
            overrides["num_labels"] = run["num_labels"]
        elif adapter is not None and _adapter_num_labels(adapter):
            overrides["num_labels"] = _adapter_num_labels(adapter)
    if model_source == run.get("model"):
        overrides.update(_recorded_quantization(run))
    base = load_model(model_source, task, quiet=adapter is not None, **overrides)
    model = _with_adapter(base, adapter) if adapter else base
    tokenizer_source = options.tokenizer or run.get("tokenizer") or model_source
    return _Loaded(model, base, task, tokenizer_source, run)


# ------------------------------------------------------------------------------------------------ data


def _labels_in(examples: Sequence[Mapping], column: str, words: bool) -> list[Any]:
    values = []
    for example in examples:
        value = example.get(column)
        values.extend(value if words and isinstance(value, list) else [value])
    return values


def label_names(examples: Sequence[Mapping], column: str, task: str) -> list[str] | None:
    """The sorted label names when the labels are strings (``None`` for numeric labels).

    Example:
        >>> label_names([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}], "label", "seq_cls")
        ['neg', 'pos']
        >>> label_names([{"words": ["Ann", "ran"], "tags": ["PER", "O"]}], "tags", "token_cls")
        ['O', 'PER']
    """
    values = _labels_in(examples, column, task == "token_cls")
    if values and all(isinstance(value, str) for value in values):
        return sorted(set(values))
    return None


def _num_classes(examples: Sequence[Mapping], column: str, task: str) -> int | None:
    values = _labels_in(examples, column, task == "token_cls")
    ints = [value for value in values if isinstance(value, int) and not isinstance(value, bool)]
    return max(ints) + 1 if ints and len(ints) == len(values) else None


def _model_inputs(model) -> set[str]:
    import inspect

    return set(inspect.signature(type(model if is_nnx(model) else model.module).__call__).parameters) - {"self"}


def _check_columns(examples: Sequence[Mapping], options: argparse.Namespace, task: str, flag: str) -> None:
    """A one-line error naming the flag to change when the data lacks a column the options name."""
    instruction = options.prompt_column is not None or options.response_column is not None
    if instruction and task != "causal_lm":
        raise UsageError("--prompt-column/--response-column are for --task causal_lm")
    if instruction and (options.prompt_column is None or options.response_column is None):
        raise UsageError("instruction data needs both --prompt-column and --response-column")
    wanted = ({"--prompt-column": options.prompt_column, "--response-column": options.response_column} if instruction
              else {"--text-column": options.text_column or "text", "--text-pair-column": options.text_pair_column,
                    "--label-column": None if task == "causal_lm" else options.label_column or "label"})
    columns = set(examples[0])
    for column_flag, column in wanted.items():
        if column is not None and column not in columns:
            raise UsageError(f"{flag} has no column {column!r} (its columns: {', '.join(sorted(columns))}); pass "
                             f"{column_flag} naming the column to use")


def _tokenize(examples, tokenizer, options: argparse.Namespace, task: str, max_length: int,
              label2id: Mapping[str, int] | None, model) -> list[dict]:
    instruction = options.prompt_column is not None or options.response_column is not None
    if instruction:
        features = data.tokenize(examples, tokenizer, prompt_key=options.prompt_column,
                                 response_key=options.response_column, max_length=max_length, label_key=None)
    else:
        features = data.tokenize(examples, tokenizer, text_key=options.text_column or "text",
                                 text_pair_key=options.text_pair_column,
                                 label_key=None if task == "causal_lm" else options.label_column or "label",
                                 max_length=max_length, label2id=label2id,
                                 num_labels=None if task == "causal_lm" else _num_labels(model))
    if "token_type_ids" not in _model_inputs(model):  # e.g. a BERT tokenizer with a GPT-2 model
        for feature in features:
            feature.pop("token_type_ids", None)
    return features


def _collator(task: str, tokenizer, model, max_length: int | None, packed: bool = False):
    return trainer.default_collator(task, tokenizer, model_config(model), max_length, packed)


def _position_limit(model) -> tuple[int, str] | None:
    """The most positions the model has, and the config field that says so (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config(model), name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def _max_length(requested: int | None, model, tokenizer, virtual_tokens: int = 0) -> int:
    """``--max-length``, checked against the model's positions (after ``virtual_tokens`` of prompt tuning), or the
    default: the position limit, the tokenizer's ``model_max_length`` and 512, whichever is least."""
    limit = _position_limit(model)
    room = None if limit is None else limit[0] - virtual_tokens
    if room is not None and room < 1:
        raise UsageError(f"the model has {limit[0]} positions ({limit[1]}), no room for tokens after "
                         f"{virtual_tokens} virtual tokens; lower --num-virtual-tokens")
    if requested is not None:
        if room is not None and requested > room:
            virtual = f" after {virtual_tokens} virtual tokens" if virtual_tokens else ""
            raise UsageError(f"--max-length {requested} is more than the {room} positions the model has{virtual} "
                             f"({limit[1]}={limit[0]}); pass --max-length {room} or less")
        return requested
    limits = [512] + ([room] if room is not None else [])
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max - virtual_tokens)
    return max(1, min(limits))


def _string_label_ids(examples, options, task: str, run: dict, model_config) -> dict[str, int] | None:
    """``label2id`` for data with string labels: the run's label names, else the model config's."""
    names = label_names(examples, options.label_column or "label", task)
    if not names:
        return None
    id2label = run.get("id2label") or {str(k): v for k, v in (getattr(model_config, "id2label", None) or {}).items()}
    label2id = {name: int(i) for i, name in id2label.items()}
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise UsageError(f"labels {unknown} of the data are not labels of the model ({sorted(label2id)}); evaluate "
                         "with the --run that trained it, or use integer labels")
    return label2id


# ---------------------------------------------------------------------------------------------- train


def method_config(method: str, task: str, options: Mapping[str, Any]):
    """The ``PeftConfig`` of ``method`` (``lora``, ``ia3``, ``adapter``, ``prefix``, ``prompt``, ``bitfit`` or an
    HF ``peft_type``) for ``task`` with ``options`` (config field names), each checked against the config class.

    Example:
        >>> method_config("lora", "seq_cls", {"r": 4, "target_modules": ["query"]}).r
        4
        >>> method_config("ia3", "seq_cls", {"r": 4})
        Traceback (most recent call last):
        ...
        jaxpeft.cli.UsageError: --r is not an option of --method ia3 (IA3Config); its options: ...
    """
    try:
        cls = methods.by_cli_name(method).config_class
    except KeyError:
        names = ", ".join(registered.cli_name for registered in methods_in_order())
        raise UsageError(f"unknown method {method!r}; use one of {names}") from None
    fields = {field.name for field in dataclasses.fields(cls)} - {"task_type"}
    unknown = sorted(set(options) - fields)
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
        raise UsageError(f"{flags} {'is not an option' if len(unknown) == 1 else 'are not options'} of --method "
                         f"{method.lower()} ({cls.__name__}); its options: {', '.join(sorted(fields))}")
    return cls(task_type=TASKS[task_name(task)], **options)


def _method_options(options: argparse.Namespace) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for flag in method_flags():
        value = getattr(options, flag.lstrip("-").replace("-", "_"), None)
        if value is not None and value is not False:
            chosen[flag.lstrip("-").replace("-", "_")] = "all-linear" if value == ["all-linear"] else value
    chosen.update(dict(options.option or []))
    return chosen


def _training_arguments(options: argparse.Namespace) -> trainer.TrainingArguments:
    chosen: dict[str, Any] = {}
    for flag, field, _, _, _ in HYPER_PARAMETERS:
        value = getattr(options, flag.lstrip("-").replace("-", "_"))
        if value is not None and value is not False:
            chosen[field] = value
    chosen.update(dict(options.training_arg or []))
    if options.overwrite:
        chosen["overwrite_output_dir"] = True  # the Trainer deletes the earlier run's checkpoints
    if "eval_strategy" not in chosen and options.eval_file:
        chosen["eval_strategy"] = "steps" if chosen.get("eval_steps") else "epoch"
    known = {field.name for field in dataclasses.fields(trainer.TrainingArguments)} - {"output_dir"}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise UsageError(f"TrainingArguments has no field {', '.join(unknown)}; its fields: {', '.join(sorted(known))}")
    return trainer.TrainingArguments(output_dir=options.output_dir, **chosen)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _check_run_folder(options: argparse.Namespace) -> None:
    """Refuses a fresh run into a folder that holds an earlier run's outputs, and ``--resume`` without checkpoints
    (with the run folder's lock held, so that the answer stays true)."""
    earlier = outputs.earlier_run(options.output_dir)
    if earlier and not (options.resume or options.overwrite):
        raise UsageError(f"--output-dir {options.output_dir!r} holds the outputs of an earlier run "
                         f"({', '.join(earlier)}); pass --resume to continue it, --overwrite to replace them (only "
                         "what jaxpeft wrote there is removed), or choose a new folder")
    checkpoints = os.path.join(options.output_dir, "checkpoints")
    if options.resume and not (os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))):
        raise UsageError(f"--resume, but --output-dir {options.output_dir!r} has no checkpoints; drop --resume to "
                         "start afresh")


def _writer(options: argparse.Namespace):
    """The run folder's lock (in a multi-process run the first process writes), held from before the checks of
    what the folder holds to the end of the run."""
    import jax

    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return outputs.writer_lock(options.output_dir)


def _train_data(options: argparse.Namespace, task: str):
    """The examples of ``--train-file`` and ``--eval-file`` (None without one), their columns checked."""
    train_examples = data.load_dataset_file(_check_file(options.train_file, "--train-file"))
    eval_examples = (data.load_dataset_file(_check_file(options.eval_file, "--eval-file"))
                     if options.eval_file else None)
    _check_columns(train_examples, options, task, "--train-file")
    if eval_examples is not None:
        _check_columns(eval_examples, options, task, "--eval-file")
    return train_examples, eval_examples


def _quantization(options: argparse.Namespace) -> dict[str, Any]:
    """``{"quantization_config": ...}`` for ``--quantize`` (empty without it)."""
    if options.quantize is None:
        if options.double_quant:
            raise UsageError("--double-quant needs --quantize nf4 or fp4")
        return {}
    if is_factory(options.model):
        raise UsageError("--quantize loads a checkpoint quantized; an NNX factory builds its own model, so quantize "
                         "it there (jaxpeft.quantize on its parameters) and drop --quantize")
    try:
        return {"quantization_config": jaxpeft.QuantizationConfig(options.quantize,
                                                                  double_quant=bool(options.double_quant))}
    except ValueError as error:
        raise UsageError(f"--quantize {options.quantize}: {error}") from None


def _remat(options: argparse.Namespace) -> dict[str, Any]:
    """``{"remat_policy": ...}`` for ``--remat-policy`` (empty without it)."""
    if options.remat_policy is None:
        return {}
    if is_factory(options.model):
        raise UsageError("--remat-policy applies to the models jaxpeft loads; an NNX factory builds its own layers, "
                         "so wrap them in nnx.remat there and drop --remat-policy")
    from jaxpeft.models import attention

    try:
        attention.remat_policy_for(options.remat_policy)
    except ValueError as error:
        raise UsageError(f"--remat-policy: {error}") from None
    return {"remat_policy": options.remat_policy}


def _recorded_quantization(run: dict) -> dict[str, Any]:
    """The quantization a ``jaxpeft train`` run's base was loaded with, to load it the same way."""
    recorded = run.get("quantization")
    return {"quantization_config": jaxpeft.QuantizationConfig(**recorded)} if recorded else {}


def _head_overrides(options: argparse.Namespace, task: str, names: list[str] | None, examples) -> dict[str, Any]:
    """The model config's head options for the data's labels: ``id2label`` for label names, else ``num_labels``."""
    if task == "causal_lm":
        return {}
    if names:
        if options.num_labels is not None and options.num_labels != len(names):
            raise UsageError(f"--num-labels {options.num_labels} but the data has {len(names)} label names {names}")
        return {"id2label": dict(enumerate(names))}
    num_labels = options.num_labels or _num_classes(examples, options.label_column or "label", task)
    return {} if num_labels is None else {"num_labels": num_labels}


def _final_eval(run_trainer, result) -> dict:
    """The evaluation of the parameters the run ended with: the last step's evaluation when there was one, else a
    new one (also after ``load_best_model_at_end``)."""
    if run_trainer.eval_dataset is None:
        return {}
    last = next((record for record in reversed(run_trainer.log_history) if "eval_loss" in record), None)
    if last is not None and last.get("step") == result.global_step and not run_trainer.args.load_best_model_at_end:
        return {key: value for key, value in last.items() if key.startswith("eval_")}
    return {key: value for key, value in run_trainer.evaluate().items() if key.startswith("eval_")}


def run_train(options: argparse.Namespace) -> int:
    """``jaxpeft train``: fine-tune, then write ``<output-dir>/adapter`` and ``<output-dir>/jaxpeft_run.json``."""
    from jaxpeft import sharding

    sharding.initialize_distributed(options.coordinator_address, options.num_processes, options.process_id,
                                    auto=bool(options.distributed))
    task = task_name(options.task)
    if options.resume and options.overwrite:
        raise UsageError("pass --resume or --overwrite, not both")
    outputs.check_apart(options.output_dir, {"--model": options.model, "--tokenizer": options.tokenizer},
                        output_flag="--output-dir")
    with _writer(options):
        _check_run_folder(options)
        return _train(options, task)


def _input_virtual_tokens(config: Any) -> int:
    """The positions a config's virtual tokens take in front of the input (prompt tuning and p-tuning)."""
    return config.num_virtual_tokens if getattr(config, "peft_type", None) in ("PROMPT_TUNING", "P_TUNING") else 0


def _train(options: argparse.Namespace, task: str) -> int:
    import jax

    peft_options = {"base_model_name_or_path": _local_or_id(options.model), **_method_options(options)}
    peft_config = method_config(options.method, task, peft_options)  # a bad option fails before the model loads
    remat = _remat(options)
    train_examples, eval_examples = _train_data(options, task)
    training_args = _training_arguments(options)
    tokenizer_source = options.tokenizer or options.model
    tokenizer = load_tokenizer(tokenizer_source)
    all_examples = list(train_examples) + list(eval_examples or [])
    names = None if task == "causal_lm" else label_names(all_examples, options.label_column or "label", task)
    # quiet: the new classifier head is trained (modules_to_save), so transformers' "newly initialized" is moot
    quantized = _quantization(options)
    model = load_model(options.model, task, quiet=True, **quantized, **remat,
                       **_head_overrides(options, task, names, all_examples))
    virtual_tokens = _input_virtual_tokens(peft_config)
    max_length = _max_length(options.max_length, model, tokenizer, virtual_tokens)
    if training_args.packing:
        training_args = dataclasses.replace(training_args, max_length=max_length)
    label2id = {name: i for i, name in enumerate(names)} if names else None
    train_features = _tokenize(train_examples, tokenizer, options, task, max_length, label2id, model)
    eval_features = (_tokenize(eval_examples, tokenizer, options, task, max_length, label2id, model)
                     if eval_examples is not None else None)
    if task != "causal_lm":
        data.check_labels(train_features, _num_labels(model), task, training=True)

    peft_model = _peft_model(model, peft_config, training_args.seed)
    counted = (peft_model.trainable_parameters() if is_nnx(model)
               else jaxpeft.count_parameters(peft_model.params, peft_model.trainable_mask))
    print(f"jaxpeft train: {counted}", file=sys.stderr)
    run = {
        "model": _local_or_id(options.model),
        "tokenizer": _local_or_id(tokenizer_source),
        "task": task,
        "method": options.method,
        "peft_config": jaxpeft.config_to_hf_dict(peft_model.peft_config["default"]),
        "num_labels": None if task == "causal_lm" else _num_labels(model),
        "id2label": {str(i): name for i, name in enumerate(names)} if names else None,
        "columns": {"text": options.text_column, "text_pair": options.text_pair_column, "label": options.label_column,
                    "prompt": options.prompt_column, "response": options.response_column},
        "max_length": max_length,
        "quantization": quantized["quantization_config"].to_dict() if quantized else None,
        "training_arguments": _jsonable(dataclasses.asdict(training_args)),
        "adapter": ADAPTER_FOLDER,
    }
    if jax.process_index() == 0:  # inputs checked: the run starts (and --overwrite removes the earlier one's outputs)
        outputs.start_run(options.output_dir, resume=bool(options.resume), overwrite=bool(options.overwrite))
    _write_run_record(options.output_dir, run)  # before training: export works on a cut run
    compute_metrics = None
    if task != "causal_lm" and eval_features is not None:
        from jaxpeft.evaluation import classification_metrics

        compute_metrics = classification_metrics
    run_trainer = trainer.Trainer(
        peft_model, training_args, train_dataset=train_features, eval_dataset=eval_features,
        data_collator=_collator(task, tokenizer, model, max_length, training_args.packing),
        compute_metrics=compute_metrics,
        tokenizer=tokenizer, task=task)
    result = run_trainer.train(resume_from_checkpoint=True if options.resume else None)
    adapter_folder = os.path.join(options.output_dir, ADAPTER_FOLDER)
    run_trainer.save_model(adapter_folder)
    summary = {"global_step": int(result.global_step), **_jsonable(dict(result.metrics or {})),
               **_jsonable(_final_eval(run_trainer, result)), "adapter": adapter_folder}
    run["result"] = summary
    _write_run_record(options.output_dir, run)
    print(outputs.json_line(dict(sorted(summary.items()))))
    return 0


def _write_run_record(folder: str, run: Mapping[str, Any]) -> None:
    import jax

    if jax.process_index() == 0:
        outputs.write_json(os.path.join(folder, RUN_FILE), run)
        outputs.record(folder, RUN_FILE)


# ----------------------------------------------------------------------------------------------- eval


def evaluate_features(model, features: Sequence[Mapping], task: str, collator, batch_size: int = 8) -> dict:
    """Metrics of ``model`` (a PeftModel or a plain model) on tokenized ``features``, as ``Trainer.evaluate``
    computes them: ``loss`` (the mean cross-entropy over examples for ``seq_cls``, over labelled tokens otherwise)
    and ``num_examples``, with ``perplexity`` (``exp`` of the loss) for ``causal_lm``, or ``accuracy`` and ``f1``
    (binary for two classes, macro otherwise) for classification.

    Example:
        >>> import transformers
        >>> from jaxpeft.data import CausalLMCollator
        >>> from jaxpeft.models import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2,
        ...     vocab_size=10, n_positions=16, bos_token_id=0, eos_token_id=0))
        >>> collator = CausalLMCollator(pad_token_id=0)
        >>> metrics = evaluate_features(model, [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6]}], "causal_lm",
        ...                             collator)
        >>> sorted(metrics), 5 < metrics["perplexity"] < 20  # about uniform over 10 tokens: untrained
        (['loss', 'num_examples', 'perplexity'], True)
    """
    from jaxpeft import evaluation

    if hasattr(model, "peft_config"):
        peft_model = model
    elif is_nnx(model):
        from jaxpeft import nnx as peft_nnx

        peft_model = peft_nnx.PeftModel(model, ((), {}))
    else:
        peft_model = jaxpeft.PeftModel(model, None)
    if task != "causal_lm" and _num_labels(peft_model.base_model) == 1:
        raise UsageError("eval reports classification metrics; this model has one output (regression)")
    names = ("loss", "perplexity") if task == "causal_lm" else ("loss", "accuracy", "f1")
    # evaluate() logs to output_dir/metrics.jsonl: a scratch folder, so that a run's own log stays as training left it
    with tempfile.TemporaryDirectory() as scratch:
        args = trainer.TrainingArguments(scratch, per_device_eval_batch_size=min(batch_size, len(features)),
                                         disable_tqdm=True)
        evaluator = trainer.Trainer(peft_model, args, data_collator=collator, task=task, compute_metrics=(
            None if task == "causal_lm" else evaluation.classification_metrics))
        metrics = evaluator.evaluate(list(features))
    return {**{name: metrics[f"eval_{name}"] for name in names}, "num_examples": len(features)}


def run_eval(options: argparse.Namespace) -> int:
    """``jaxpeft eval``: print (and with ``--output`` write) the metrics as JSON."""
    if options.output:
        outputs.check_apart(options.output, {"--run": options.run, "--model": options.model,
                                             "--adapter": options.adapter, "--data": options.data})
    examples = data.load_dataset_file(_check_file(options.data, "--data"))
    run = read_run(options.run) if options.run else {}
    for key, value in run.get("columns", {}).items():  # the run's columns unless others are given
        if getattr(options, f"{key}_column", None) is None:
            setattr(options, f"{key}_column", value)
    task = options.task or run.get("task") or (_adapter_task(options.adapter) if options.adapter else None)
    if task is not None:
        _check_columns(examples, options, task_name(task), "--data")  # before the model loads
    loaded = _load_adapted(options, needs_adapter=False)
    tokenizer = load_tokenizer(loaded.tokenizer_source)
    label2id = (None if loaded.task == "causal_lm"
                else _string_label_ids(examples, options, loaded.task, loaded.run, model_config(loaded.base)))
    config = loaded.model.peft_config.get(loaded.model.active_adapter) if hasattr(loaded.model, "peft_config") else None
    virtual_tokens = _input_virtual_tokens(config)
    max_length = _max_length(options.max_length or loaded.run.get("max_length"), loaded.base, tokenizer, virtual_tokens)
    features = _tokenize(examples, tokenizer, options, loaded.task, max_length, label2id, loaded.base)
    collator = _collator(loaded.task, tokenizer, loaded.base, max_length)
    metrics = evaluate_features(loaded.model, features, loaded.task, collator, options.batch_size)
    if options.output:
        outputs.write_json(options.output, metrics)
    print(outputs.json_line(dict(sorted(metrics.items()))))
    return 0


# ------------------------------------------------------------------------------------------- generate


def run_generate(options: argparse.Namespace) -> int:
    """``jaxpeft generate``: print each prompt followed by its continuation."""
    import numpy as np

    loaded = _load_adapted(options, needs_adapter=False, task="causal_lm")
    _no_nnx(loaded.base, "generate")
    tokenizer = load_tokenizer(loaded.tokenizer_source)
    ids = [list(tokenizer(prompt)["input_ids"]) for prompt in options.prompt]
    if not all(ids):
        raise UsageError("a --prompt gave no tokens; pass some text")
    length = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = data.pad_sequences(ids, length, pad, side="left")
    attention_mask = data.pad_sequences([[1] * len(row) for row in ids], length, 0, side="left")
    sampling = {"top_k": options.top_k, "top_p": options.top_p} if options.do_sample else {}
    output = loaded.model.generate(input_ids, attention_mask, max_new_tokens=options.max_new_tokens,
                                   do_sample=options.do_sample, temperature=options.temperature, seed=options.seed,
                                   pad_token_id=pad, **sampling)
    eos = loaded.base.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    results = []
    for prompt, prompt_ids, row in zip(options.prompt, ids, np.asarray(output)[:, length:], strict=True):
        new = [int(token) for token in row]
        new = new[:next((i for i, token in enumerate(new) if token in eos), len(new))]
        # As transformers' text-generation pipeline: decode prompt and continuation together (so the tokenizer
        # puts the spaces between them), then cut the decoded prompt off.
        text = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
        decoded_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        completion = (text[len(decoded_prompt):] if text.startswith(decoded_prompt)
                      else tokenizer.decode(new, skip_special_tokens=True))
        results.append({"prompt": prompt, "generated_text": prompt + completion})
    if options.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        print("\n\n".join(result["generated_text"] for result in results))
    return 0


# ---------------------------------------------------------------------------------------------- merge


def _copy_tokenizer(source: str, folder: str, explicit: bool) -> bool:
    """Puts the tokenizer of ``source`` into ``folder``: its files when ``source`` is a folder holding them, else
    a saved copy. Returns whether there was one; a missing tokenizer is an error only when it was asked for."""
    if os.path.isdir(source):
        names = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
        for name in names:
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        if names or not explicit:
            return bool(names)
    try:
        load_tokenizer(source, for_batches=False).save_pretrained(folder)
    except UsageError:
        if explicit:
            raise
        return False
    return True


def run_merge(options: argparse.Namespace) -> int:
    """``jaxpeft merge``: ``merge_and_unload``, then the plain model's ``save_pretrained`` and the tokenizer."""
    run = read_run(options.run) if options.run else {}
    adapter = options.adapter or (os.path.join(options.run, run.get("adapter", ADAPTER_FOLDER)) if options.run
                                  else None)
    inputs = {"--run": options.run, "--model": options.model or run.get("model"), "--adapter": adapter,
              "--tokenizer": options.tokenizer or run.get("tokenizer")}
    outputs.check_apart(options.output, inputs)
    outputs.check_output_folder(options.output, overwrite=options.overwrite)
    if adapter is not None and os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as file:
            config = jaxpeft.config_from_hf_dict(json.load(file))
        if core.method_for(config).merge_layer is None:  # checked before the model loads
            raise UsageError(f"{config.peft_type} adapters cannot be merged into the weights (they are not a change "
                             "of weights); use the adapter folder as it is, e.g. with `jaxpeft generate --adapter`")
    loaded = _load_adapted(options, needs_adapter=True)
    _no_nnx(loaded.base, "merge")
    config = loaded.model.peft_config[loaded.model.active_adapter]
    merged = loaded.model.merge_and_unload()
    found = []

    def write(folder: str) -> None:
        merged.save_pretrained(folder)
        found.append(_copy_tokenizer(loaded.tokenizer_source, folder, explicit=options.tokenizer is not None))

    outputs.write_folder(options.output, write, overwrite=options.overwrite)
    if not found[0]:
        print(f"jaxpeft merge: note: no tokenizer at {loaded.tokenizer_source!r}, so {options.output!r} has none "
              "(pass --tokenizer to add one)", file=sys.stderr)
    print(json.dumps({"merged": options.output, "peft_type": config.peft_type, "task": loaded.task}))
    return 0


# --------------------------------------------------------------------------------------------- export


def run_export(options: argparse.Namespace) -> int:
    """``jaxpeft export``: the adapter of a training checkpoint (Orbax, restored into the state of a freshly built
    PeftModel) written as an HF PEFT folder."""
    from jaxpeft.checkpoints import CheckpointManager

    if options.best and options.step is not None:
        raise UsageError("pass --step N or --best, not both")
    run = read_run(options.run)
    outputs.check_apart(options.output, {"--run": options.run})
    outputs.check_output_folder(options.output, overwrite=options.overwrite)
    checkpoints = os.path.join(options.run, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(name.isdigit() for name in os.listdir(checkpoints)):
        raise UsageError(f"--run {options.run!r} has no checkpoints (was it trained with --save-strategy no?); its "
                         f"final adapter is in {os.path.join(options.run, run.get('adapter', ADAPTER_FOLDER))}")
    known = {field.name for field in dataclasses.fields(trainer.TrainingArguments)}
    recorded = {key: value for key, value in run.get("training_arguments", {}).items() if key in known}
    args = trainer.TrainingArguments(**{**recorded, "output_dir": options.run})
    if options.best and args.metric_for_best_model is None:
        raise UsageError("the run's checkpoints are not ranked (it was trained without --metric-for-best-model); "
                         "pass --step N")
    task = run["task"]
    overrides: dict[str, Any] = {}
    if run.get("id2label"):
        overrides["id2label"] = {int(i): label for i, label in run["id2label"].items()}
    elif run.get("num_labels"):
        overrides["num_labels"] = run["num_labels"]
    overrides.update(_recorded_quantization(run))
    peft_model = _peft_model(load_model(run["model"], task, quiet=True, **overrides),
                             jaxpeft.config_from_hf_dict(run["peft_config"]), args.seed)
    if is_nnx(peft_model):
        peft_model = peft_model.functional(task)
    with CheckpointManager(checkpoints, best_metric=args.metric_for_best_model,
                           greater_is_better=bool(args.greater_is_better), read_only=True) as manager:
        step = options.step
        if options.best:
            step = manager.best_step()
            if step is None:
                raise UsageError(f"no checkpoint of the run has {args.metric_for_best_model} (steps: "
                                 f"{manager.all_steps()}); pass --step N")
        # Only the state's structure matters here (the values are restored): the run's optimizer gives it.
        optimizer, _ = trainer.Trainer(peft_model, args, task=task).create_optimizer(total_steps=max(args.max_steps, 2))
        mask = peft_model.trainable_mask
        like = training.init_train_state(peft_model.params, mask, optimizer, seed=args.seed)
        restored = manager.restore(like, step)
    peft_model.params = training.full_params(restored.state, jaxpeft.partition(peft_model.params, mask)[1])
    training.keep_trained_config(peft_model, restored.state.opt_state)  # e.g. AdaLoRA's rank_pattern

    def write(folder: str) -> None:
        peft_model.save_pretrained(folder)
        _copy_tokenizer(run.get("tokenizer") or run["model"], folder, explicit=False)

    outputs.write_folder(options.output, write, overwrite=options.overwrite)
    print(outputs.json_line({"exported": options.output, "metrics": restored.metrics, "step": restored.step}))
    return 0


# ---------------------------------------------------------------------------------------------------- main


def _one_line(error: BaseException) -> str:
    """The error as one line: jaxpeft's own messages as they are, anything else with its type in front."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename!r}"
    else:
        text = " ".join(str(error).split())
    if not isinstance(error, (ValueError, OSError, trainer.TrainingStopped)) or isinstance(error, UnicodeError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
        text += " (run with --debug for the traceback)"
    if len(text) > 600:
        text = text[:597] + "..."
    return text or type(error).__name__


@contextlib.contextmanager
def _command_logs(command: str, debug: bool):
    """jaxpeft's warnings as ``jaxpeft <command>: ...`` lines on stderr; without ``--debug``, the libraries' own log
    records (Orbax's background-thread tracebacks among them) are not printed: the command's one-line error says
    what went wrong."""
    libraries = [logging.getLogger(name) for name in ("absl", "orbax", "jax._src.xla_bridge")]
    levels = [logger.level for logger in libraries]
    if not debug:
        for logger in libraries:
            logger.setLevel(logging.CRITICAL)
    ours = logging.getLogger("jaxpeft")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"jaxpeft {command}: %(message)s"))
    handler.setLevel(logging.WARNING)
    ours.addHandler(handler)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        for logger, level in zip(libraries, levels, strict=True):
            logger.setLevel(level)


def _unknown_arguments(unknown: list[str], command: _Command) -> str:
    """argparse's message for unknown arguments, with the closest flag for a misspelt one."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    flags = ["--" + dest.replace("_", "-") for dest in command.kinds]
    for argument in unknown:
        close = difflib.get_close_matches(argument.split("=")[0], flags, n=1, cutoff=0.6)
        if argument.startswith("--") and close:
            return f"{message} (did you mean {close[0]}?)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxpeft <command> ...`` and returns the exit status: 0, or 2 for bad options, files or data (after
    a one-line ``jaxpeft <command>: error: ...`` on stderr).

    Example:
        >>> main(["train", "--config", "no-such-config.yaml"])
        2
    """
    parser, commands = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(argv)
        command = commands[namespace.command]
        if unknown:
            command.parser.error(_unknown_arguments(unknown, command))
    except SystemExit as exit_:  # --help, --version and argparse's own errors
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    debug = bool(getattr(namespace, "debug", False))
    with _command_logs(command.name, debug):
        try:
            return command.run(command.options(namespace))
        except KeyboardInterrupt:
            print(f"jaxpeft {command.name}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - every error is one line; --debug shows the traceback
            if debug:
                traceback.print_exc()
            print(f"jaxpeft {command.name}: error: {_one_line(error)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
