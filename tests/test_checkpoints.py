"""Checkpoints of a run: exact restore, last N + best, async saves, a kill mid-save, damaged files, mismatches."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from checkpoint_worker import POSITION, flat, make_state
from toy_models import MLP

import jaxpeft
from jaxpeft import training
from jaxpeft.checkpoints import TMP_SUFFIX, CheckpointError, CheckpointManager

WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")
REPO = WORKER.parent.parent


def assert_bit_exact(state, expected: dict) -> None:
    got = flat(state)
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, name
        assert value.tobytes() == expected[name].tobytes(), name


def on_disk(directory: pathlib.Path) -> list[str]:
    return sorted(os.listdir(directory), key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0))


def run_worker(mode: str, directory: pathlib.Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    with open(directory.parent / f"{mode}.stderr", "w") as stderr:  # the worker keeps its own handle
        return subprocess.Popen([sys.executable, str(WORKER), mode, str(directory)], cwd=REPO, env=environment,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)


# ----- exact restore


def test_restore_is_bit_exact_with_optax_states(tmp_path):
    state = make_state(0)
    node_types = {type(node).__name__ for node in jax.tree_util.tree_leaves(
        state.opt_state, is_leaf=lambda node: isinstance(node, tuple) and hasattr(node, "_fields"))}
    assert {"EmptyState", "MaskedState", "ScaleByAdamState"} <= node_types  # what the test claims to cover
    assert state.trainable["dense"]["kernel"] is None
    expected = flat(state)

    with CheckpointManager(tmp_path) as manager:
        manager.save(7, state, data_position={"epoch": 1, "step_in_epoch": 3}, metrics={"eval_loss": np.float32(0.25)})
        manager.wait_until_finished()
        restored = manager.restore(like=make_state(99))  # other values, same structure

    assert restored.step == 7
    assert restored.data_position == {"epoch": 1, "step_in_epoch": 3}
    assert restored.metrics == {"eval_loss": 0.25}
    assert jax.tree_util.tree_structure(restored.state) == jax.tree_util.tree_structure(state)
    assert isinstance(restored.state, training.TrainState) and restored.state.trainable["dense"]["kernel"] is None
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(restored.state))
    assert_bit_exact(restored.state, expected)


def lora_state(rank: int, optimizer) -> training.TrainState:
    """The TrainState of LoRA (rank ``rank``) on fc1 and fc2 of a small MLP, as shapes and dtypes (no compiling)."""

    def build():
        model, x = MLP(), jnp.ones((1, 4))
        config = jaxpeft.LoraConfig(r=rank, target_modules=["fc1", "fc2"])
        variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, model.init(jax.random.key(0), x), x)
        return training.init_train_state(variables, jaxpeft.trainable_mask(variables, config), optimizer)

    return jax.eval_shape(build)


def random_values(abstract, seed: int = 0):
    rng = np.random.default_rng(seed)

    def one(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))
        return jnp.asarray(rng.integers(0, 1000, leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map(one, abstract)


def dropout_loss(params, batch, rng):
    weight = params["dense"]["kernel"] + params["dense"]["lora_A"] @ params["dense"]["lora_B"]
    hidden = batch["x"] @ weight
    if rng is not None:  # dropout: the resumed run must draw the same masks
        hidden = jnp.where(jax.random.bernoulli(rng, 0.8, hidden.shape), hidden / 0.8, 0.0)
    return jnp.mean((hidden - batch["y"]) ** 2)


def test_resumed_training_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    params = {"dense": {"kernel": jnp.eye(8), "lora_A": jnp.full((8, 2), 0.1, jnp.float32),
                        "lora_B": jnp.full((2, 8), 0.1, jnp.float32)}}
    mask = {"dense": {"kernel": False, "lora_A": True, "lora_B": True}}
    optimizer, schedule = training.make_optimizer(1e-2, total_steps=10, warmup_steps=2, max_grad_norm=1.0,
                                                  weight_decay=0.01)
    _, frozen = jaxpeft.partition(params, mask)
    train_step = training.make_train_step(dropout_loss, optimizer, frozen, schedule=schedule)  # donates the state
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((4, 8), np.float32), "y": rng.standard_normal((4, 8), np.float32)}

    # Committed to the device, as restored arrays are: the resumed steps reuse the compiled step.
    state = jax.device_put(training.init_train_state(params, mask, optimizer, seed=3), jax.devices()[0])
    state, _ = train_step(state, batch)
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, state, data_position=POSITION)  # async: the next step donates these buffers at once
        for _ in range(3):
            state, _ = train_step(state, batch)
        uninterrupted = flat(state)
        resumed = manager.restore(like=training.init_train_state(params, mask, optimizer, seed=0))
    assert int(resumed.state.step) == 1
    state = resumed.state
    for _ in range(3):
        state, _ = train_step(state, batch)
    assert int(state.step) == 4
    assert_bit_exact(state, uninterrupted)


def test_another_lora_rank_is_reported_by_leaf_and_shapes(tmp_path):
    optimizer = optax.adamw(1e-3)
    state = random_values(lora_state(2, optimizer))
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(3, state, data_position=POSITION)
        with pytest.raises(CheckpointError, match=r"the shapes differ at trainable\.params\.fc1\.lora_A\.default, "
                                                  r"\(4, 2\) in the checkpoint and \(4, 8\) in `like`"):
            manager.restore(lora_state(8, optimizer))
        restored = manager.restore(lora_state(2, optimizer)).state  # `like` may be shapes and dtypes only
    assert_bit_exact(restored, flat(state))


def test_other_structures_and_dtypes_are_reported(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(1, make_state(0), data_position=POSITION)
        other_optimizer = training.init_train_state(
            {"dense": {"kernel": jnp.ones((8, 8)), "lora_A": jnp.zeros((8, 4)), "lora_B": jnp.zeros((4, 8))}},
            {"dense": {"kernel": False, "lora_A": True, "lora_B": True}}, optax.sgd(0.1, momentum=0.9))
        with pytest.raises(CheckpointError, match=r"it has no array opt_state\.0\.trace\.dense\.lora_A .*which "
                                                  r"`like` has"):
            manager.restore(other_optimizer)
        more_targets = make_state(0)
        more_targets = more_targets.replace(trainable={"dense": {**more_targets.trainable["dense"],
                                                                 "kernel": jnp.ones((8, 8))}})
        with pytest.raises(CheckpointError, match=r"it has no array trainable\.dense\.kernel, which `like` has"):
            manager.restore(more_targets)
        bf16 = make_state(0)
        bf16 = bf16.replace(trainable=jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.bfloat16), bf16.trainable))
        with pytest.raises(CheckpointError, match=r"dtypes differ at trainable\.dense\.lora_A, float32 in the "
                                                  r"checkpoint and bfloat16 in `like`"):
            manager.restore(bf16)


# ----- which checkpoints stay


@pytest.mark.parametrize("metric, greater_is_better, values", [
    ("eval_loss", False, [0.5, 0.2, 0.4, None, 0.2, 0.6]),
    ("eval_accuracy", True, [0.5, 0.9, 0.6, None, 0.9, 0.1]),
])
def test_keeps_the_last_n_and_the_best(tmp_path, metric, greater_is_better, values):
    # By hand: the best is step 2 (step 5 only ties it; as in HF the earlier one stays the best). Step 4 has no
    # eval, so it only counts among the last ones.
    kept_after = {1: ["1"], 2: ["1", "2"], 3: ["2", "3"], 4: ["2", "3", "4"], 5: ["2", "4", "5"], 6: ["2", "5", "6"]}
    manager = CheckpointManager(tmp_path, max_to_keep=2, best_metric=metric, greater_is_better=greater_is_better)
    for step, value in enumerate(values, 1):
        manager.save(step, make_state(step), data_position={"epoch": 0, "step_in_epoch": step},
                     metrics=None if value is None else {metric: value, "other": 1.0})
        manager.wait_until_finished()
        assert on_disk(tmp_path) == kept_after[step], step
        assert manager.all_steps() == [int(name) for name in kept_after[step]]
    assert manager.best_step() == 2 and manager.latest_step() == 6
    manager.close()

    reopened = CheckpointManager(tmp_path, max_to_keep=2, best_metric=metric, greater_is_better=greater_is_better)
    assert reopened.all_steps() == [2, 5, 6] and reopened.best_step() == 2
    assert_bit_exact(reopened.restore(make_state(0), step=2).state, flat(make_state(2)))
    better = 0.1 if not greater_is_better else 0.95
    reopened.save(7, make_state(7), data_position=POSITION, metrics={metric: better})
    reopened.close()
    assert on_disk(tmp_path) == ["6", "7"]
    assert CheckpointManager(tmp_path, best_metric=metric, greater_is_better=greater_is_better).best_step() == 7


def test_max_to_keep_alone_keeps_the_last_ones(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=3) as manager:
        for step, kept in [(1, ["1"]), (2, ["1", "2"]), (3, ["1", "2", "3"]), (4, ["2", "3", "4"])]:
            manager.save(step, make_state(step), data_position=POSITION, metrics={"eval_loss": 1.0 / step})
            manager.wait_until_finished()
            assert on_disk(tmp_path) == kept, step
        assert manager.best_step() is None  # no best_metric given


def test_without_limits_every_checkpoint_stays(tmp_path):
    with CheckpointManager(tmp_path, best_metric="eval_loss") as manager:
        for step in (10, 20, 30):
            manager.save(step, make_state(step), data_position=POSITION, metrics={"eval_loss": 1.0 + step})
        assert manager.best_step() == 10
    assert on_disk(tmp_path) == ["10", "20", "30"]


# ----- asynchronous saves


def test_async_save_returns_before_the_write_and_wait_finishes_it(tmp_path, monkeypatch):
    commit_reached, release = threading.Event(), threading.Event()
    original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self):
        if self.get_final().name == "1":
            commit_reached.set()
            release.wait(60)
        return await original(self)

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    state = make_state(1)
    expected = flat(state)
    manager = CheckpointManager(tmp_path, async_save=True)
    try:
        manager.save(1, state, data_position=POSITION)  # returns while the background write is held
        assert commit_reached.wait(60)
        assert not (tmp_path / "1").exists() and on_disk(tmp_path) == [f"1{TMP_SUFFIX}"]
        for leaf in jax.tree_util.tree_leaves(state):
            leaf.delete()  # as a donating train step would: the save must not need the device buffers any more
    finally:
        release.set()
    manager.wait_until_finished()
    assert on_disk(tmp_path) == ["1"]
    assert_bit_exact(manager.restore(make_state(0)).state, expected)
    manager.close()


def test_save_then_close_leaves_complete_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, make_state(1), data_position=POSITION)
    manager.save(2, make_state(2), data_position={"epoch": 1, "step_in_epoch": 0}, metrics={"loss": 2.5})
    manager.close()
    restored = CheckpointManager(tmp_path).restore(make_state(0))
    assert (restored.step, restored.data_position, restored.metrics) == (2, {"epoch": 1, "step_in_epoch": 0},
                                                                          {"loss": 2.5})
    assert_bit_exact(restored.state, flat(make_state(2)))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, async_save):
    original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    failures = []

    async def failing_finalize(self):
        if self.get_final().name == "2" and not failures:
            failures.append(self.get_final())
            raise OSError("No space left on device")
        return await original(self)

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", failing_finalize)
    manager = CheckpointManager(tmp_path, max_to_keep=1, async_save=async_save)
    manager.save(1, make_state(1), data_position=POSITION)
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* failed \(OSError: No space left on device\)"):
        manager.save(2, make_state(2), data_position=POSITION)
        manager.wait_until_finished()
    assert failures and on_disk(tmp_path) == ["1"]  # nothing half-written, and max_to_keep deleted nothing
    assert manager.all_steps() == [1]
    assert_bit_exact(manager.restore(make_state(0)).state, flat(make_state(1)))
    manager.save(2, make_state(2), data_position=POSITION)
    manager.close()
    assert on_disk(tmp_path) == ["2"]


# ----- a process killed mid-save, other devices


def test_a_run_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "run"
    worker = run_worker("kill", directory)
    watchdog = threading.Timer(120, worker.kill)
    watchdog.start()
    lines = []
    try:
        for line in worker.stdout:
            lines.append(line.strip())
            if line.strip() == "saving 2":
                worker.send_signal(signal.SIGKILL)  # step 2's files are written, its commit is not
                break
        worker.wait()
    finally:
        watchdog.cancel()
    assert lines == ["saved 1", "saving 2"], (lines, (tmp_path / "kill.stderr").read_text()[-3000:])
    assert worker.returncode == -signal.SIGKILL
    assert on_disk(directory) == ["1", f"2{TMP_SUFFIX}"]
    assert (directory / f"2{TMP_SUFFIX}" / "state").is_dir()

    manager = CheckpointManager(directory, max_to_keep=1)
    assert on_disk(directory) == ["1"]  # the unfinished save is cleared away
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    restored = manager.restore(make_state(5))
    assert (restored.step, restored.data_position, restored.metrics) == (1, POSITION, {"loss": 0.5})
    assert_bit_exact(restored.state, dict(np.load(f"{directory}.expected.npz")))

    manager.save(2, make_state(2), data_position=POSITION)
    manager.wait_until_finished()
    assert on_disk(directory) == ["2"]
    assert_bit_exact(manager.restore(make_state(5)).state, flat(make_state(2)))
    manager.close()


def test_restores_onto_the_shardings_of_like(tmp_path):
    two_devices = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"
    worker = run_worker("reshard", tmp_path / "run", XLA_FLAGS=two_devices)
    try:
        out, _ = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert worker.returncode == 0 and out.split() == ["resharded"], (tmp_path / "reshard.stderr").read_text()[-3000:]


# ----- damaged checkpoints and wrong calls


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_middle(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 8] = bytes(255 - byte for byte in data[middle: middle + 8])
    path.write_bytes(bytes(data))


def swap_in_step_1(path: pathlib.Path) -> None:
    """Replaces the folder with step 1's: readable files holding other values (the checksums tell)."""
    shutil.rmtree(path)
    shutil.copytree(path.parent.parent / "1" / path.name, path)


