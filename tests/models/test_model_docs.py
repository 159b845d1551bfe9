"""The docstring examples of jaxpeft.models run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "jaxpeft.models",
    "jaxpeft.models.activations",
    "jaxpeft.models.attention",
    "jaxpeft.models.auto",
    "jaxpeft.models.gemma",
    "jaxpeft.models.generation",
    "jaxpeft.models.gguf",
    "jaxpeft.models.gpt2",
    "jaxpeft.models.heads",
    "jaxpeft.models.hub",
    "jaxpeft.models.llama",
    "jaxpeft.models.moe",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
