"""jaxpeft.sharding: meshes, logical-axis rules, adapter shardings; sharded training on 8 simulated CPU devices and
over two processes (tests/sharding_worker.py runs those in subprocesses)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import filelock
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P

import jaxpeft
from jaxpeft import sharding
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "sharding_worker.py"
EIGHT_DEVICES = {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"}


def run_worker(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], cwd=HERE, env=environment,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def shared_run(tmp_path_factory, worker_id: str, name: str, start) -> pathlib.Path:
    """The folder ``start(folder)`` fills, once per session: when xdist hands the tests that read it to both workers,
    the second waits for the first one's run and reads it too."""
    if worker_id == "master":
        folder = tmp_path_factory.mktemp(name)
        start(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this session
    folder, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            start(folder)
            done.touch()
    return folder


@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory, worker_id):
    """The folder of the worker's ``eight_devices`` runs (training on both meshes, the checkpoint, the Trainer)."""
    return shared_run(tmp_path_factory, worker_id, "eight_devices",
                      lambda folder: run_worker("eight_devices", folder, env=EIGHT_DEVICES))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, worker_id):
    """The folder of the worker's ``two_processes`` runs (three steps, then the Trainer), as processes 0 and 1."""
    return shared_run(tmp_path_factory, worker_id, "two_processes",
                      lambda folder: run_two_processes("two_processes", folder))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The three LoRA steps of the worker, unsharded, in this (one-device) process."""
    assert jax.device_count() == 1
    import sharding_worker

    _, state, losses = sharding_worker.run()
    return sharding_worker.trained_values(state), np.array(losses)


# ----------------------------------------------------------------------------------------------- the mesh


def test_parse_mesh_fills_axes_and_rejects_unknown_ones():
    assert sharding.parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.parse_mesh(None) == {"data": -1, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh({"tensor": 2}) == {"data": 1, "fsdp": 1, "tensor": 2}
    with pytest.raises(sharding.ShardingError, match="unknown; use"):
        sharding.parse_mesh("dp=2")
    with pytest.raises(sharding.ShardingError, match="not NAME=SIZE"):
        sharding.parse_mesh("data:2")


def test_make_mesh_checks_the_device_count():
    with pytest.raises(sharding.ShardingError, match="needs 4 devices, there are 1"):
        sharding.make_mesh(data=2, fsdp=2)
    with pytest.raises(sharding.ShardingError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(sharding.ShardingError, match="cannot be split"):
        sharding.make_mesh(data=-1, tensor=2)
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_initialize_distributed_needs_all_three_settings(monkeypatch):
    for variable in sharding.ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    assert sharding.initialize_distributed() is False
    with pytest.raises(sharding.ShardingError, match=r"\['num_processes', 'process_id'\] missing"):
        sharding.initialize_distributed(coordinator_address="127.0.0.1:1234")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(sharding.ShardingError, match="outside 0..1"):
        sharding.initialize_distributed()


# ------------------------------------------------------------------------------------ adapter specs


def _llama(scan_layers=True, **config):
    settings = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=32, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**settings, **config}), scan_layers=scan_layers)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_follows_the_weight_it_adapts(scan_layers):
    base = _llama(scan_layers)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                            use_dora=True))
    specs = jaxpeft.tree.flatten(sharding.param_specs(model.params, base.logical_axes()))
    layer = ("params", "model", "layers") if scan_layers else ("params", "model", "layers", "1")
    stack = ("layers",) if scan_layers else ()
    q, down = layer + ("self_attn", "q_proj"), layer + ("mlp", "down_proj")
    assert specs[q + ("kernel",)] == P(*stack, "embed", "heads")
    assert specs[q + ("lora_A", "default")] == P(*stack, "embed", None)
    assert specs[q + ("lora_B", "default")] == P(*stack, None, "heads")
    assert specs[q + ("lora_magnitude_vector", "default")] == P(*stack, "heads")
    assert specs[q + ("lora_scaling", "default")] == P(*stack)
    assert specs[down + ("lora_A", "default")] == P(*stack, "mlp", None)
    assert specs[down + ("lora_B", "default")] == P(*stack, None, "embed")


class MultiAxis(nn.Module):
    """DenseGeneral and Einsum layers with several input/output axes, annotated with logical names."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "heads", "kv"))
        h = nn.DenseGeneral((4, 2), kernel_init=init, use_bias=False, name="qkv")(x)
        einsum_init = nn.with_logical_partitioning(nn.initializers.normal(), ("heads", "kv", "embed"))
        return nn.Einsum((4, 2, 8), "bthd,hde->bte", kernel_init=einsum_init, use_bias=False, name="out")(h)


