"""The notebooks run from top to bottom in a Jupyter kernel and show what they promise.

Each runs with ``JAXPEFT_NOTEBOOK_QUICK=1`` (a few training steps on a few examples) in a temporary folder, on an
ipykernel of this interpreter. The checks read the executed notebook's outputs: the numbers it prints parse and are
in range and agree with each other, the plot cells draw a PNG, a saved and reloaded adapter gives the same logits.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re

import nbclient
import nbformat
import pytest
from conftest import CPU_COMPILE_FLAG
from ipykernel import kernelspec
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBER = r"([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_IMAGE = ("the {} cell drew no image; plt.show() shows nothing when something (e.g. matplotlib.use('Agg')) has "
            "switched the kernel away from its inline backend")
CELL_TIMEOUT_S = 600
# Notebooks that train a real model run long enough for XLA's full optimisations and default emitters (slower to
# compile, faster to run; the test session turns both off, conftest.py) to pay off: 57 s against 63-71 s here.
RUN_TIME_BOUND = {"causal_lm_tuning.ipynb"}


def kernel_manager(folder: pathlib.Path) -> KernelManager:
    """A manager for an ipykernel of this very interpreter, whatever other ``python3`` kernels are installed."""
    name = "jaxpeft-test-python"
    kernelspec.write_kernel_spec(folder / name)  # argv: sys.executable -m ipykernel_launcher
    return KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def execute(path: pathlib.Path, workdir: pathlib.Path, kernels: pathlib.Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, km=kernel_manager(kernels), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


def stdout(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stdout")


def all_stdout(notebook) -> str:
    return "".join(stdout(cell) for cell in notebook.cells if cell.cell_type == "code")


def numbers_in_line(text: str, template: str) -> list[float]:
    """The numbers at the ``{}`` of the one printed line that reads as ``template``."""
    pattern = "^" + NUMBER.join(re.escape(part) for part in template.split("{}")) + "$"
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one line like {template!r}, found {len(found)} in:\n{text}"
    return [float(value) for value in (found[0] if isinstance(found[0], tuple) else (found[0],))]


def png_outputs(notebook) -> list[bytes]:
    images = [o["data"]["image/png"] for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    return [base64.b64decode(image) for image in images]


def check_trainable_line(text: str) -> None:
    found = re.findall(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: " + NUMBER, text)
    assert found, f"no 'trainable params' line in:\n{text}"
    for trainable, total, percent in found:
        trainable, total = int(trainable.replace(",", "")), int(total.replace(",", ""))
        assert 0 < trainable < total
        assert float(percent) == pytest.approx(100 * trainable / total, abs=1e-4)


def check_lora_quickstart(notebook, workdir: pathlib.Path) -> None:
    check_trainable_line(all_stdout(notebook))  # its own asserts (merge == adapted, disabled == base) ran


def check_sequence_classification(notebook, workdir: pathlib.Path) -> None:
    text = all_stdout(notebook)
    check_trainable_line(text)
    baseline_accuracy, baseline_f1 = numbers_in_line(text, "baseline accuracy: {}  F1: {}")
    accuracy, f1 = numbers_in_line(text, "accuracy: {}  F1: {}")
    assert all(0.0 <= value <= 1.0 for value in (baseline_accuracy, baseline_f1, accuracy, f1)), text
    # Trainer.evaluate's metrics and evaluation.accuracy / f1_score of Trainer.predict's logits: two paths.
    positive_share, predict_accuracy, predict_f1 = numbers_in_line(
        text, "predicted positive: {} of the sentences; accuracy {}, F1 {}")
    assert 0.0 <= positive_share <= 1.0
    assert predict_accuracy == pytest.approx(accuracy, abs=1e-4) and predict_f1 == pytest.approx(f1, abs=1e-4)
    steps, _, loss = numbers_in_line(text, "trained {} steps in {} s, mean training loss {}")
    assert steps == 2 and 0.0 < loss < 5.0  # 32 examples, batches of 16, one epoch; ln 2 = 0.69 at chance
    predictions = re.findall(r"^\s*(negative|positive) \(" + NUMBER + r"\)  ", text, flags=re.MULTILINE)
    assert len(predictions) == 2 and all(0.5 <= float(score) <= 1.0 for _, score in predictions), text
    (difference,) = numbers_in_line(text, "largest logit difference after reloading: {}")
    assert difference < 1e-5
    output = workdir / "minilm-sentiment-lora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (output / "adapter").iterdir()}
    assert (output / "metrics.jsonl").stat().st_size > 0
    images = png_outputs(notebook)
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC), NO_IMAGE.format("training-curves")


def check_causal_lm(notebook, workdir: pathlib.Path) -> None:
    text = all_stdout(notebook)
    check_trainable_line(text)
    before = re.findall(r"^perplexity before training: " + NUMBER + "$", text, flags=re.MULTILINE)
    assert len(before) == 2 and before[0] == before[1], text  # printed before training and again beside after
    before = float(before[0])
    (after,) = numbers_in_line(text, "perplexity after training: {}")
    # A pretrained model on English news is far below the 49,152 of a uniform guess (the base model scores about
    # 100 on the first 32 tokens of the two articles, headline included).
    assert 1.0 < before < 1000.0 and 1.0 < after < 1000.0, text
    assert after != before, "training did not change the model"
    steps, _, loss = numbers_in_line(text, "trained {} steps in {} s, mean training loss {}")
    assert steps == 2 and 0.0 < loss < 10.0  # MAX_STEPS in quick mode
    samples = re.search(r"^before training:\n(.*)\n\nafter training:\n(.*)", text, flags=re.DOTALL | re.MULTILINE)
    assert samples and samples.group(1).strip() and samples.group(2).strip(), text
    assert (workdir / "smollm2-bbc-lora" / "metrics.jsonl").stat().st_size > 0
    images = png_outputs(notebook)
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC), NO_IMAGE.format("loss-curve")


CHECKS = {
    "lora_quickstart.ipynb": check_lora_quickstart,
    "sequence_classification_lora.ipynb": check_sequence_classification,
    "causal_lm_tuning.ipynb": check_causal_lm,
}


def test_every_notebook_is_checked_and_stored_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        assert path.name in CHECKS, f"notebooks/{path.name} has no check in tests/test_notebooks.py; add one"
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_and_shows_its_results(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPEFT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not os.environ.get("JAXPEFT_ASSETS") and (ROOT / ".assets").is_dir():
        monkeypatch.setenv("JAXPEFT_ASSETS", str(ROOT / ".assets"))
    if path.name in RUN_TIME_BOUND:
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(CPU_COMPILE_FLAG, "").strip())
        monkeypatch.delenv("JAX_DISABLE_MOST_OPTIMIZATIONS", raising=False)
    workdir, kernels = tmp_path / "run", tmp_path / "kernels"
    workdir.mkdir()
    notebook = execute(path, workdir, kernels)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    assert not [o for cell in code_cells for o in cell.outputs if o["output_type"] == "error"]
    CHECKS[path.name](notebook, workdir)
