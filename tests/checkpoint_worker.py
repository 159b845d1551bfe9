"""Subprocess for tests/test_checkpoints.py: a run that gets killed in the middle of a save, and restores onto a
mesh of two CPU devices.

    python checkpoint_worker.py kill DIRECTORY     saves step 1, then blocks inside the save of step 2 (all its
                                                   files written, before the commit) after printing "saving 2";
                                                   the parent kills it there.
    python checkpoint_worker.py reshard DIRECTORY  (with 2 CPU devices) saves on one device, restores sharded over
                                                   both and back; prints "resharded" when the values and shardings
                                                   are right.
"""

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft import training
from jaxpeft.checkpoints import CheckpointManager

POSITION = {"epoch": 0, "step_in_epoch": 1}


def make_state(seed: int, rank: int = 4) -> training.TrainState:
    """A LoRA-like TrainState with random values everywhere (optimizer moments included)."""
    params = {"dense": {"kernel": jnp.ones((8, 8)), "lora_A": jnp.zeros((8, rank)), "lora_B": jnp.zeros((rank, 8))}}
    mask = {"dense": {"kernel": False, "lora_A": True, "lora_B": True}}
    optimizer, _ = training.make_optimizer(1e-3, total_steps=10, max_grad_norm=1.0, weight_decay=0.01)
    state = training.init_train_state(params, mask, optimizer, seed=seed)
    rng = np.random.default_rng(seed)  # numpy: no compilation per leaf shape
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype)
                                 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf + 3), state)


def flat(state) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def block_commit_of_step(step_name: str) -> None:
    """Makes the commit (the rename of the finished temporary folder) of that step print a line and hang."""
    original = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == step_name:
            print(f"saving {step_name}", flush=True)
            threading.Event().wait()  # until killed
        return await original(self)

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = finalize


def kill(directory: str) -> None:
    manager = CheckpointManager(directory, max_to_keep=1)
    state = make_state(1)
    np.savez(f"{directory}.expected.npz", **flat(state))
    manager.save(1, state, data_position=POSITION, metrics={"loss": 0.5})
    manager.wait_until_finished()
    print("saved 1", flush=True)
    block_commit_of_step("2")
    manager.save(2, make_state(2), data_position=POSITION)
    manager.wait_until_finished()
    print("not killed", flush=True)


def reshard(directory: str) -> None:
    devices = jax.devices()
    assert len(devices) == 2, devices
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharding_of(leaf):  # the (8, rank) and (rank, 8) LoRA leaves and their moments split over "x"
        return sharded if leaf.ndim == 2 else replicated

    state = make_state(3)
    expected = flat(state)
    with CheckpointManager(directory) as manager:
        manager.save(1, state, data_position=POSITION)
        like = jax.tree_util.tree_map(lambda leaf: jax.device_put(jnp.zeros_like(leaf), sharding_of(leaf)), state)
        restored = manager.restore(like).state
        for leaf, like_leaf in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(like), strict=True):
            assert leaf.sharding == like_leaf.sharding, (leaf.sharding, like_leaf.sharding)
        assert any(leaf.ndim == 2 and leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 2
                   for leaf in jax.tree_util.tree_leaves(restored))
        for name, value in flat(restored).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
            assert value.dtype == expected[name].dtype, name
        manager.save(2, restored, data_position=POSITION)  # saved from the mesh, restored onto one device
        single = jax.sharding.SingleDeviceSharding(devices[1])
        back = manager.restore(jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, single), state)).state
        assert all(leaf.sharding == single for leaf in jax.tree_util.tree_leaves(back))
        for name, value in flat(back).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    print("resharded", flush=True)


if __name__ == "__main__":
    {"kill": kill, "reshard": reshard}[sys.argv[1]](sys.argv[2])
