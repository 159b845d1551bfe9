"""The examples in the docstrings and in README.md run and print what they claim."""

import doctest
import importlib
import pathlib
import re

import pytest

MODULES = ["jaxpeft.core", "jaxpeft.tree", "jaxpeft.methods.lora", "jaxpeft.peft_model",
           "jaxpeft.methods.prefix_tuning", "jaxpeft.methods.prompt_tuning",
           "jaxpeft.methods.bottleneck", "jaxpeft.hf_format", "jaxpeft.config", "jaxpeft.data",
           "jaxpeft.training", "jaxpeft.trainer",
           "jaxpeft.pipelines", "jaxpeft.evaluation", "jaxpeft.checkpoints", "jaxpeft.cli", "jaxpeft.assets",
           "jaxpeft.demo", "jaxpeft.sharding", "jaxpeft.outputs", "jaxpeft.progress", "jaxpeft.plots",
           "jaxpeft._contractions", "jaxpeft.nnx._graph", "jaxpeft.nnx._model", "jaxpeft.quantization",
           "jaxpeft.method", "jaxpeft.optimizers"]
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)

