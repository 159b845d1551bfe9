"""bitsandbytes checkpoints: folders saved by transformers + bitsandbytes load quantized in jaxpeft with torch's
logits, QLoRA adapters move both ways between torch PEFT and jaxpeft, and quantized jaxpeft models save back to
folders that transformers + bitsandbytes load.

bitsandbytes' CPU fast path (machines with AVX512-BF16) multiplies 4-bit layers in bfloat16 whatever the compute
dtype (about 2e-3 off on these logits); the torch references here take its exact path (dequantize, then a float32
matmul), the one GPUs take.
"""

from __future__ import annotations

import dataclasses
import doctest
import gc
import json
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import jaxpeft
from jaxpeft import quantization
from jaxpeft.models import AutoModelForCausalLM, bnb, hub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

IDS = np.array([[1, 5, 9, 17, 33, 64, 100, 127], [3, 2, 90, 45, 12, 7, 0, 88]])
FOUR_BIT = {"nf4": ("nf4", False), "fp4": ("fp4", False), "nf4_dq": ("nf4", True), "fp4_dq": ("fp4", True)}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOLERANCE = 1e-4
# LLM.int8 in bitsandbytes also rounds every activation row to int8 (a step of 1/127 of the row's absmax) and
# multiplies in float16: about 1% of the largest logit here. jaxpeft multiplies by the int8 weights exactly,
# which a torch model holding those dequantized weights matches within TOLERANCE.
INT8_TOLERANCE = 0.03


def _exact_cpu_path(model):
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _torch_quantized(folder, config=None):
    kwargs = {} if config is None else {"quantization_config": config}
    return _exact_cpu_path(transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs))


_dequantize = jax.jit(quantization.dequantize)


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _quantized_leaves(model) -> dict:
    flat = flatten_dict(model.params["params"])
    return {path: leaf for path, leaf in flat.items() if quantization.is_quantized(leaf)}


