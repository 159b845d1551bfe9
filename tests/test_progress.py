"""Training progress: a tqdm bar on a terminal, plain lines with step, elapsed time and loss anywhere else."""

import doctest
import io

from tqdm import tqdm

from jaxpeft import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_docstring_examples():
    result = doctest.testmod(progress)
    assert result.attempted > 0 and result.failed == 0


def test_lines_every_tenth_of_the_run_with_the_latest_values():
    log, clock = io.StringIO(), Clock()
    bar = progress.training_progress(200, stream=log, clock=clock)
    for step in range(1, 201):
        clock.now = step * 0.1  # 20 s in all: the step rule, not the time rule, writes
        bar.set_postfix(loss=f"{1 / step:.4f}", lr="1.00e-03")
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "training: step 20/200 (10%), 2 s elapsed, 18 s left, loss=0.0500, lr=1.00e-03"
    assert lines[-1] == "training: step 200/200 (100%), 20 s elapsed, loss=0.0050, lr=1.00e-03"


def test_a_line_every_30_seconds_on_a_slow_run_and_one_at_the_end():
    log, clock = io.StringIO(), Clock()
    bar = progress.training_progress(1000, initial=100, stream=log, clock=clock)  # resumed at step 100
    for step in range(101, 131):
        clock.now = (step - 100) * 4.0  # 4 s a step
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "training: step 108/1000 (11%)", "training: step 116/1000 (12%)", "training: step 124/1000 (12%)",
        "training: step 130/1000 (13%)"]
    assert "32 s elapsed, 59 min 28 s left" in lines[0]  # 4 s a step for the 892 steps left


def test_a_terminal_gets_the_bar_and_disable_gets_nothing():
    terminal = Terminal()
    bar = progress.training_progress(10, stream=terminal)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in terminal.getvalue()
    log = io.StringIO()
    quiet = progress.training_progress(10, stream=log, disable=True)
    quiet.update(10)
    quiet.close()
    assert log.getvalue() == ""
