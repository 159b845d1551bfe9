"""Subprocess for tests/test_sharding.py: sharded training on simulated CPU devices, and two processes on 127.0.0.1.

    python sharding_worker.py train MESH OUT          (8 devices) three LoRA steps on MESH ("data=2,fsdp=4");
                                                      writes OUT.npz (the trained leaves, the losses) and OUT.json
                                                      (the mesh spec of every parameter and adapter array)
    python sharding_worker.py reference OUT           the same three steps, unsharded, on one device
    python sharding_worker.py distributed PORT ID OUT one of two processes (gloo collectives): the same three steps
                                                      with each process feeding its half of every batch
    python sharding_worker.py checkpoint DIR OUT      (8 devices) saves on a 4x2 mesh, restores on 8x1 and on one
                                                      device; writes what was saved and what came back
    python sharding_worker.py trainer MESH DIR OUT    the Trainer with TrainingArguments(mesh=MESH) (or none for
                                                      "none"): three steps of 16 examples, then evaluate
    python sharding_worker.py distributed_trainer PORT ID DIR OUT
                                                      the same Trainer run as one of two processes, with an Orbax
                                                      checkpoint and the adapter saved by the first process
    python sharding_worker.py eight_devices DIR       (8 devices) what the tests need in one process: train on each
                                                      of TRAIN_MESHES (DIR/fsdp, DIR/tensor), checkpoint (DIR/restored),
                                                      trainer on TRAINER_MESH (DIR/mesh)
    python sharding_worker.py two_processes PORT ID DIR
                                                      one of two processes: distributed (DIR/distributed), then
                                                      distributed_trainer (DIR/run, DIR/two)
"""

import json
import sys

import jax

if __name__ == "__main__" and sys.argv[1] in ("distributed", "distributed_trainer", "two_processes"):  # first
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=2,
                               process_id=int(sys.argv[3]))

import numpy as np  # noqa: E402
import transformers  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft import sharding, training  # noqa: E402
from jaxpeft.models import AutoModelForCausalLM  # noqa: E402

STEPS = 3
BATCH, LENGTH = 8, 16
TRAIN_MESHES = {"fsdp": "data=2,fsdp=4", "tensor": "data=2,tensor=4"}
TRAINER_MESH = "data=2,fsdp=4"


def peft_model():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    base = AutoModelForCausalLM.from_config(config, seed=0, scan_layers=True)
    lora = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return base, jaxpeft.get_peft_model(base, lora, seed=1)


def batches():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 64, (BATCH, LENGTH), dtype=np.int32)} for _ in range(STEPS)]