DAMAGES = {
    "array files truncated": ("state/**/d/*", truncate),
    "array files overwritten": ("state/**/d/*", overwrite_middle),
    "array files of another step": ("state", swap_in_step_1),
    "tree metadata garbled": ("state/_METADATA", lambda path: path.write_text("{not json")),
    "run file truncated": ("run/metadata", truncate),
    "state folder deleted": ("state", shutil.rmtree),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    pattern, corrupt = DAMAGES[damage]
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(1, make_state(1), data_position=POSITION)
        manager.save(2, make_state(2), data_position=POSITION)
    paths = sorted((tmp_path / "2").glob(pattern))
    assert paths, pattern
    for path in paths:
        corrupt(path)

    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError) as raised:
        manager.restore(make_state(0))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step 2 in {tmp_path / '2'} cannot be read (")
    assert message.endswith("delete that folder to resume from step 1, or pass step=1")
    assert_bit_exact(manager.restore(make_state(0), step=1).state, flat(make_state(1)))


def test_no_checkpoint_there(tmp_path):
    missing = tmp_path / "nothing" / "here"
    with pytest.raises(CheckpointError, match=r"^there is no checkpoint in .*nothing/here; check the path"):
        CheckpointManager(missing).restore(make_state(0))
    assert not missing.exists()  # looking does not create it
    with pytest.raises(CheckpointError, match="there is no checkpoint in"):
        CheckpointManager(tmp_path).restore(make_state(0))
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, make_state(1), data_position=POSITION)
        with pytest.raises(CheckpointError, match=r"there is no checkpoint step 5 in .*; it holds steps \[1\]"):
            manager.restore(make_state(0), step=5)


