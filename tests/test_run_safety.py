"""A user's files are never lost and never mixed: one writer per run folder, readers that change nothing, overwrite
limited to what jaxpeft wrote, outputs apart from inputs, only finite checkpoints, resume past a damaged checkpoint,
and one-line errors for every failure (each case checks that the files already there are byte-identical after)."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from test_cli import run_cli

from jaxpeft import cli, outputs, trainer
from jaxpeft.checkpoints import TMP_SUFFIX

REPO = pathlib.Path(__file__).resolve().parent.parent


def snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(root.rglob("*"))}


def train_argv(assets, output: pathlib.Path, *extra) -> list[str]:
    return ["train", "--model", str(assets / "bert"), "--task", "seq_cls", "--method", "lora", "--r", "2",
            "--train-file", str(assets / "reviews.jsonl"), "--text-column", "review", "--label-column", "sentiment",
            "--batch-size", "4", "--learning-rate", "0.05", "--no-progress", "--output-dir", str(output),
            *map(str, extra)]


def start_cli(*argv) -> subprocess.Popen:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxpeft", *map(str, argv)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def adapter_tensors(run: pathlib.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(run / "adapter" / "adapter_model.safetensors")


def losses(run: pathlib.Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"], record["grad_norm"]) for record in records if "grad_norm" in record]


def assert_same_run(run: pathlib.Path, reference: pathlib.Path) -> None:
    assert losses(run) == losses(reference)
    expected = adapter_tensors(reference)
    got = adapter_tensors(run)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].tobytes() == value.tobytes(), name


def one_line_error(status: int, out: str, err: str, command: str, *words: str, alone: bool = True) -> None:
    """The command failed with exit status 2 and one error line holding ``words``; ``alone``: nothing else was
    printed (a run that got as far as training has printed its trainable parameters first)."""
    assert status == 2 and out == "", (status, out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"jaxpeft {command}: error: ") and "Traceback" not in err, err
    assert len(lines) == 1 or not alone, err
    for word in words:
        assert word in lines[-1], err


EVERY_STEP = ("--max-steps", 3, "--save-steps", 1, "--logging-steps", 1)


@pytest.fixture(scope="module")
def every_step_run(assets, tmp_path_factory):
    """An uninterrupted run of three steps with a checkpoint and a log line at each: what a resumed run must equal."""
    output = tmp_path_factory.mktemp("every_step") / "run"
    assert cli.main(train_argv(assets, output, *EVERY_STEP)) == 0
    return output


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """A run with checkpoints 1-3 and an evaluation at every step."""
    output = tmp_path_factory.mktemp("finished") / "run"
    status = cli.main(train_argv(assets, output, "--max-steps", 3, "--save-steps", 1, "--eval-file",
                                 assets / "reviews.jsonl", "--eval-steps", 1))
    assert status == 0
    return output


# ----- one writer per run folder; readers change nothing


def test_a_second_training_into_the_same_folder_is_refused_and_the_first_runs_as_if_alone(assets, tmp_path,
                                                                                          capsys):
    run, solo = tmp_path / "run", tmp_path / "solo"
    first = start_cli(*train_argv(assets, run, "--max-steps", 6, "--save-steps", 2))
    lock = run / outputs.LOCK_NAME
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, "the first run's lock")

    status, out, err = run_cli(capsys, *train_argv(assets, run, "--max-steps", 6, "--save-steps", 2))
    one_line_error(status, out, err, "train", f"is being written by another jaxpeft process (pid {first.pid})")
    status, out, err = run_cli(capsys, *train_argv(assets, run, "--max-steps", 6, "--resume"))
    one_line_error(status, out, err, "train", f"(pid {first.pid})")

    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert run_cli(capsys, *train_argv(assets, solo, "--max-steps", 6, "--save-steps", 2))[0] == 0
    assert_same_run(run, solo)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]


def test_export_while_training_changes_nothing_and_the_training_finishes(assets, tmp_path, capsys):
    run = tmp_path / "run"
    training = start_cli(*train_argv(assets, run, "--max-steps", 30, "--save-steps", 1))
    wait_for(lambda: (run / "checkpoints" / "1").is_dir(), training, "the first checkpoint")
    overlapping = 0
    while training.poll() is None:
        status, out, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / f"export{overlapping}")
        assert status == 0, err
        overlapping += training.poll() is None
    assert training.returncode == 0, training.stderr.read()[-3000:]
    assert overlapping >= 1  # an export opened the checkpoints and finished while the run was saving
    assert sorted(map(int, os.listdir(run / "checkpoints"))) == list(range(1, 31))  # none removed or left half
    status, out, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "last")
    assert status == 0 and json.loads(out)["step"] == 30, err
    last = safetensors.numpy.load_file(tmp_path / "last" / "adapter_model.safetensors")
    assert {name: value.tobytes() for name, value in last.items()} == {
        name: value.tobytes() for name, value in adapter_tensors(run).items()}


def test_readers_leave_the_temporary_folder_of_a_save_in_progress(finished_run, assets, tmp_path,
                                                                   capsys):
    in_progress = finished_run / "checkpoints" / f"4{TMP_SUFFIX}"
    (in_progress / "state").mkdir(parents=True)
    (in_progress / "state" / "part").write_bytes(b"being written")
    before = snapshot(finished_run)
    try:
        assert run_cli(capsys, "export", "--run", finished_run, "--step", 2, "--output", tmp_path / "e")[0] == 0
        status, out, err = run_cli(capsys, "eval", "--run", finished_run, "--data", assets / "reviews.jsonl")
        assert status == 0 and err == ""  # the adapter brings the trained head: no "newly initialized" warning
        assert run_cli(capsys, "merge", "--run", finished_run, "--output", tmp_path / "m")[0] == 0
        assert snapshot(finished_run) == before
    finally:
        outputs._remove(in_progress)


# ----- earlier runs, overwrite, outputs apart from inputs


def test_a_finished_run_is_never_replaced_silently_and_overwrite_removes_only_jaxpeft_files(assets, tmp_path,
                                                                                            capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_argv(assets, run, "--max-steps", 1, "--save-strategy", "no"))[0] == 0
    (run / "notes.txt").write_text("my notes")
    (run / "mine").mkdir()
    (run / "mine" / "data.csv").write_text("a,b\n")
    before = snapshot(run)
    status, out, err = run_cli(capsys, *train_argv(assets, run, "--max-steps", 2))
    one_line_error(status, out, err, "train", "holds the outputs of an earlier run (adapter, jaxpeft_run.json, "
                   "metrics.jsonl, training_curves.png)", "--resume", "--overwrite")
    assert snapshot(run) == before

    status, out, err = run_cli(capsys, *train_argv(assets, run, "--max-steps", 2, "--overwrite"))
    assert status == 0, err
    assert json.loads(out)["global_step"] == 2
    assert (run / "notes.txt").read_text() == "my notes" and (run / "mine" / "data.csv").read_text() == "a,b\n"
    assert outputs.written(run) == ["adapter", "checkpoints", "jaxpeft_run.json", "metrics.jsonl",
                                    "training_curves.png"]


@pytest.mark.parametrize("command, where", [
    ("merge-into-run", "is --run"), ("merge-inside-run", "lies inside --run"), ("merge-into-model", "is --model"),
    ("merge-around-model", "holds --model"), ("train-into-model", "is --model"),
    ("export-into-adapter", "lies inside --run"), ("eval-into-run", "lies inside --run"),
])
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(finished_run, assets, capsys, command,
                                                                    where):
    argv = {
        "merge-into-run": ["merge", "--run", finished_run, "--output", finished_run, "--overwrite"],
        "merge-inside-run": ["merge", "--run", finished_run, "--output", finished_run / "merged"],
        "merge-into-model": ["merge", "--run", finished_run, "--output", assets / "bert", "--overwrite"],
        "merge-around-model": ["merge", "--run", finished_run, "--output", assets, "--overwrite"],
        "train-into-model": train_argv(assets, assets / "bert", "--max-steps", 1, "--overwrite"),
        "export-into-adapter": ["export", "--run", finished_run, "--output", finished_run / "adapter", "--overwrite"],
        "eval-into-run": ["eval", "--run", finished_run, "--data", assets / "reviews.jsonl", "--output",
                          finished_run / "metrics.jsonl"],
    }[command]
    before_run, before_assets = snapshot(finished_run), snapshot(assets / "bert")
    status, out, err = run_cli(capsys, *argv)
    one_line_error(status, out, err, argv[0], where, "choose an output folder apart from the inputs")
    assert snapshot(finished_run) == before_run and snapshot(assets / "bert") == before_assets


def test_merge_overwrite_replaces_its_own_files_only(finished_run, tmp_path, capsys):
    output = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--run", finished_run, "--output", output)[0] == 0
    (output / "README.md").write_text("my model card")
    assert run_cli(capsys, "merge", "--run", finished_run, "--output", output, "--overwrite")[0] == 0
    assert (output / "README.md").read_text() == "my model card"
    assert "model.safetensors" in outputs.written(output)

    stranger = tmp_path / "someone-elses-model"
    stranger.mkdir()
    (stranger / "config.json").write_text("{}")
    before = snapshot(stranger)
    status, out, err = run_cli(capsys, "merge", "--run", finished_run, "--output", stranger, "--overwrite")
    one_line_error(status, out, err, "merge", "holds config.json, which jaxpeft did not write")
    assert snapshot(stranger) == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder left behind


def test_written_files_and_folders_follow_the_umask(finished_run, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert run_cli(capsys, "export", "--run", finished_run, "--step", 1, "--output", tmp_path / "exported")[0] == 0
        assert run_cli(capsys, "merge", "--run", finished_run, "--output", tmp_path / "merged")[0] == 0
    finally:
        os.umask(previous)
    for root in (tmp_path / "exported", tmp_path / "merged"):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


# ----- finite checkpoints, resuming past damage, one-line errors


def test_a_nan_at_step_2_keeps_the_finite_checkpoint_and_resume_goes_on_from_it(assets, every_step_run, tmp_path,
                                                                                 capsys, monkeypatch):
    run = tmp_path / "run"
    collator = cli._collator
    calls = []

    def poisoning_collator(*args, **kwargs):
        collate = collator(*args, **kwargs)

        def poisoned(features):
            batch = collate(features)
            calls.append(1)
            if len(calls) == 2:
                batch["attention_mask"] = np.zeros_like(batch["attention_mask"])  # every position masked: NaN
                batch["input_ids"] = np.full_like(batch["input_ids"], -10**6)
            return batch

        return poisoned

    monkeypatch.setattr(cli, "_collator", poisoning_collator)
    status, out, err = run_cli(capsys, *train_argv(assets, run, *EVERY_STEP))
    monkeypatch.setattr(cli, "_collator", collator)
    one_line_error(status, out, err, "train", "at step 2", "the last checkpoint is step 1", alone=False)
    assert sorted(os.listdir(run / "checkpoints")) == ["1"]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))

    status, out, err = run_cli(capsys, *train_argv(assets, run, *EVERY_STEP, "--resume"))
    assert status == 0, err
    assert_same_run(run, every_step_run)  # the NaN step changed nothing: steps 2 and 3 as if it never happened


def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it(assets, every_step_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_argv(assets, run, *EVERY_STEP))[0] == 0
    for path in (run / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    damaged = snapshot(run / "checkpoints" / "3")

    status, out, err = run_cli(capsys, *train_argv(assets, run, *EVERY_STEP, "--resume"))
    assert status == 0, err
    kept = run / "checkpoints" / "3.damaged"
    assert "checkpoint step 3 cannot be read (" in err
    assert f"resuming from step 2, the damaged folder is kept as {kept}" in err
    assert snapshot(kept) == damaged
    assert sorted(os.listdir(run / "checkpoints")) == ["1", "2", "3", "3.damaged"]
    assert_same_run(run, every_step_run)


def test_a_failed_save_is_the_error_reported_even_when_the_plot_fails_too(assets, tmp_path, capsys,
                                                                          monkeypatch):
    from jaxpeft import checkpoints

    def failing_save(self, step, *args, **kwargs):
        raise checkpoints.CheckpointError(f"saving checkpoint step {step} in {self.directory} failed (OSError: No "
                                          "space left on device); check that the folder is writable and has free "
                                          "space")

    def failing_plot(*args, **kwargs):
        raise OSError("No space left on device (the plot)")

    monkeypatch.setattr(checkpoints.CheckpointManager, "save", failing_save)
    monkeypatch.setattr(trainer, "plot_history", failing_plot)
    status, out, err = run_cli(capsys, *train_argv(assets, tmp_path / "run", "--max-steps", 2, "--save-steps", 1))
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("jaxpeft train: error: saving checkpoint step 1 in "), err
    assert "the plot" not in lines[-1] and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--max-length", 0], "--max-length must be >= 1, got 0"),
    (["--max-length", 100], "--max-length 100 is more than the 64 positions the model has"),
    (["--max-steps", 0], "--max-steps must be >= 1, got 0"),
    (["--eval-steps", 0], "--eval-steps must be >= 1, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0, got nan"),
    (["--lora-dropout", 1], "lora_dropout must be in [0, 1), got lora_dropout=1.0"),
    (["--warmup-ratio", "-0.5"], "--warmup-ratio must be in [0, 1), got -0.5"),
    (["--training-arg", "max_steps=0"], "TrainingArguments.max_steps must be -1 (train for num_train_epochs) or "
                                        ">= 1, got 0"),
    (["--training-arg", 'learning_rate="fast"'], "TrainingArguments.learning_rate must be of type float"),
])
def test_impossible_training_values_are_errors_not_defaults(assets, tmp_path, capsys, argv, message):
    status, out, err = run_cli(capsys, *train_argv(assets, tmp_path / "run", *argv))
    one_line_error(status, out, err, "train", message)
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


@pytest.mark.parametrize("argv, message", [
    (["--top-k", -1, "--do-sample"], "--top-k must be >= 1, got -1"),
    (["--top-p", 0], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "inf"], "--temperature must be > 0, got inf"),
    (["--max-new-tokens", 0], "--max-new-tokens must be >= 1, got 0"),
])
def test_impossible_generation_values_are_errors(assets, capsys, argv, message):
    status, out, err = run_cli(capsys, "generate", "--model", assets / "gpt2", "--prompt", "the cat", *argv)
    one_line_error(status, out, err, "generate", message)


def test_debug_shows_the_traceback_of_an_error_and_its_one_line(assets, tmp_path, capsys):
    argv = ["eval", "--model", assets / "gpt2", "--task", "causal_lm", "--data", tmp_path / "missing.jsonl"]
    status, out, err = run_cli(capsys, *argv)
    one_line_error(status, out, err, "eval", "does not exist")
    status, out, err = run_cli(capsys, *argv, "--debug")
    assert status == 2 and err.startswith("Traceback (most recent call last):")
    assert err.strip().splitlines()[-1].startswith("jaxpeft eval: error: --data ")


def test_an_unexpected_error_is_one_line_with_its_type(assets, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside\nwith a second line")

    monkeypatch.setattr(cli, "load_model", broken)
    status, out, err = run_cli(capsys, "eval", "--model", assets / "gpt2", "--task", "causal_lm", "--data",
                               assets / "lines.csv")
    one_line_error(status, out, err, "eval", "RuntimeError: something deep inside with a second line",
                   "(run with --debug for the traceback)")


def test_metrics_lines_are_strict_json():
    assert outputs.json_line({"loss": float("nan"), "eval": [float("-inf"), 1.5]}) == \
        '{"loss": null, "eval": [null, 1.5]}'


FAILING_WRITE = """
import sys
import orbax.checkpoint as ocp
from jaxpeft import cli