def flat(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run(mesh=None):
    """Three AdamW steps; returns the final trainable leaves (numpy), the losses and the state."""
    base, model = peft_model()
    optimizer, schedule = training.make_optimizer(1e-2, total_steps=STEPS, schedule="constant", weight_decay=0.01)
    mask = model.trainable_mask
    params = model.params
    step_options = {}
    if mesh is not None:
        params = sharding.shard_params(params, mesh, base.logical_axes())
    trainable, frozen = jaxpeft.partition(params, mask)
    state = training.init_train_state(params, mask, optimizer, seed=0)
    if mesh is not None:
        shardings = sharding.state_shardings(state, jaxpeft.partition(
            jax.tree_util.tree_map(lambda leaf: leaf.sharding, params), mask)[0], optimizer, mesh)
        state = sharding.shard_state(state, shardings)
        step_options = {"state_sharding": shardings, "batch_sharding": sharding.batch_sharding(mesh)}
    step = training.make_train_step(training.peft_loss_fn(model), optimizer, frozen, schedule=schedule,
                                    **step_options)
    losses = []
    for batch in batches():
        if mesh is not None:
            batch = sharding.shard_batch({k: v[sharding.process_rows(BATCH)] for k, v in batch.items()}, mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return params, state, losses


def trained_values(state) -> dict:
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in flat(state.trainable).items()}


def train(mesh_text: str, out: str) -> None:
    mesh = sharding.mesh_from(mesh_text)
    params, state, losses = run(mesh)
    np.savez(out + ".npz", losses=np.array(losses), **trained_values(state))
    specs = {"params": {name: list(map(_axis, leaf.sharding.spec)) for name, leaf in flat(params).items()},
             "trainable": {name: list(map(_axis, leaf.sharding.spec)) for name, leaf in flat(state.trainable).items()},
             "adam_mu": {name: list(map(_axis, leaf.sharding.spec))
                         for name, leaf in flat(state.opt_state).items() if ".mu" in name},
             "shard_shapes": {name: list(leaf.addressable_shards[0].data.shape)
                              for name, leaf in flat(state.trainable).items()}}
    with open(out + ".json", "w") as file:
        json.dump(specs, file)


def _axis(axis):
    return list(axis) if isinstance(axis, tuple) else axis


def reference(out: str) -> None:
    _, state, losses = run()
    np.savez(out + ".npz", losses=np.array(losses), **trained_values(state))


def distributed(port: str, process_id: str, out: str) -> None:
    mesh = sharding.make_mesh(data=-1)
    _, state, losses = run(mesh)
    gathered = jax.experimental.multihost_utils.process_allgather(state.trainable, tiled=True)
    if int(process_id) == 0:
        np.savez(out + ".npz", losses=np.array(losses), processes=jax.process_count(),
                 **{name: np.asarray(v) for name, v in flat(gathered).items()})


def checkpoint(directory: str, out: str) -> None:
    from jaxpeft.checkpoints import CheckpointManager

    mesh = sharding.make_mesh(data=4, fsdp=2)
    _, state, _ = run(mesh)
    saved = trained_values(state)
    with CheckpointManager(directory) as manager:
        manager.save(STEPS, state, data_position={"epoch": 0, "step_in_epoch": STEPS})
    results = {}
    other = sharding.make_mesh(data=8)
    for name, target in (("8x1", other), ("one_device", None)):
        _, like, _ = run(target)  # a state of the same structure, on the target placement
        with CheckpointManager(directory) as manager:
            restored = manager.restore(like).state
        values = trained_values(restored)
        results[name] = {"equal": all(np.array_equal(values[k], saved[k]) for k in saved),
                         "devices": sorted({len(leaf.sharding.device_set) for leaf in jax.tree.leaves(restored)}),
                         "specs": sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(restored.trainable)
                                          if hasattr(leaf.sharding, "spec")})}
    with open(out + ".json", "w") as file:
        json.dump(results, file)


def trainer_run(mesh_text: str, directory: str, out: str, save: bool = False) -> None:
    from jaxpeft.trainer import Trainer, TrainingArguments

    mesh = None if mesh_text == "none" else mesh_text
    per_device = 16 // 2 // (1 if mesh is None else sharding.data_parallel_size(sharding.mesh_from(mesh)))
    _, model = peft_model()
    rng = np.random.default_rng(1)
    data = [{"input_ids": rng.integers(1, 64, LENGTH).tolist()} for _ in range(48)]
    args = TrainingArguments(directory, max_steps=STEPS, per_device_train_batch_size=per_device,
                             per_device_eval_batch_size=per_device, gradient_accumulation_steps=2, learning_rate=1e-2,
                             save_strategy="steps" if save else "no", save_steps=STEPS, disable_tqdm=True,
                             mesh=mesh)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16], task="causal_lm")
    trainer.train()
    metrics = trainer.evaluate()
    if save:
        trainer.save_model(directory + "/adapter")
    if jax.process_index() != 0:
        return
    trainable = jaxpeft.partition(model.params, model.trainable_mask)[0]
    np.savez(out + ".npz", eval_loss=metrics["eval_loss"], batch=args.train_batch_size,
             **{name: np.asarray(jax.device_get(leaf)) for name, leaf in flat(trainable).items()})


def distributed_trainer(port: str, process_id: str, directory: str, out: str) -> None:
    trainer_run("data=-1", directory, out, save=True)


def eight_devices(directory: str) -> None:
    """Every 8-device run of the tests, in one process: one start-up instead of four."""
    for name, mesh_text in TRAIN_MESHES.items():
        train(mesh_text, f"{directory}/{name}")
    checkpoint(f"{directory}/checkpoints", f"{directory}/restored")
    trainer_run(TRAINER_MESH, f"{directory}/mesh", f"{directory}/mesh")


def two_processes(port: str, process_id: str, directory: str) -> None:
    """Both two-process runs of the tests in one runtime: one start-up and one rendezvous instead of two."""
    distributed(port, process_id, f"{directory}/distributed")
    distributed_trainer(port, process_id, f"{directory}/run", f"{directory}/two")


if __name__ == "__main__":
    import jax.experimental.multihost_utils  # noqa: F401

    {"train": train, "reference": reference, "distributed": distributed, "checkpoint": checkpoint,
     "trainer": trainer_run, "distributed_trainer": distributed_trainer, "eight_devices": eight_devices,
     "two_processes": two_processes}[sys.argv[1]](*sys.argv[2:])