def _assert_same_leaves(left, right) -> None:
    assert left.keys() == right.keys()
    for path in left:
        a, b = left[path], right[path]
        assert jax.tree.structure(a) == jax.tree.structure(b), path
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float Llama checkpoint, the bnb folders transformers saves from it (4-bit kinds and 8-bit), and the
    logits of each torch model (the torch models themselves are freed)."""
    root = tmp_path_factory.mktemp("bnb")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "float")
    paths, logits = {"float": root / "float"}, {}
    for name, (quant_type, double_quant) in FOUR_BIT.items():
        model = _torch_quantized(root / "float", transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32))
        model.save_pretrained(root / name)
        paths[name], logits[name] = root / name, _torch_logits(model)
    model = _torch_quantized(root / "float", transformers.BitsAndBytesConfig(load_in_8bit=True))
    model.save_pretrained(root / "int8")
    paths["int8"], logits["int8"] = root / "int8", _torch_logits(model)
    del model
    gc.collect()
    return paths, logits


@pytest.mark.parametrize("name", list(FOUR_BIT))
def test_bnb_4bit_folder_loads_quantized_with_torch_logits(folders, name):
    paths, logits = folders
    model = AutoModelForCausalLM.from_pretrained(paths[name], scan_layers=name == "nf4_dq")
    quant_type, double_quant = FOUR_BIT[name]
    assert model.quantization_config == jaxpeft.QuantizationConfig(quant_type, 64, double_quant=double_quant,
                                                                   compute_dtype="float32")
    quantized = _quantized_leaves(model)
    assert sorted(path[-2] for path in quantized) == sorted(LINEAR * (1 if name == "nf4_dq" else 2))
    assert all(leaf.quant_type == quant_type and (leaf.nested_scales is not None) == double_quant
               for leaf in quantized.values())
    params = model.params["params"]
    assert not quantization.is_quantized(params["lm_head"]["kernel"])
    assert params["model"]["embed_tokens"]["embedding"].dtype == np.float32
    difference = _diff(model(IDS).logits, logits[name])
    print(f"\n{name} (scan_layers={name == 'nf4_dq'}): max |jaxpeft - torch+bnb| logits = {difference:.3g}")
    assert difference < TOLERANCE


def test_bnb_8bit_folder_loads_quantized(folders):
    paths, logits = folders
    model = AutoModelForCausalLM.from_pretrained(paths["int8"])
    assert model.quantization_config == jaxpeft.QuantizationConfig("int8", None)
    quantized = _quantized_leaves(model)
    assert len(quantized) == 2 * len(LINEAR) and all(leaf.codes.dtype == np.int8 for leaf in quantized.values())
    reference = transformers.AutoModelForCausalLM.from_pretrained(paths["float"])
    tensors = hub.read_checkpoint_tensors(str(paths["int8"]))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            module = name.removesuffix(".weight")
            if f"{module}.SCB" in tensors:  # the weights bitsandbytes holds: int8 codes * SCB / 127
                weight = tensors[name].astype(np.float32) * (tensors[f"{module}.SCB"][:, None] / np.float32(127))
                parameter.copy_(torch.from_numpy(weight))
    ours = np.asarray(model(IDS).logits)
    exact, bnb_int8 = _diff(ours, _torch_logits(reference)), _diff(ours, logits["int8"])
    print(f"\nint8: max |jaxpeft - torch(int8 weights dequantized)| = {exact:.3g}, max |jaxpeft - torch+bnb "
          f"LLM.int8| = {bnb_int8:.3g} (largest logit {np.abs(ours).max():.3g})")
    assert exact < TOLERANCE
    assert bnb_int8 < INT8_TOLERANCE * np.abs(ours).max()


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_jaxpeft_quantizes_like_bitsandbytes(folders, name):
    paths, _ = folders
    ours = _quantized_leaves(AutoModelForCausalLM.from_pretrained(
        paths["float"], quantization_config=jaxpeft.QuantizationConfig(name)))
    _assert_same_leaves(ours, _quantized_leaves(AutoModelForCausalLM.from_pretrained(paths[name])))


def test_double_quant_differs_from_bitsandbytes_only_by_the_mean_offset(folders):
    """bitsandbytes' double quantization subtracts the mean of the block absmax values, a float32 sum in torch's
    CPU reduction order; jaxpeft's mean (XLA's order) may differ in the last bit, which can move an absmax value to
    the neighbouring 8-bit code. The 4-bit codes are the same."""
    paths, _ = folders
    ours = _quantized_leaves(AutoModelForCausalLM.from_pretrained(
        paths["float"], quantization_config=jaxpeft.QuantizationConfig("nf4", double_quant=True)))
    theirs = _quantized_leaves(AutoModelForCausalLM.from_pretrained(paths["nf4_dq"]))
    offsets, weights = [], []
    for path, leaf in ours.items():
        other = theirs[path]
        assert np.array_equal(leaf.codes, other.codes)
        offset = abs(float(leaf.offset) - float(other.offset))
        assert offset <= other.scales.size * np.finfo(np.float32).eps * float(other.offset)  # a sum's reordering
        offsets.append(offset > 0)
        steps = np.abs(np.asarray(leaf.scales, np.int32) - np.asarray(other.scales, np.int32))
        assert steps.max() <= 1  # indices into the sorted dynamic code: neighbours at most
        weights.append(_diff(_dequantize(leaf), _dequantize(other)))
    print(f"\nnf4 double quant: {sum(offsets)}/{len(offsets)} mean offsets differ in the last bit; "
          f"{sum(w > 0 for w in weights)}/{len(weights)} dequantized weights differ, by up to {max(weights):.3g}")


@pytest.fixture(scope="module")
def torch_adapter(folders, tmp_path_factory):
    """A torch PEFT LoRA adapter (B nonzero) on the 4-bit nf4 model, saved, and its logits."""
    paths, _ = folders
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_torch_quantized(paths["nf4"]), config)
    folder = tmp_path_factory.mktemp("torch_adapter")
    model.save_pretrained(folder)
    logits = _torch_logits(model)
    del model
    gc.collect()
    return folder, logits


def test_torch_qlora_adapter_loads_in_jaxpeft(folders, torch_adapter):
    paths, logits = folders
    folder, adapter_logits = torch_adapter
    model = jaxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["nf4"]), folder)
    ours = np.asarray(model(IDS).logits)
    difference = _diff(ours, adapter_logits)
    print(f"\nnf4 + torch LoRA adapter: max |jaxpeft - torch PEFT| logits = {difference:.3g} "
          f"(the adapter moves them by {_diff(adapter_logits, logits['nf4']):.3g})")
    assert difference < TOLERANCE
    assert _diff(adapter_logits, logits["nf4"]) > 100 * TOLERANCE


def test_jaxpeft_qlora_adapter_loads_in_torch_peft(folders, tmp_path):
    paths, logits = folders
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(paths["nf4_dq"]), config, seed=3)
    model.save_pretrained(tmp_path)
    ours = np.asarray(model(IDS).logits)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(_torch_quantized(paths["nf4_dq"]), tmp_path))
    difference = _diff(ours, theirs)
    print(f"\nnf4 double quant + jaxpeft LoRA adapter: max |torch PEFT - jaxpeft| logits = {difference:.3g} "
          f"(the adapter moves them by {_diff(ours, logits['nf4_dq']):.3g})")
    assert difference < TOLERANCE
    assert _diff(ours, logits["nf4_dq"]) > 100 * TOLERANCE


def _tensors_and_states(folder) -> dict:
    """The tensors of a folder, each quant_state as its JSON object."""
    tensors = hub.read_checkpoint_tensors(str(folder))
    return {name: bnb.parse_quant_state(value, name) if ".quant_state." in name else value
            for name, value in tensors.items()}


@pytest.mark.parametrize("name", ["nf4", "fp4_dq", "int8"])
def test_bnb_folder_saves_back_unchanged(folders, name, tmp_path):
    paths, logits = folders
    model = AutoModelForCausalLM.from_pretrained(paths[name], scan_layers=name == "fp4_dq")
    model.save_pretrained(tmp_path)
    original, saved = _tensors_and_states(paths[name]), _tensors_and_states(tmp_path)
    assert original.keys() == saved.keys()
    for key, value in original.items():
        if isinstance(value, dict):
            assert value == saved[key], key
        else:
            assert value.dtype == saved[key].dtype and np.array_equal(value, saved[key]), key
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["llm_int8_skip_modules"] == ["lm_head"]  # transformers' default (None) in full
    assert bnb.to_quantization_config(written) == dataclasses.replace(bnb.to_quantization_config(
        json.loads((paths[name] / "config.json").read_text())["quantization_config"]), skip_modules=("lm_head",))
    assert _diff(_torch_logits(_torch_quantized(tmp_path)), logits[name]) == 0.0
    _assert_same_leaves(_quantized_leaves(AutoModelForCausalLM.from_pretrained(tmp_path, scan_layers=name == "fp4_dq")),
                        _quantized_leaves(model))


@pytest.mark.parametrize("qconfig", [
    jaxpeft.QuantizationConfig("nf4"), jaxpeft.QuantizationConfig("fp4", double_quant=True),
    jaxpeft.QuantizationConfig("int8", block_size=None)], ids=["nf4", "fp4_dq", "int8"])
def test_jaxpeft_quantized_model_saves_for_transformers(folders, qconfig, tmp_path):
    paths, _ = folders
    model = AutoModelForCausalLM.from_pretrained(paths["float"], quantization_config=qconfig)
    model.save_pretrained(tmp_path)
    ours = np.asarray(model(IDS).logits)
    difference = _diff(ours, _torch_logits(_torch_quantized(tmp_path)))
    label = quantization.describe(qconfig)
    print(f"\njaxpeft {label} saved, loaded by transformers+bnb: max |torch - jaxpeft| logits = {difference:.3g}")
    assert difference < (INT8_TOLERANCE * np.abs(ours).max() if qconfig.quant_type == "int8" else TOLERANCE)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_leaves(_quantized_leaves(reloaded), _quantized_leaves(model))
    assert reloaded.quantization_config.quant_type == qconfig.quant_type


@pytest.mark.parametrize("qconfig", [jaxpeft.QuantizationConfig("int4", block_size=32),
                                     jaxpeft.QuantizationConfig("int8", block_size=32)], ids=["int4", "int8_groups"])
def test_weights_bitsandbytes_cannot_store_are_refused(folders, qconfig, tmp_path):
    paths, _ = folders
    model = AutoModelForCausalLM.from_pretrained(paths["float"], quantization_config=qconfig)
    with pytest.raises(ValueError, match="save a float model") as error:
        model.save_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_gguf_types_are_refused():
    leaf = quantization.QuantizedArray(codes=np.zeros(32, np.uint8), scales=np.ones(2, np.float32),
                                       offsets=np.zeros(2, np.float32), quant_type="uint4", block_size=32,
                                       stored_shape=(8, 8), perm=(0, 1))
    with pytest.raises(ValueError, match="uint4 weight .*save a float model"):
        bnb.to_bnb_tensors({"layer.weight": leaf})


def test_merged_float_model_saves_without_quantization_config(folders, tmp_path):
    paths, _ = folders
    model = AutoModelForCausalLM.from_pretrained(paths["nf4"])
    model.params = jax.jit(quantization.dequantize_tree)(model.params)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not quantization.has_quantized(AutoModelForCausalLM.from_pretrained(tmp_path).params)


def test_gpt2_conv1d_weights_load_and_save(tmp_path):
    """bitsandbytes stores GPT-2's Conv1D weights as the equivalent Linear's (out, in). (Rows of at least one
    block: bitsandbytes' native CPU dequantize kernel misplaces blocks that straddle shorter rows, while its generic
    one agrees with jaxpeft.)"""
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "float")
    torch_model = _torch_quantized(tmp_path / "float", transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    torch_model.save_pretrained(tmp_path / "nf4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    difference = _diff(model(IDS).logits, _torch_logits(torch_model))
    print(f"\ngpt2 nf4 (Conv1D): max |jaxpeft - torch+bnb| logits = {difference:.3g}")
    assert difference < TOLERANCE
    assert {path[-2] for path in _quantized_leaves(model)} == {"c_attn", "c_proj", "c_fc"}
    model.save_pretrained(tmp_path / "saved")
    original, saved = _tensors_and_states(tmp_path / "nf4"), _tensors_and_states(tmp_path / "saved")
    assert original.keys() <= saved.keys()  # jaxpeft writes GPT-2's tied lm_head too
    assert all(np.array_equal(value, saved[key]) if isinstance(value, np.ndarray) else value == saved[key]
               for key, value in original.items())


def _broken_copy(source, target, drop: str = "", state: dict | None = None, config: dict | None = None):
    shutil.copytree(source, target)
    tensors = hub.read_checkpoint_tensors(str(source))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors.pop(f"{name}.{drop}", None)
    if state is not None:
        key = next(k for k in tensors if k.startswith(f"{name}.quant_state."))
        tensors[key] = np.frombuffer(json.dumps({**bnb.parse_quant_state(tensors[key], key), **state}).encode(),
                                     np.uint8).copy()
    hub.write_safetensors(tensors, str(target / hub.SAFETENSORS_FILE))
    if config is not None:
        written = json.loads((target / "config.json").read_text())
        written["quantization_config"].update(config)
        (target / "config.json").write_text(json.dumps(written))
    return target


@pytest.mark.parametrize("broken, message", [
    ({"drop": "absmax"}, r"missing tensor model\.layers\.0\.self_attn\.q_proj\.weight\.absmax"),
    ({"drop": "nested_absmax"}, r"missing tensor model\.layers\.0\.self_attn\.q_proj\.weight\.nested_absmax"),
    ({"state": {"quant_type": "xf4"}}, r"q_proj\.weight\.quant_state\.bitsandbytes__nf4: unknown quant_type 'xf4'"),
    ({"config": {"bnb_4bit_quant_type": "xf4"}}, r"quantization_config\.bnb_4bit_quant_type 'xf4'"),
    ({"config": {"quant_method": "gptq"}}, r"quant_method 'gptq' is not supported"),
], ids=["absmax", "nested_absmax", "quant_state_type", "config_type", "method"])
def test_broken_bnb_folder_is_a_one_line_error(folders, tmp_path, broken, message):
    paths, _ = folders
    folder = _broken_copy(paths["nf4_dq"], tmp_path / "broken", **broken)
    with pytest.raises(ValueError, match=message) as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_other_code_book_is_refused(folders, tmp_path):
    paths, _ = folders
    folder = _broken_copy(paths["nf4"], tmp_path / "broken")
    tensors = hub.read_checkpoint_tensors(str(folder))
    tensors["model.layers.1.mlp.up_proj.weight.quant_map"] = np.linspace(-1, 1, 16, dtype=np.float32)
    hub.write_safetensors(tensors, str(folder / hub.SAFETENSORS_FILE))
    with pytest.raises(ValueError, match=r"up_proj\.weight\.quant_map: a code book other than") as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_compute_dtype_from_the_checkpoint_unless_param_dtype(folders, tmp_path):
    paths, _ = folders
    folder = _broken_copy(paths["nf4"], tmp_path / "bf16", config={"bnb_4bit_compute_dtype": "bfloat16"})
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert {leaf.dtype for leaf in _quantized_leaves(model).values()} == {np.dtype(jax.numpy.bfloat16)}
    assert model.params["params"]["model"]["norm"]["scale"].dtype == np.float32
    assert model.quantization_config.compute_dtype == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(folder, param_dtype="float32")
    assert {leaf.dtype for leaf in _quantized_leaves(model).values()} == {np.dtype(np.float32)}
    assert model.quantization_config.compute_dtype == "float32"


def test_bnb_docstring_examples():
    result = doctest.testmod(bnb, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_quantization_config_of_a_bnb_config():
    written = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                              llm_int8_skip_modules=["lm_head"]).to_dict()
    assert bnb.to_quantization_config(written) == jaxpeft.QuantizationConfig(
        "nf4", 64, double_quant=True, compute_dtype="bfloat16", skip_modules=("lm_head",))
    assert bnb.to_quantization_config(transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict()).quant_type == "int8"
    assert bnb.int8_row_absmax(np.float32([3.0]) / np.float32(127)) == np.float32(3.0)