async def failing_finalize(self):
    raise OSError(28, "No space left on device")

ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = failing_finalize
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_write_failing_in_the_background_is_one_line_without_orbax_tracebacks(assets, tmp_path):
    argv = train_argv(assets, tmp_path / "run", "--max-steps", 2, "--save-steps", 1)
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FAILING_WRITE, *argv], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 2, done.stderr  # the parameter count, then the error
    assert lines[-1].startswith("jaxpeft train: error: writing checkpoint step 1 in ") and \
        "(OSError: [Errno 28] No space left on device)" in lines[-1], done.stderr
    assert not (tmp_path / "run" / "checkpoints" / "1").exists()


# ----- data and model files named in the error


@pytest.mark.parametrize("lines, extra, message", [
    (['{"review": "good", "sentiment": 1}', '{"review": "bad", "sentiment": 5}'], ["--num-labels", 2],
     "train.jsonl:2): label 5 is out of range for 2 classes"),
    (['{"review": "good", "sentiment": 1}', '{"review": "bad", "sentiment": -1}'], [],
     "train.jsonl:2): label -1 is negative"),
    (['{"review": "good", "sentiment": 1}', '{"review": "bad", "sentiment": 1}'], ["--num-labels", 2],
     "has a single class"),
    (['{"review": "good", "sentiment": 1}', '{"review": "bad", "sentiment": 0.5}'], ["--num-labels", 2],
     "train.jsonl:2): label 0.5 is not a class id"),
])
def test_label_errors_name_the_row(assets, tmp_path, capsys, lines, extra, message):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines * 4) + "\n" if "single" in message else "\n".join(lines) + "\n")
    argv = [arg if arg != str(assets / "reviews.jsonl") else str(data) for arg in train_argv(assets, tmp_path / "run")]
    status, out, err = run_cli(capsys, *argv, "--max-steps", 1, *extra)
    one_line_error(status, out, err, "train", message)
    assert not (tmp_path / "run").exists()


