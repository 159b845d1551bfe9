"""The training-curves figure the Trainer writes (``output_dir/training_curves.png``).

One panel per quantity, side by side with a shared step axis: the loss (training, and evaluation when there is
one), then each other evaluation metric (``eval_accuracy``, ``eval_f1``, ``eval_perplexity``, ...). ``baselines``
draws reference values as dashed horizontal lines, e.g. the accuracy of a frozen-encoder probe::

    plot_history(trainer.log_history, "curves.png", baselines={"eval_accuracy": {"frozen-encoder probe": 0.78}})
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

EVAL_PREFIX = "eval_"
BASELINE_STYLE = {"linestyle": "--", "linewidth": 1.2, "color": "0.35"}
# Evaluation timings are not curves worth a panel.
NOT_PLOTTED = ("runtime", "per_second")


def eval_metric_names(log_history: Sequence[Mapping]) -> list[str]:
    """The evaluation metrics in the log that get a curve: float ``eval_*`` values other than timings.

    Example:
        >>> eval_metric_names([{"step": 5, "eval_loss": 0.5, "eval_accuracy": 0.8, "eval_runtime": 1.2}])
        ['eval_accuracy', 'eval_loss']
    """
    return sorted({key for record in log_history for key, value in record.items()
                   if key.startswith(EVAL_PREFIX) and isinstance(value, float) and not key.endswith(NOT_PLOTTED)})


def _points(log_history: Sequence[Mapping], key: str) -> list[tuple[int, float]]:
    return [(record["step"], record[key]) for record in log_history if key in record and "step" in record]


def panels(log_history: Sequence[Mapping]) -> list[dict[str, Any]]:
    """The figure's panels: ``{"title", "ylabel", "keys", "series": [(label, points)]}`` where ``keys`` are the
    log keys shown (a baseline for one of them is drawn there).

    Example:
        >>> log = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.7, "eval_loss": 0.8, "eval_accuracy": 0.6}]
        >>> [(panel["title"], panel["ylabel"], [label for label, _ in panel["series"]]) for panel in panels(log)]
        [('loss', 'loss', ['training', 'evaluation']), ('evaluation accuracy', 'accuracy', ['evaluation'])]
    """
    result = []
    loss_series = [(label, _points(log_history, key)) for label, key in (("training", "loss"),
                                                                          ("evaluation", "eval_loss"))]
    loss_series = [(label, points) for label, points in loss_series if points]
    if loss_series:
        result.append({"title": "loss", "ylabel": "loss", "keys": ("loss", "eval_loss"), "series": loss_series})
    for key in eval_metric_names(log_history):
        if key != "eval_loss":
            metric = key[len(EVAL_PREFIX):]
            result.append({"title": f"evaluation {metric}", "ylabel": metric, "keys": (key,),
                           "series": [("evaluation", _points(log_history, key))]})
    return result


def _baseline_lines(baselines: Mapping[str, Any] | None, keys: Sequence[str]) -> list[tuple[str, float]]:
    """``(label, value)`` of the baselines drawn in a panel showing ``keys``; a bare number is labelled
    ``baseline``."""
    lines = []
    for key in keys:
        value = (baselines or {}).get(key)
        if isinstance(value, Mapping):
            lines += [(str(label), float(number)) for label, number in value.items()]
        elif value is not None:
            lines.append(("baseline", float(value)))
    return lines


def _draw_panel(axis: Any, panel: Mapping[str, Any], baselines: list[tuple[str, float]]) -> None:
    for label, points in panel["series"]:
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
    for label, value in baselines:
        axis.axhline(value, label=f"{label} ({value:.4g})", **BASELINE_STYLE)
    axis.set_title(panel["title"])
    axis.set_xlabel("step")
    axis.set_ylabel(panel["ylabel"])
    axis.grid(alpha=0.3)
    if len(panel["series"]) + len(baselines) > 1:
        axis.legend(fontsize="small")


def training_curves_figure(log_history: Sequence[Mapping], *, baselines: Mapping[str, Any] | None = None,
                           title: str = "Training curves") -> Any:
    """The matplotlib ``Figure`` that ``plot_history`` saves (None: the log has nothing to plot).

    Example:
        >>> figure = training_curves_figure([{"step": 10, "loss": 0.7}, {"step": 10, "eval_accuracy": 0.8}],
        ...                                 baselines={"eval_accuracy": 0.75}, title="run 1")
        >>> [(axis.get_title(), axis.get_ylabel()) for axis in figure.axes], figure.get_suptitle()
        ([('loss', 'loss'), ('evaluation accuracy', 'accuracy')], 'run 1')
    """
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (e.g. a notebook's inline one) stays
    from matplotlib.ticker import MaxNLocator

    shown = panels(log_history)
    if not shown:
        return None
    figure = Figure(figsize=(4.6 * len(shown), 3.9), layout="constrained")
    axes = figure.subplots(1, len(shown), squeeze=False, sharex=True)[0]
    for axis, panel in zip(axes, shown, strict=True):
        _draw_panel(axis, panel, _baseline_lines(baselines, panel["keys"]))
    axes[0].set_xlim(left=0)  # shared by all panels, as is the locator of whole steps
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    return figure


def plot_history(log_history: Sequence[Mapping], path: str | os.PathLike, *,
                 baselines: Mapping[str, Any] | None = None, title: str = "Training curves") -> pathlib.Path | None:
    """Writes a PNG of the loss and each evaluation metric against the step; returns its path (None: the log has
    nothing to plot).

    ``baselines`` maps a log key (``"eval_accuracy"``, ``"loss"``) to a reference value, or to ``{label: value}``,
    drawn as a dashed horizontal line in that key's panel.

    Example:
        >>> import tempfile
        >>> log = [{"step": 10, "loss": 0.69}, {"step": 20, "loss": 0.41, "eval_accuracy": 0.84}]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     png = plot_history(log, pathlib.Path(folder) / "curves.png",
        ...                        baselines={"eval_accuracy": {"frozen-encoder probe": 0.78}})
        ...     png.read_bytes()[:4]
        b'\\x89PNG'
    """
    figure = training_curves_figure(log_history, baselines=baselines, title=title)
    if figure is None:
        return None
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return path
