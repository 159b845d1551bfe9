"""Quantized frozen bases (QLoRA): NF4/FP4 equal to bitsandbytes, int8/int4 equal to a hand computation, every
method on quantized layers of jaxpeft's Llama and of a model written the way other JAX libraries write theirs,
training that leaves the packed base untouched, merging, scanned layers, sharding and checkpoints."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
import transformers
from third_party_models import Transformer

import jaxpeft
from jaxpeft import quantization, training
from jaxpeft.models import AutoModelForCausalLM

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(96, 64), (70, 33), (5, 7), (300, 256)]  # torch (out, in); 70x33 and 5x7 end in a partial block
TOKENS = np.array([[1, 5, 9, 2, 7, 3, 4, 8], [6, 2, 11, 3, 1, 9, 10, 5]], np.int32)


def bnb_reference(weight: np.ndarray, quant_type: str, double_quant: bool, block_size: int = 64):
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(weight), blocksize=block_size,
                                                 quant_type=quant_type, compress_statistics=double_quant)
    return packed, state, bnb_functional.dequantize_4bit(packed, state).numpy()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [64, 128])
def test_4bit_codes_and_values_equal_bitsandbytes(quant_type, shape, block_size):
    weight = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32) * 2
    packed, state, expected = bnb_reference(weight, quant_type, False, block_size)
    quantized = quantization.quantize_array(weight.T, jaxpeft.QuantizationConfig(quant_type, block_size))
    np.testing.assert_array_equal(np.asarray(quantized.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(quantized.scales), state.absmax.numpy())
    if block_size != 64:  # the CPU build's dequantize_4bit reads other block sizes wrongly: its codes by hand
        codes = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15], -1).reshape(-1)
        table = bnb_functional.get_4bit_type(quant_type, device="cpu").numpy()
        values = np.pad(table[codes][:weight.size], (0, -weight.size % block_size)).reshape(-1, block_size)
        expected = (values * state.absmax.numpy()[:, None]).reshape(-1)[:weight.size].reshape(shape)
    np.testing.assert_array_equal(np.asarray(quantized.dequantize()).T, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 64), (70, 33), (1000, 515)])
def test_double_quantization_matches_bitsandbytes(quant_type, shape):
    """bitsandbytes' stored statistics dequantize to its values bit for bit; quantizing ourselves gives its nested
    codes except where the float32 mean of the absmax values (summed in another order than torch's) moves a
    value across a code boundary."""
    weight = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32) * 3
    packed, state, expected = bnb_reference(weight, quant_type, True)
    theirs = quantization.QuantizedArray(
        codes=jnp.asarray(packed.numpy().reshape(-1)), scales=jnp.asarray(state.absmax.numpy()),
        nested_scales=jnp.asarray(state.state2.absmax.numpy()), offset=jnp.asarray(state.offset.numpy()),
        quant_type=quant_type, block_size=64, stored_shape=shape, perm=(0, 1))
    np.testing.assert_array_equal(np.asarray(theirs.dequantize()), expected)
    np.testing.assert_array_equal(quantization.DYNAMIC_CODE, state.state2.code.numpy())

    ours = quantization.quantize_array(weight.T, jaxpeft.QuantizationConfig(quant_type, double_quant=True))
    np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(ours.offset), state.offset.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.nested_scales), state.state2.absmax.numpy(), rtol=1e-6)
    same = np.mean(np.asarray(ours.scales) == state.absmax.numpy())
    assert same >= 0.98, same
    absmax_error = np.abs(np.asarray(quantization.dequantize(ours)).T - expected).max()
    assert absmax_error <= 0.02 * np.abs(weight).max()


@pytest.mark.parametrize("quant_type,levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block_size", [None, 32])
def test_integer_types_equal_a_hand_computation(quant_type, levels, block_size):
    kernel = np.random.default_rng(3).normal(size=(64, 24)).astype(np.float32)  # (in, out)
    rows = kernel.T  # each output row in blocks of `block` input values
    block = block_size or rows.shape[1]
    blocks = rows.reshape(rows.shape[0], -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / levels
    expected = (np.clip(np.round(blocks / scale), -levels, levels) * scale).reshape(rows.shape).T
    quantized = quantization.quantize_array(kernel, jaxpeft.QuantizationConfig(quant_type, block_size))
    np.testing.assert_allclose(np.asarray(quantized.dequantize()), expected, rtol=1e-6, atol=1e-7)
    bits = 8 if quant_type == "int8" else 4
    assert np.asarray(quantized.codes).nbytes == kernel.size * bits // 8


def test_bad_configs_and_weights_get_one_line_errors():
    for options, message in [({"quant_type": "nf3"}, "quant_type must be one of"),
                             ({"quant_type": "nf4", "block_size": None}, "needs a block_size"),
                             ({"block_size": 48}, "block_size must be one of"),
                             ({"quant_type": "int8", "double_quant": True}, "double_quant applies to nf4")]:
        with pytest.raises(ValueError, match=message) as error:
            jaxpeft.QuantizationConfig(**options)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="only float weights"):
        quantization.quantize_array(jnp.ones((4, 4), jnp.int32), jaxpeft.QuantizationConfig())


# ------------------------------------------------------------------------------------- models and methods


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(config, seed=2)


@pytest.fixture(scope="module")
def saved_llama(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(folder)
    return str(folder)


def test_loading_quantizes_kernels_only_and_equals_quantizing_after(llama, saved_llama):
    qconfig = jaxpeft.QuantizationConfig("nf4", double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=qconfig)
    paths = {".".join(path) for path in quantization.quantized_paths(model.params)}
    assert len(paths) == 2 * 7 and all(path.endswith("kernel") for path in paths)
    assert not any("lm_head" in path or "embed" in path or "norm" in path for path in paths)
    ours = jaxpeft.quantize(llama.params, qconfig)
    np.testing.assert_array_equal(model(TOKENS).logits, llama(TOKENS, params=ours).logits)
    sizes = quantization.parameter_bytes(model.params)
    assert sizes["quantized"] <= 0.3 * sizes["quantized_as_bf16"]


def adapted(config, apply_fn, variables, args):
    with_adapters = jaxpeft.init_adapters(jax.random.key(1), config, apply_fn, variables, *args)
    return jax.jit(jaxpeft.rewrite(apply_fn, config)), with_adapters


THIRD_PARTY_TARGETS = ["attn_vec_einsum", "mlp"]
METHODS = {
    "lora": jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "dora": jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=True),
    "ia3": jaxpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "bottleneck": jaxpeft.AdapterConfig(target_modules=["mlp"], reduction_factor=8, init_weights=False),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_quantized_llama_equals_it_on_the_dequantized_weights(llama, method):
    quantized = jaxpeft.quantize(llama.params, jaxpeft.QuantizationConfig("nf4"))
    config = METHODS[method]
    apply_fn, on_quantized = adapted(config, llama.module.apply, quantized, (TOKENS,))
    _, on_float = adapted(config, llama.module.apply, quantization.dequantize_tree(quantized), (TOKENS,))
    np.testing.assert_allclose(apply_fn(on_quantized, TOKENS).logits, apply_fn(on_float, TOKENS).logits,
                               atol=2e-5)


@pytest.mark.parametrize("model,method", [(Transformer(moe=True, scan=True, remat=True), "lora"),
                                          (Transformer(), "dora"), (Transformer(), "ia3")],
                         ids=["lora-moe_scanned_remat", "dora-einsum_modules", "ia3-einsum_modules"])
def test_a_third_party_model_with_quantized_raw_parameters(model, method):
    tokens = jnp.asarray(TOKENS[:, :6])
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    quantized = jaxpeft.quantize(variables, jaxpeft.QuantizationConfig("int4", block_size=None),
                                 target_modules=r".*(einsum|mlp).*")
    assert len(quantization.quantized_paths(quantized)) >= 5
    config = {"lora": jaxpeft.LoraConfig(r=2, target_modules=THIRD_PARTY_TARGETS, init_lora_weights=False),
              "dora": jaxpeft.LoraConfig(r=2, target_modules=THIRD_PARTY_TARGETS, init_lora_weights=False,
                                         use_dora=True),
              "ia3": jaxpeft.IA3Config(target_modules=THIRD_PARTY_TARGETS, feedforward_modules=[])}[method]
    apply_fn, on_quantized = adapted(config, model.apply, quantized, (tokens,))
    _, on_float = adapted(config, model.apply, quantization.dequantize_tree(quantized), (tokens,))
    np.testing.assert_allclose(apply_fn(on_quantized, tokens), apply_fn(on_float, tokens), atol=2e-5)
    if method != "ia3":  # IA3 starts as the identity
        assert not np.allclose(apply_fn(on_quantized, tokens), model.apply(quantized, tokens), atol=1e-4)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_qlora_steps_leave_the_packed_base_bit_identical_and_learn(llama, quant_type):
    quantized = jaxpeft.quantize(llama.params, jaxpeft.QuantizationConfig(quant_type))
    config = jaxpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    apply_fn, variables = adapted(config, llama.module.apply, quantized, (TOKENS,))
    mask = jaxpeft.trainable_mask(variables, config)
    trainable, frozen = jaxpeft.partition(variables, mask)
    packed_before = jax.tree.map(np.array, frozen)

    def loss_fn(params, batch, rng):
        logits = apply_fn(params, batch[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    optimizer = optax.adam(3e-2)
    state = training.init_train_state(variables, mask, optimizer)
    step = training.make_train_step(loss_fn, optimizer, frozen)
    losses = []
    for _ in range(8):
        state, metrics = step(state, jnp.asarray(TOKENS))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0]
    jax.tree.map(np.testing.assert_array_equal, packed_before, jax.tree.map(np.array, frozen))
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.dtype.name, state.trainable))) == {"float32"}


def test_scanned_layers_equal_unrolled_layers(llama, saved_llama):
    qconfig = jaxpeft.QuantizationConfig("fp4", double_quant=True)
    unrolled = AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=qconfig)
    scanned = AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=qconfig, scan_layers=True)
    kernel = scanned.params["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.stack_shape == (2,) and kernel.shape == (2, 64, 64)
    np.testing.assert_allclose(scanned(TOKENS).logits, unrolled(TOKENS).logits, atol=1e-5)
    config = jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_scanned = jaxpeft.get_peft_model(scanned, config)
    peft_unrolled = jaxpeft.get_peft_model(unrolled, config)
    assert np.abs(peft_scanned(TOKENS).logits - scanned(TOKENS).logits).max() > 1e-3
    assert peft_unrolled(TOKENS).logits.shape == peft_scanned(TOKENS).logits.shape


def test_merge_returns_a_float_model_or_requantizes_and_says_how_far(llama, caplog):
    quantized = jaxpeft.quantize(llama.params, jaxpeft.QuantizationConfig("nf4"))
    config = jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    apply_fn, variables = adapted(config, llama.module.apply, quantized, (TOKENS,))
    expected = apply_fn(variables, TOKENS).logits

    merged = jaxpeft.merge(variables, config)
    assert not quantization.quantized_paths(merged)
    np.testing.assert_allclose(llama.module.apply(merged, TOKENS).logits, expected, atol=2e-5)

    with caplog.at_level(logging.WARNING, logger="jaxpeft.core"):
        requantized = jaxpeft.merge(variables, config, requantize=True)
    assert len(quantization.quantized_paths(requantized)) == 14
    warnings = [record.getMessage() for record in caplog.records if "re-quantizing the merged" in record.getMessage()]
    assert len(warnings) == 4 and "q_proj.kernel changed it by up to" in warnings[0]
    merged_kernel = merged["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    again = requantized["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    reported = float(warnings[0].rsplit("up to ", 1)[1].split(" ")[0])
    measured = float(np.abs(np.asarray(again.dequantize()) - np.asarray(merged_kernel)).max())
    assert measured == pytest.approx(reported, rel=1e-2) and measured > 0


# ------------------------------------------------------------------------- sharding, checkpoints, the CLI


SHARDED = """
import json, sys, jax, jax.numpy as jnp, numpy as np, transformers
import jaxpeft
from jaxpeft import quantization, sharding
from jaxpeft.models import AutoModelForCausalLM
config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
model = AutoModelForCausalLM.from_config(config, seed=2, scan_layers=True)
peft = jaxpeft.get_peft_model(model, jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
params = jaxpeft.quantize(peft.params, jaxpeft.QuantizationConfig("nf4", double_quant=True))
tokens = jnp.asarray(np.arange(32).reshape(4, 8) % 64)
expected = np.asarray(peft(tokens, params=params).logits)
mesh = sharding.make_mesh(data=2, fsdp=4)
placed = sharding.shard_params(params, mesh, model.logical_axes())
codes = placed["params"]["model"]["layers"]["mlp"]["down_proj"]["kernel"].codes
got = np.asarray(jax.jit(lambda p, t: peft(t, params=p).logits)(placed, tokens))
print(json.dumps({"spec": str(codes.sharding.spec), "devices": len(codes.sharding.device_set),
                  "shard": list(codes.addressable_shards[0].data.shape), "full": list(codes.shape),
                  "error": float(np.abs(got - expected).max())}))
"""


def test_quantized_weights_shard_over_eight_devices():
    done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["error"] < 1e-5
    assert result["shard"][1] * 4 == result["full"][1], result  # the flat codes split by output rows over fsdp


def test_trainer_resumes_a_qlora_run_exactly(llama, saved_llama, tmp_path):
    data = [{"input_ids": list(row), "labels": list(row)} for row in np.tile(TOKENS, (4, 1))]

    def run(folder, steps):
        base = AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=jaxpeft.QuantizationConfig())
        model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
        args = jaxpeft.TrainingArguments(folder, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                         save_steps=2, logging_steps=1, disable_tqdm=True, seed=1,
                                         lr_scheduler_type="constant")  # so a 2-step run is the 4-step run's start
        trainer = jaxpeft.Trainer(model=model, args=args, train_dataset=data)
        return trainer, model

    whole, whole_model = run(tmp_path / "whole", 4)
    whole.train()
    first, _ = run(tmp_path / "resumed", 2)
    first.train()
    resumed, resumed_model = run(tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=True)
    losses = [[r["loss"] for r in t.log_history if "loss" in r] for t in (whole, resumed)]
    assert losses[0][-2:] == losses[1][-2:], losses
    trained = [jaxpeft.partition(m.params, m.trainable_mask)[0] for m in (whole_model, resumed_model)]
    jax.tree.map(np.testing.assert_array_equal, *trained)
    assert losses[0][-1] < losses[0][0]


def test_cli_trains_on_a_4bit_base_and_evaluates_with_it(saved_llama, tmp_path, monkeypatch, capsys):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": "a b c d e f g h"}) + "\n" for _ in range(8)))
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({chr(97 + i): i for i in range(26)} | {"[UNK]": 26},
                                                             unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer_folder = tmp_path / "tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(tokenizer_folder)
    run = tmp_path / "run"
    from jaxpeft import cli

    loaded = []
    load_model = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: loaded.append(kwargs) or load_model(*args, **kwargs))
    code = cli.main(["train", "--model", saved_llama, "--tokenizer", str(tokenizer_folder), "--task", "causal_lm",
                     "--method", "lora", "--r", "4", "--target-modules", "q_proj,v_proj", "--train-file",
                     str(train_file), "--output-dir", str(run), "--max-steps", "2", "--quantize", "nf4",
                     "--double-quant", "--save-strategy", "no", "--packing", "--max-length", "24",
                     "--batch-size", "2", "--remat-policy", "full"])
    assert code == 0 and loaded[0]["remat_policy"] == "full"
    recorded = json.loads((run / "jaxpeft_run.json").read_text())
    assert recorded["quantization"]["quant_type"] == "nf4" and recorded["quantization"]["double_quant"] is True
    # --packing: the eight lines packed into rows of --max-length 24 tokens
    assert recorded["training_arguments"]["packing"] is True and recorded["training_arguments"]["max_length"] == 24
    assert cli.main(["train", "--model", saved_llama, "--task", "causal_lm", "--method", "lora", "--train-file",
                     str(train_file), "--output-dir", str(tmp_path / "bad"), "--double-quant"]) == 2
    capsys.readouterr()
    assert cli.main(["train", "--model", saved_llama, "--task", "causal_lm", "--method", "lora", "--train-file",
                     str(train_file), "--output-dir", str(tmp_path / "bad"), "--remat-policy", "some"]) == 2
    error = capsys.readouterr().err
    assert "--remat-policy: Unknown remat_policy 'some'; choose one of" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_merging_into_a_plain_integer_kernel_is_refused_not_rounded():
    import flax.linen as nn

    model = nn.Dense(8)
    variables = model.init(jax.random.key(0), jnp.ones((1, 16)))
    variables = {"params": {"kernel": (variables["params"]["kernel"] * 10).astype(jnp.int8),
                            "bias": variables["params"]["bias"]}}
    config = jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    adapted_variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, variables, jnp.ones((1, 16)))
    with pytest.raises(jaxpeft.AdapterError, match="kernel holds integers: merging would round the adapter away"):
        jaxpeft.merge(adapted_variables, config)


def test_pissa_on_a_quantized_base_keeps_the_residual_quantized(llama):
    quantized = jaxpeft.quantize(llama.params, jaxpeft.QuantizationConfig("nf4"))
    config = jaxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    variables = jaxpeft.init_adapters(jax.random.key(1), config, llama.module.apply, quantized, TOKENS)
    layer = variables["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
    original = quantized["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert quantization.is_quantized(layer["kernel"])
    principal = (layer["lora_A"]["default"] @ layer["lora_B"]["default"]) * layer["lora_scaling"]["default"]
    residual = np.asarray(original.dequantize()) - np.asarray(principal)
    requantized = quantization.quantize_array(residual, jaxpeft.QuantizationConfig("nf4"))
    np.testing.assert_array_equal(np.asarray(layer["kernel"].dequantize()), np.asarray(requantized.dequantize()))