def test_multi_axis_layers_keep_each_axis_name():
    module, x = MultiAxis(), jnp.ones((1, 3, 8))
    variables = nn.unbox(module.init(jax.random.key(0), x))
    adapted = jaxpeft.init_adapters(jax.random.key(1), jaxpeft.LoraConfig(r=3, target_modules=["qkv", "out"]),
                                    module.apply, variables, x)
    specs = sharding.param_specs(adapted, sharding.logical_axes(module, x))["params"]
    assert specs["qkv"]["lora_A"]["default"] == P("embed", None)
    assert specs["qkv"]["lora_B"]["default"] == P(None, "heads", "kv")
    assert specs["out"]["lora_A"]["default"] == P("heads", "kv", None)
    assert specs["out"]["lora_B"]["default"] == P(None, "embed")


def test_other_methods_and_saved_modules_get_their_layers_axes():
    base = _llama()
    ia3 = jaxpeft.get_peft_model(base, jaxpeft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"]))
    specs = jaxpeft.tree.flatten(sharding.param_specs(ia3.params, base.logical_axes()))
    layers = ("params", "model", "layers")
    assert specs[layers + ("self_attn", "k_proj", "ia3_l", "default")] == P("layers", None, "kv")  # scales outputs
    assert specs[layers + ("mlp", "down_proj", "ia3_l", "default")] == P("layers", "mlp", None)  # scales inputs

    bottleneck = jaxpeft.get_peft_model(base, jaxpeft.AdapterConfig(reduction_factor=4))
    specs = jaxpeft.tree.flatten(sharding.param_specs(bottleneck.params, base.logical_axes()))
    down = layers + ("mlp", "down_proj")
    assert specs[down + ("adapter_down_kernel", "default")] == P("layers", "embed", None)
    assert specs[down + ("adapter_up_kernel", "default")] == P("layers", None, "embed")
    assert specs[down + ("adapter_up_bias", "default")] == P("layers", "embed")

    classifier = AutoModelForSequenceClassification.from_config(transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bitfit = jaxpeft.get_peft_model(classifier, jaxpeft.BitFitConfig(task_type="SEQ_CLS"))
    flat = jaxpeft.tree.flatten(sharding.param_specs(bitfit.params, classifier.logical_axes()))
    base_specs = jaxpeft.tree.flatten(classifier.logical_axes())
    biases = {path: spec for path, spec in flat.items() if "bitfit_bias" in path}
    assert biases
    for path, spec in biases.items():
        index = path.index("bitfit_bias")
        assert spec == P(*base_specs[path[:index] + ("bias",)]), path
    saved = {path: spec for path, spec in flat.items() if "modules_to_save" in path}
    assert saved
    for path, spec in saved.items():
        index = path.index("modules_to_save")
        assert spec == P(*base_specs[path[:index] + path[index + 2:]]), path

    prompt = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    specs = sharding.param_specs(prompt.params, base.logical_axes())
    assert specs["params"]["prompt_embeddings"]["default"] == P(None, None)  # small: replicated


# -------------------------------------------------------------------------------- 8 simulated devices


@pytest.mark.parametrize("mesh_text, spread", [("data=2,fsdp=4", "fsdp"), ("data=2,tensor=4", "tensor")])
def test_sharded_training_matches_one_device(eight_device_runs, one_device_run, mesh_text, spread):
    import sharding_worker

    assert sharding_worker.TRAIN_MESHES[spread] == mesh_text
    expected, expected_losses = one_device_run
    out = eight_device_runs / spread
    got = np.load(f"{out}.npz")
    np.testing.assert_allclose(got["losses"], expected_losses, rtol=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=1e-5, err_msg=name)

    specs = json.loads(pathlib.Path(f"{out}.json").read_text())
    q = "['params']['model']['layers']['self_attn']['q_proj']"
    assert specs["params"][q + "['kernel']"] == [None, "fsdp", "tensor"]
    assert specs["trainable"][q + "['lora_A']['default']"] == [None, "fsdp", None]
    assert specs["trainable"][q + "['lora_B']['default']"] == [None, None, "tensor"]
    mu = [spec for name, spec in specs["adam_mu"].items() if "q_proj']['lora_A" in name]
    assert mu == [[None, "fsdp", None]]
    # each device really holds a quarter of the axis the mesh splits 4 ways (embed 32, heads 4 x 8)
    shard_a = specs["shard_shapes"][q + "['lora_A']['default']"]
    shard_b = specs["shard_shapes"][q + "['lora_B']['default']"]
    assert (shard_a, shard_b) == (([2, 8, 4], [2, 4, 32]) if spread == "fsdp" else ([2, 32, 4], [2, 4, 8]))


def test_axes_that_do_not_divide_stay_whole(tmp_path):
    code = (
        "import logging, jax, jax.numpy as jnp\n"
        "from jax.sharding import PartitionSpec as P\n"
        "from jaxpeft import sharding\n"
        "logging.basicConfig()\n"
        "mesh = sharding.make_mesh(data=2, tensor=4)\n"
        "s = sharding.param_shardings({'wte': jnp.ones((50, 8))}, mesh, {'wte': P('vocab', 'embed')})\n"
        "print(repr(s['wte'].spec))\n"
        "try:\n"
        "    sharding.shard_batch({'x': jnp.ones((3, 2))}, mesh)\n"
        "except sharding.ShardingError as error:\n"
        "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **EIGHT_DEVICES}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "P(None, 'fsdp')" in done.stdout
    assert "wte (50 over tensor)" in done.stderr
    assert "a global batch of 3 rows cannot be split 2 ways" in done.stdout


def test_checkpoint_of_a_4x2_mesh_restores_on_8x1_and_one_device(eight_device_runs):
    out = eight_device_runs / "restored"
    results = json.loads(pathlib.Path(f"{out}.json").read_text())
    assert results["8x1"]["equal"] and results["one_device"]["equal"]
    assert results["8x1"]["devices"] == [8]
    assert "P(None, 'fsdp', None)" in results["8x1"]["specs"]
    assert results["one_device"]["devices"] == [1]


# ------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(mode: str, *paths) -> None:
    """Runs the worker ``mode`` as processes 0 and 1 of a two-process JAX runtime on 127.0.0.1."""
    port = _free_port()
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, str(WORKER), mode, str(port), str(i), *map(str, paths)], cwd=HERE,
                                env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        outputs = [worker.communicate(timeout=900) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]


def test_two_processes_train_like_one(two_process_runs, one_device_run):
    expected, expected_losses = one_device_run
    out = two_process_runs / "distributed"
    got = np.load(f"{out}.npz")
    assert int(got["processes"]) == 2
    np.testing.assert_allclose(got["losses"], expected_losses, rtol=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def one_device_trainer(tmp_path_factory):
    """The worker's Trainer run on this process's one device: what the sharded runs must reproduce."""
    import sharding_worker

    folder = tmp_path_factory.mktemp("one_device_trainer")
    sharding_worker.trainer_run("none", str(folder / "run"), str(folder / "one"))
    return np.load(folder / "one.npz")


def test_trainer_with_a_mesh_trains_like_one_device(eight_device_runs, one_device_trainer):
    import sharding_worker

    assert sharding_worker.TRAINER_MESH == "data=2,fsdp=4"
    one, mesh = one_device_trainer, np.load(eight_device_runs / "mesh.npz")
    assert int(one["batch"]) == int(mesh["batch"]) == 16  # 8 per device x 1 device x 2 == 1 x 8 devices x 2
    np.testing.assert_allclose(mesh["eval_loss"], one["eval_loss"], rtol=1e-6)
    for name in one.files:
        # Adam divides each gradient by its own root mean square: where a gradient is near zero (LoRA B of the
        # key projection), float reordering across devices shows up as 1e-4 to 5e-4 after three steps (the learning
        # rate, 1e-2, bounds what one step can move an element).
        np.testing.assert_allclose(mesh[name], one[name], atol=1e-3, rtol=1e-4, err_msg=name)


def test_trainer_over_two_processes_checkpoints_and_saves_one_adapter(two_process_runs, one_device_trainer):
    import sharding_worker

    run = two_process_runs / "run"
    one, two = one_device_trainer, np.load(two_process_runs / "two.npz")
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-6)
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], atol=1e-3, rtol=1e-4, err_msg=name)  # Adam: see above
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == [str(sharding_worker.STEPS)]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [record["step"] for record in records if "loss" in record]
    assert losses == sorted(set(losses)) and losses  # one writer: each training record once
    _, fresh = sharding_worker.peft_model()
    loaded = jaxpeft.PeftModel.from_pretrained(fresh.base_model, str(run / "adapter"))
    trained = jaxpeft.partition(loaded.params, fresh.trainable_mask)[0]
    for name, leaf in sharding_worker.flat(trained).items():
        np.testing.assert_allclose(np.asarray(leaf), two[name], rtol=1e-6, err_msg=name)