def test_a_data_file_that_is_not_utf8_names_its_line_and_column(assets, tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_bytes("\ufeffreview,sentiment\ngood film,pos\nbad caf\xe9,neg\n".encode("utf-8")[:-8] + b"\xe9,neg\n")
    argv = [arg if arg != str(assets / "reviews.jsonl") else str(data) for arg in train_argv(assets, tmp_path / "run")]
    status, out, err = run_cli(capsys, *argv, "--max-steps", 1)
    one_line_error(status, out, err, "train", "train.csv:3:", "is not UTF-8")


def test_a_truncated_model_file_says_it_is_truncated(assets, tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    for path in (assets / "bert").iterdir():
        data = path.read_bytes()
        (model / path.name).write_bytes(data[: len(data) // 2] if path.suffix == ".safetensors" else data)
    status, out, err = run_cli(capsys, "eval", "--model", model, "--task", "seq_cls", "--num-labels", 2, "--data",
                               assets / "reviews.jsonl", "--text-column", "review", "--label-column", "sentiment")
    one_line_error(status, out, err, "eval", "model.safetensors", "truncated")


def test_a_prompt_and_new_tokens_beyond_the_position_table_are_refused(assets, capsys):
    status, out, err = run_cli(capsys, "generate", "--model", assets / "gpt2", "--prompt", "the cat sat",
                               "--max-new-tokens", 100)
    one_line_error(status, out, err, "generate", "64")