def test_wrong_calls_raise_one_line_errors(tmp_path):
    state = make_state(1)
    with pytest.raises(CheckpointError, match="max_to_keep must be an int >= 1"):
        CheckpointManager(tmp_path, max_to_keep=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        CheckpointManager(tmp_path / "file")
    with CheckpointManager(tmp_path / "run", async_save=False) as manager:
        manager.save(1, state, data_position=POSITION)
        with pytest.raises(CheckpointError, match="checkpoint step 1 already exists in"):
            manager.save(1, state, data_position=POSITION)
        with pytest.raises(CheckpointError, match=r"data_position\['epoch'\] must be an int, got 1.5"):
            manager.save(2, state, data_position={"epoch": 1.5})
        with pytest.raises(CheckpointError, match=r"metrics\['loss'\] must be a number"):
            manager.save(2, state, data_position=POSITION, metrics={"loss": "low"})
        with pytest.raises(CheckpointError, match="step must be an int >= 0"):
            manager.save(-1, state, data_position=POSITION)
        jax.tree_util.tree_leaves(state)[0].delete()
        with pytest.raises(CheckpointError, match=r"was deleted \(donated to a train step\?\)"):
            manager.save(2, state, data_position=POSITION)
        assert manager.all_steps() == [1]
    assert issubclass(CheckpointError, ValueError)
