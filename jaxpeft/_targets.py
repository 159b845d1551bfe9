"""Which modules a config targets, with Hugging Face PEFT's matching rules on dotted module paths."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

Patterns = str | Sequence[str] | None


def matches(name: str, patterns: Patterns) -> bool:
    """HF PEFT's rule: a string is a full-match regex; a list entry matches the whole name or a dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: Patterns = None) -> int | None:
    """The index of the first numbered path segment (after one of ``layers_pattern`` if given)."""
    if not layers_pattern:
        found = re.match(r"(?:^|.*?\.)[^.]*\.(\d+)(?:\.|$)", name)
        return int(found.group(1)) if found else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def layer_indices_of(names: Sequence[str], layers_pattern: Patterns = None) -> list[int]:
    """The layer indices (as ``layer_index`` reads them) that occur among module paths ``names``, ascending."""
    return sorted({index for index in (layer_index(name, layers_pattern) for name in names) if index is not None})


def in_layers(name: str, layers_to_transform: int | Sequence[int] | None, layers_pattern: Patterns = None) -> bool:
    """Whether the module belongs to one of ``layers_to_transform`` (always true when that is None)."""
    if layers_to_transform is None:
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def pattern_value(name: str, pattern: dict[str, Any], default: Any) -> Any:
    """The value of the first ``rank_pattern``/``alpha_pattern`` key matching ``(.*\\.)?(key)$``, else default."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def matches_saved(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """HF PEFT's rule for ``modules_to_save``: the dotted path ends with one of the names (``"classifier"`` also
    selects DistilBERT's ``pre_classifier``)."""
    return bool(modules_to_save) and any(name.endswith(m) for m in modules_to_save)


def is_saved_module(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """Whether the module is, or lies inside, one of ``modules_to_save`` (matched as ``matches_saved`` does)."""
    return bool(modules_to_save) and any(re.match(rf".*{re.escape(m)}($|\..*)", name) for m in modules_to_save)
