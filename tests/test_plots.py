"""The training-curves figure: a titled panel per quantity with y labels, one shared step axis, baseline lines."""

import doctest

import pytest

from jaxpeft import plots, trainer

LOG = ([{"step": step, "loss": 1.0 / step, "learning_rate": 1e-3} for step in range(10, 101, 10)]
       + [{"step": step, "eval_loss": 0.5, "eval_accuracy": 0.7 + step / 1000, "eval_f1": 0.6, "eval_runtime": 2.0,
           "eval_samples_per_second": 100.0} for step in (50, 100)])


def test_docstring_examples():
    result = doctest.testmod(plots)
    assert result.attempted > 0 and result.failed == 0


def test_panels_have_titles_y_labels_and_one_step_axis():
    figure = plots.training_curves_figure(LOG, title="LoRA on MiniLM")
    assert figure.get_suptitle() == "LoRA on MiniLM"
    axes = figure.axes
    assert [(axis.get_title(), axis.get_ylabel(), axis.get_xlabel()) for axis in axes] == [
        ("loss", "loss", "step"), ("evaluation accuracy", "accuracy", "step"), ("evaluation f1", "f1", "step")]
    assert all(axes[0].get_shared_x_axes().joined(axes[0], axis) for axis in axes[1:])
    loss_lines = {line.get_label(): line.get_xdata().tolist() for line in axes[0].get_lines()}
    assert loss_lines == {"training": list(range(10, 101, 10)), "evaluation": [50, 100]}  # both losses in one panel


def test_a_baseline_is_a_labelled_dashed_line_in_its_panel():
    figure = plots.training_curves_figure(LOG, baselines={"eval_accuracy": {"frozen-encoder probe": 0.78},
                                                          "eval_f1": 0.5})
    accuracy_axis, f1_axis = figure.axes[1], figure.axes[2]
    (probe,) = [line for line in accuracy_axis.get_lines() if line.get_linestyle() == "--"]
    assert probe.get_label() == "frozen-encoder probe (0.78)" and set(probe.get_ydata()) == {0.78}
    legend = [text.get_text() for text in accuracy_axis.get_legend().get_texts()]
    assert legend == ["evaluation", "frozen-encoder probe (0.78)"]
    assert [line.get_label() for line in f1_axis.get_lines()] == ["evaluation", "baseline (0.5)"]
    assert not [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]


def test_trainer_plot_history_writes_the_png(tmp_path):
    path = trainer.plot_history(LOG, tmp_path / "curves.png", baselines={"eval_accuracy": 0.78})
    assert path == tmp_path / "curves.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert trainer.plot_history([{"step": 1, "epoch": 0.5}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("log, titles", [
    ([{"step": 5, "loss": 2.0}], ["loss"]),
    ([{"step": 5, "eval_perplexity": 20.0, "eval_loss": 3.0}], ["loss", "evaluation perplexity"]),
])
def test_only_what_the_log_has(log, titles):
    assert [axis.get_title() for axis in plots.training_curves_figure(log).axes] == titles
