"""LoRA adapter folders in the Hugging Face PEFT format, checked against torch PEFT both ways.

jaxpeft -> torch: an adapter made in jaxpeft (scanned and unscanned layers), written by ``save_adapter``, must load
into torch ``PeftModel.from_pretrained`` with exactly the keys torch PEFT expects and give jaxpeft's logits.
torch -> jaxpeft: an adapter written by torch ``save_pretrained`` must give torch's logits after ``load_adapter``.
"""

import dataclasses
import json
import os
import warnings

import flax.linen as flax_nn
import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxpeft
from jaxpeft.config import ConfigError
from jaxpeft.hf_format import config_from_hf_dict, config_to_hf_dict, load_adapter, save_adapter
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification
from jaxpeft.tree import SAVED_MODULES_KEY, flatten, unflatten_like

MODEL_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                            pad_token_id=0),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                              pad_token_id=0),
    "bert": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=99, num_labels=3),
}
TORCH_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
                 "seq_cls": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}
# family -> (head, LoRA options shared by jaxpeft's and torch's config). Each covers other options: rank_pattern,
# alpha_pattern, rsLoRA, layers_to_transform (uncovered layers of a scanned stack), modules_to_save, embeddings.
CASES = {
    "gpt2": ("causal_lm", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"],
                               rank_pattern={"c_proj": 2})),
    "llama": ("seq_cls", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                              alpha_pattern={"v_proj": 16}, layers_to_transform=[0, 2], modules_to_save=["score"])),
    "bert": ("seq_cls", dict(r=4, lora_alpha=16, target_modules=["query", "value", "output.dense"],
                             rank_pattern={"value": 2}, use_rslora=True, modules_to_save=["classifier"])),
}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
SCANS = pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """family -> folder of a tiny random transformers torch model of that family's head in CASES."""
    folders = {}
    for family, make_config in MODEL_CONFIGS.items():
        torch.manual_seed(0)
        config = make_config()
        config._attn_implementation = "eager"
        folder = tmp_path_factory.mktemp(f"{family}-base")
        TORCH_CLASSES[CASES[family][0]].from_config(config).eval().save_pretrained(folder)
        folders[family] = folder
    return folders


def _torch_model(folder, head):
    return TORCH_CLASSES[head].from_pretrained(folder, attn_implementation="eager").eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def _jax_logits(model, variables, config, adapter_name="default"):
    apply = jax.jit(jaxpeft.rewrite(model.apply_fn, {adapter_name: config}))
    output = apply(variables, IDS, MASK)
    logits = output.logits if hasattr(output, "logits") else output["logits"] if isinstance(output, dict) else output
    return np.asarray(logits)


def _compare(head, got, expected):
    keep = MASK.astype(bool) if head == "causal_lm" else np.ones(len(IDS), bool)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=1e-4)


def _file_tensors(folder):
    return safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))


def _perturb_saved_modules(variables):
    """Trained copies of modules_to_save that differ from the base weights, so that loading them matters."""
    flat = flatten(variables["params"])
    rng = np.random.default_rng(0)
    for path, leaf in flat.items():
        if SAVED_MODULES_KEY in path:
            flat[path] = leaf + rng.normal(0, 0.5, np.shape(leaf)).astype(np.float32)
    return {**variables, "params": unflatten_like(flat, variables["params"])}


@pytest.mark.parametrize("family", sorted(CASES))
@SCANS
def test_jaxpeft_adapter_loads_in_torch_peft_with_same_logits(base_folders, family, scan_layers, tmp_path):
    head, options = CASES[family]
    model = JAX_CLASSES[head].from_pretrained(base_folders[family], scan_layers=scan_layers)
    config = jaxpeft.LoraConfig(init_lora_weights=False, **options)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    variables = _perturb_saved_modules(variables)

    folder = save_adapter(tmp_path / "adapter", variables, config, model.apply_fn, IDS, MASK)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_config = peft.LoraConfig.from_pretrained(folder)
        peft_model = peft.PeftModel.from_pretrained(_torch_model(base_folders[family], head), folder).eval()
    problems = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    assert not problems
    assert torch_config.r == options["r"] and torch_config.use_rslora == options.get("use_rslora", False)

    file_keys = set(_file_tensors(folder))
    assert file_keys == set(peft.get_peft_model_state_dict(peft_model))
    if "layers_to_transform" in options:  # uncovered layers of a scanned stack are not written
        assert not any(".layers.1." in key for key in file_keys)
        assert any(".layers.2." in key for key in file_keys)
    if "wte" in options["target_modules"]:
        assert "base_model.model.transformer.wte.lora_embedding_A" in file_keys
    for name in options.get("modules_to_save", []):
        assert f"base_model.model.{name}.weight" in file_keys
    expected = _torch_logits(peft_model)
    _compare(head, _jax_logits(model, variables, config), expected)
    _assert_adapter_matters(head, expected, _torch_logits(_torch_model(base_folders[family], head)))


def _assert_adapter_matters(head, adapted, base):
    keep = MASK.astype(bool) if head == "causal_lm" else np.ones(len(IDS), bool)
    assert np.abs(adapted[keep] - base[keep]).max() > 1e-2


@pytest.fixture(scope="module")
def torch_adapters(base_folders, tmp_path_factory):
    """family -> (folder written by torch PEFT's save_pretrained, torch logits with the adapter)."""
    adapters = {}
    for family, (head, options) in CASES.items():
        torch.manual_seed(1)
        peft_model = peft.get_peft_model(_torch_model(base_folders[family], head),
                                         peft.LoraConfig(init_lora_weights=False, **options)).eval()
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(torch.randn_like(parameter))
        folder = tmp_path_factory.mktemp(f"{family}-torch-adapter")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(folder)
        adapters[family] = folder, _torch_logits(peft_model)
    return adapters


@pytest.mark.parametrize("family", sorted(CASES))
@SCANS
def test_torch_peft_adapter_loads_in_jaxpeft_with_same_logits(base_folders, torch_adapters, family, scan_layers):
    head, options = CASES[family]
    folder, expected = torch_adapters[family]
    model = JAX_CLASSES[head].from_pretrained(base_folders[family], scan_layers=scan_layers)
    variables, config = load_adapter(folder, model.apply_fn, model.params, IDS, MASK)
    assert config.r == options["r"] and config.target_modules == sorted(options["target_modules"])
    assert config.modules_to_save == options.get("modules_to_save")
    _compare(head, _jax_logits(model, variables, config), expected)
    _assert_adapter_matters(head, expected, np.asarray(model(IDS, MASK).logits))


def test_keys_without_prefix_and_embedding_base_layer_load(base_folders, tmp_path):
    """A Llama adapter on embed_tokens: torch also writes the embedding's base weight; keys lose their prefix."""
    torch.manual_seed(2)
    options = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    config = MODEL_CONFIGS["llama"]()
    config._attn_implementation = "eager"
    torch_base = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_folder = tmp_path / "base"
    torch_base.save_pretrained(base_folder)
    peft_model = peft.get_peft_model(torch_base, peft.LoraConfig(**options)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "adapter")
    tensors = _file_tensors(tmp_path / "adapter")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors
    safetensors.numpy.save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()},
                                str(tmp_path / "adapter" / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=True)
    variables, config = load_adapter(tmp_path / "adapter", model.apply_fn, model.params, IDS, MASK)
    expected = _torch_logits(peft_model)
    _compare("causal_lm", _jax_logits(model, variables, config), expected)
    _assert_adapter_matters("causal_lm", expected, np.asarray(model(IDS, MASK).logits))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_travel_both_ways(base_folders, bias, tmp_path):
    options = dict(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False, bias=bias)
    model = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"], scan_layers=True)
    config = jaxpeft.LoraConfig(**options)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    mask = flatten(jaxpeft.trainable_mask(variables, config)["params"])
    flat = flatten(variables["params"])
    flat = {path: leaf + 0.3 if path[-1] == "bias" and mask[path] else leaf for path, leaf in flat.items()}
    variables = {"params": unflatten_like(flat, variables["params"])}
    folder = save_adapter(tmp_path / "jax", variables, config, model.apply_fn, IDS, MASK)
    peft_model = peft.PeftModel.from_pretrained(_torch_model(base_folders["bert"], "seq_cls"), folder).eval()
    file_keys = set(_file_tensors(folder))
    assert file_keys == set(peft.get_peft_model_state_dict(peft_model))
    assert any(key.endswith("query.base_layer.bias") for key in file_keys)
    assert any(key.endswith("LayerNorm.bias") for key in file_keys) == (bias == "all")
    expected = _torch_logits(peft_model)
    _compare("seq_cls", _jax_logits(model, variables, config), expected)

    loaded, loaded_config = load_adapter(folder, model.apply_fn, model.params, IDS, MASK)
    _compare("seq_cls", _jax_logits(model, loaded, loaded_config), expected)


@SCANS
def test_round_trip_gives_equal_tensors_and_named_adapter_subfolder(base_folders, scan_layers, tmp_path):
    head, options = CASES["gpt2"]
    model = JAX_CLASSES[head].from_pretrained(base_folders["gpt2"], scan_layers=scan_layers)
    config = jaxpeft.LoraConfig(init_lora_weights=False, **options)
    variables = jaxpeft.init_adapters(jax.random.key(3), config, model.apply_fn, model.params, IDS, MASK,
                                      adapter_name="other")
    folder = save_adapter(tmp_path, variables, config, model.apply_fn, IDS, MASK, adapter_name="other")
    assert folder == os.path.join(tmp_path, "other")
    loaded, loaded_config = load_adapter(tmp_path, model.apply_fn, model.params, IDS, MASK, adapter_name="other")
    assert config_to_hf_dict(loaded_config) == {**config_to_hf_dict(config), "inference_mode": True}
    original, again = flatten(variables["params"]), flatten(loaded["params"])
    assert original.keys() == again.keys()
    for path in original:
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(original[path]), err_msg=str(path))


def test_config_dict_accepts_hf_bookkeeping_and_rejects_what_changes_numerics():
    written = config_to_hf_dict(jaxpeft.LoraConfig(r=2, target_modules=["q"], rank_pattern={"q": 1}))
    assert written["peft_type"] == "LORA" and json.loads(json.dumps(written)) == written
    hf = {**written, "peft_version": "0.21.2", "auto_mapping": None, "megatron_core": "megatron.core",
          "loftq_config": {}, "use_qalora": False, "qalora_group_size": 16, "layer_replication": None,
          "trainable_token_indices": None, "init_lora_weights": "olora"}
    config = config_from_hf_dict(hf)
    assert config.rank_pattern == {"q": 1} and config.init_lora_weights is True
    assert config_from_hf_dict({**hf, "use_dora": True}).use_dora
    with pytest.raises(ConfigError, match="lora_bias"):
        config_from_hf_dict({**hf, "lora_bias": True})
    with pytest.raises(ConfigError, match="layer_replication"):
        config_from_hf_dict({**hf, "layer_replication": [[0, 2]]})
    with pytest.raises(ConfigError, match="'XLORA'.*supported: .*IA3, .*LORA"):
        config_from_hf_dict({**hf, "peft_type": "XLORA"})
    with pytest.raises(ConfigError, match="IA3 adapter config sets r=2"):
        config_from_hf_dict({**hf, "peft_type": "IA3"})


@pytest.fixture(scope="module")
def bert_adapter(base_folders, torch_adapters):
    model = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"])
    return model, torch_adapters["bert"][0]


def _copy_adapter(source, destination, edit_config=None, edit_tensors=None):
    os.makedirs(destination)
    with open(os.path.join(source, "adapter_config.json")) as file:
        hf_config = json.load(file)
    with open(os.path.join(destination, "adapter_config.json"), "w") as file:
        json.dump(edit_config(hf_config) if edit_config else hf_config, file)
    tensors = _file_tensors(source)
    safetensors.numpy.save_file(edit_tensors(tensors) if edit_tensors else tensors,
                                os.path.join(destination, "adapter_model.safetensors"))
    return destination


def test_load_errors_name_the_problem(bert_adapter, base_folders, tmp_path):
    model, folder = bert_adapter
    load = lambda path, m=model: load_adapter(path, m.apply_fn, m.params, IDS, MASK)  # noqa: E731

    wider = transformers.BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=64, vocab_size=99, num_labels=3)
    wider_model = AutoModelForSequenceClassification.from_config(wider)
    with pytest.raises(jaxpeft.AdapterError, match=r"tensor 'bert\.encoder.*has shape \(.*\), expected"):
        load(folder, wider_model)
    llama = AutoModelForCausalLM.from_pretrained(base_folders["llama"])
    with pytest.raises(jaxpeft.AdapterError, match="does not fit this model.*matched no layer"):
        load(folder, llama)

    renamed = _copy_adapter(folder, tmp_path / "renamed", edit_tensors=lambda t: {
        k.replace("layer.2.", "layer.7."): v for k, v in t.items()})
    with pytest.raises(jaxpeft.AdapterError, match=r"match no adapted module.*layer\.7\."):
        load(renamed)
    dropped = _copy_adapter(folder, tmp_path / "dropped", edit_tensors=lambda t: {
        k: v for k, v in t.items() if "layer.1.attention.self.query.lora_B" not in k})
    with pytest.raises(jaxpeft.AdapterError, match=r"missing.*layer\.1\.attention\.self\.query\.lora_B"):
        load(dropped)
    unknown = _copy_adapter(folder, tmp_path / "xlora", edit_config=lambda c: {**c, "peft_type": "XLORA"})
    with pytest.raises(ConfigError, match="adapter_config.json.*'XLORA'.*supported: .*IA3, .*LORA"):
        load(unknown)
    dora = _copy_adapter(folder, tmp_path / "dora", edit_config=lambda c: {**c, "use_dora": True})
    with pytest.raises(jaxpeft.AdapterError, match=r"missing.*lora_magnitude_vector"):
        load(dora)

    truncated = _copy_adapter(folder, tmp_path / "truncated")
    weights = os.path.join(truncated, "adapter_model.safetensors")
    with open(weights, "rb") as file:
        data = file.read()
    with open(weights, "wb") as file:
        file.write(data[: len(data) - 100])
    expected = f"adapter_model.safetensors: the file is truncated: {len(data) - 100} bytes of the {len(data)} its"
    with pytest.raises(jaxpeft.AdapterError, match=expected):
        load(truncated)
    os.remove(os.path.join(truncated, "adapter_config.json"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load(truncated)


def test_save_of_missing_adapter_writes_nothing(bert_adapter, tmp_path):
    model, _ = bert_adapter
    config = jaxpeft.LoraConfig(r=2, target_modules=["query"])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    with pytest.raises(jaxpeft.AdapterError, match="no LORA adapter 'other'.*default"):
        save_adapter(tmp_path / "out", variables, config, model.apply_fn, IDS, MASK, adapter_name="other")
    with pytest.raises(jaxpeft.AdapterError, match="no LORA adapter 'default'.*none"):
        save_adapter(tmp_path / "out", model.params, config, model.apply_fn, IDS, MASK)
    assert os.listdir(tmp_path) == []


class _TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, x):  # x: NHWC like the flax model's input
        hidden = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(hidden.reshape(x.shape[0], -1, 4))


class _FlaxConvNet(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        hidden = flax_nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        out = flax_nn.DenseGeneral((2, 3), name="proj")(hidden.reshape(x.shape[0], -1, 4))
        return out.reshape(out.shape[:-2] + (6,))


def test_conv_and_dense_general_layouts_match_torch_peft(tmp_path):
    """Conv factors use torch Conv2d's layouts, DenseGeneral's axes are flattened as in a torch Linear."""
    torch.manual_seed(0)
    torch_model = _TorchConvNet().eval()
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    weights = {name: p.detach().numpy() for name, p in torch_model.named_parameters()}
    params = {"conv": {"kernel": weights["conv.weight"].transpose(2, 3, 1, 0), "bias": weights["conv.bias"]},
              "proj": {"kernel": weights["proj.weight"].T.reshape(4, 2, 3), "bias": weights["proj.bias"].reshape(2, 3)}}
    variables = {"params": params}
    apply_fn = _FlaxConvNet().apply
    options = dict(r=2, lora_alpha=4, target_modules=["conv", "proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(**options)).eval()
    peft_model.save_pretrained(tmp_path / "torch")
    with torch.no_grad():
        expected = peft_model(torch.tensor(x)).numpy()
    loaded, config = load_adapter(tmp_path / "torch", apply_fn, variables, x)
    got = np.asarray(jaxpeft.rewrite(apply_fn, config)(loaded, x))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)

    folder = save_adapter(tmp_path / "jax", loaded, config, apply_fn, x)
    written, original = _file_tensors(folder), _file_tensors(tmp_path / "torch")
    assert written.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def _randomised(variables, config, adapter_name="default", seed=0):
    """The variables with the adapter's trainable leaves moved off their initial values."""
    mask = flatten(jaxpeft.trainable_mask(variables, config, adapter_name)["params"])
    rng = np.random.default_rng(seed)
    flat = {path: leaf + rng.normal(0, 0.3, np.shape(leaf)).astype(np.float32) if mask[path] else leaf
            for path, leaf in flatten(variables["params"]).items()}
    return {**variables, "params": unflatten_like(flat, variables["params"])}


def test_bitfit_folder_has_own_layout_and_loads_scanned_or_not(base_folders, tmp_path):
    """BitFit has no HF format: jaxpeft's own tensors per layer, only the layers the adapter covers."""
    scanned = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"], scan_layers=True)
    unscanned = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"])
    config = jaxpeft.BitFitConfig(target_modules=r".*layer\.1\..*", modules_to_save=["classifier"])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, scanned.apply_fn, scanned.params, IDS, MASK)
    variables = _randomised(variables, config)
    folder = save_adapter(tmp_path / "bitfit", variables, config, scanned.apply_fn, IDS, MASK)

    with open(os.path.join(folder, "adapter_config.json")) as file:
        assert json.load(file)["peft_type"] == "BITFIT"
    tensors = _file_tensors(folder)
    layer = "base_model.model.bert.encoder.layer.1."
    modules = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
    assert set(tensors) == ({f"{layer}{m}.bitfit_bias" for m in modules}
                            | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"})
    query = variables["params"]["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["bitfit_bias"]["default"]
    np.testing.assert_array_equal(tensors[f"{layer}attention.self.query.bitfit_bias"], np.asarray(query)[1])
    classifier = variables["params"]["classifier"][SAVED_MODULES_KEY]["default"]["kernel"]
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], np.asarray(classifier).T)

    expected = _jax_logits(scanned, variables, config)
    _assert_adapter_matters("seq_cls", expected, np.asarray(scanned(IDS, MASK).logits))
    loaded, loaded_config = load_adapter(folder, unscanned.apply_fn, unscanned.params, IDS, MASK)
    assert isinstance(loaded_config, jaxpeft.BitFitConfig) and loaded_config.modules_to_save == ["classifier"]
    _compare("seq_cls", _jax_logits(unscanned, loaded, loaded_config), expected)

    again_folder = save_adapter(tmp_path / "again", loaded, loaded_config, unscanned.apply_fn, IDS, MASK)
    again = _file_tensors(again_folder)
    assert again.keys() == tensors.keys()
    for key in tensors:
        np.testing.assert_array_equal(again[key], tensors[key], err_msg=key)
    reloaded, _ = load_adapter(again_folder, scanned.apply_fn, scanned.params, IDS, MASK)
    original, back = flatten(variables["params"]), flatten(reloaded["params"])
    assert original.keys() == back.keys()
    for path in original:
        if "bitfit_bias" in path:  # layer 1 travels; the layers of the stack BitFit leaves alone keep zero deltas
            np.testing.assert_array_equal(np.asarray(back[path])[1], np.asarray(original[path])[1])
            assert not np.asarray(back[path])[[0, 2]].any() and np.asarray(original[path])[[0, 2]].any()
        else:
            np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(original[path]), err_msg=str(path))


def test_own_layout_errors_name_the_tensor_and_the_model(base_folders, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"])
    config = jaxpeft.BitFitConfig(target_modules=["query"])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    folder = save_adapter(tmp_path / "bitfit", variables, config, model.apply_fn, IDS, MASK)

    wider = AutoModelForSequenceClassification.from_config(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=99, num_labels=3))
    with pytest.raises(jaxpeft.AdapterError, match=r"tensor 'bert\.encoder\.layer\.0\.attention\.self\.query\."
                                                   r"bitfit_bias' has shape \(32,\), expected \(48,\)"):
        load_adapter(folder, wider.apply_fn, wider.params, IDS, MASK)
    llama = AutoModelForCausalLM.from_pretrained(base_folders["llama"])
    with pytest.raises(jaxpeft.AdapterError, match="does not fit this model.*'query'"):
        load_adapter(folder, llama.apply_fn, llama.params, IDS, MASK)
    renamed = _copy_adapter(folder, tmp_path / "renamed", edit_tensors=lambda t: {
        k.replace("query", "key"): v for k, v in t.items()})
    with pytest.raises(jaxpeft.AdapterError, match=r"match no adapted module.*self\.key\.bitfit_bias"):
        load_adapter(renamed, model.apply_fn, model.params, IDS, MASK)
    with pytest.raises(jaxpeft.AdapterError, match="no LORA adapter 'default'.*default"):
        save_adapter(tmp_path / "lora", variables, jaxpeft.LoraConfig(target_modules=["query"]), model.apply_fn,
                     IDS, MASK)
    assert not os.path.exists(tmp_path / "lora")

    bad_json = _copy_adapter(folder, tmp_path / "bad_json")
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as file:
        file.write('{"peft_type": "BITFIT", ')
    with pytest.raises(jaxpeft.AdapterError, match=r"bad_json.adapter_config\.json: cannot read the adapter config"):
        load_adapter(bad_json, model.apply_fn, model.params, IDS, MASK)
    no_weights = _copy_adapter(folder, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no_weights.adapter_model\.safetensors does not exist"):
        load_adapter(no_weights, model.apply_fn, model.params, IDS, MASK)


def test_failed_save_leaves_the_folder_as_it_was(base_folders, tmp_path, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"])
    config = jaxpeft.IA3Config(target_modules=["query"])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    folder = save_adapter(tmp_path / "ia3", variables, config, model.apply_fn, IDS, MASK)
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    changed = _randomised(variables, config)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(folder, changed, jaxpeft.IA3Config(target_modules=["query"], modules_to_save=["pooler"]),
                     model.apply_fn, IDS, MASK)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path / "new", changed, config, model.apply_fn, IDS, MASK)
    assert sorted(os.listdir(tmp_path)) == ["ia3"]
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before


def test_bottleneck_folder_has_own_layout_and_loads_scanned_or_not(base_folders, tmp_path):
    """Bottleneck adapters have no HF format: jaxpeft's own leaves per layer, written by the same generic code."""
    from jaxpeft.methods.bottleneck import AdapterConfig

    scanned = AutoModelForCausalLM.from_pretrained(base_folders["gpt2"], scan_layers=True)
    unscanned = AutoModelForCausalLM.from_pretrained(base_folders["gpt2"])
    config = AdapterConfig(preset="houlsby", reduction_factor=4, init_weights=False, layers_to_transform=[1, 2])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, scanned.apply_fn, scanned.params, IDS, MASK)
    folder = save_adapter(tmp_path / "bottleneck", variables, config, scanned.apply_fn, IDS, MASK)

    with open(os.path.join(folder, "adapter_config.json")) as file:
        assert json.load(file)["peft_type"] == "BOTTLENECK"
    tensors = _file_tensors(folder)
    shapes = {"adapter_down_kernel": (32, 8), "adapter_down_bias": (8,), "adapter_up_kernel": (8, 32),
              "adapter_up_bias": (32,)}
    assert {key: value.shape for key, value in tensors.items()} == {
        f"base_model.model.transformer.h.{layer}.{module}.{leaf}": shape
        for layer in (1, 2) for module in ("attn.c_proj", "mlp.c_proj") for leaf, shape in shapes.items()}
    up = variables["params"]["transformer"]["h"]["mlp"]["c_proj"]["adapter_up_kernel"]["default"]
    np.testing.assert_array_equal(tensors["base_model.model.transformer.h.2.mlp.c_proj.adapter_up_kernel"],
                                  np.asarray(up)[2])

    expected = _jax_logits(scanned, variables, config)
    _assert_adapter_matters("causal_lm", expected, np.asarray(scanned(IDS, MASK).logits))
    loaded, loaded_config = load_adapter(folder, unscanned.apply_fn, unscanned.params, IDS, MASK)
    assert loaded_config == dataclasses.replace(config, inference_mode=True)
    _compare("causal_lm", _jax_logits(unscanned, loaded, loaded_config), expected)
    again = _file_tensors(save_adapter(tmp_path / "again", loaded, loaded_config, unscanned.apply_fn, IDS, MASK))
    assert again.keys() == tensors.keys()
    for key in tensors:
        np.testing.assert_array_equal(again[key], tensors[key], err_msg=key)


def test_prompt_tuning_folder_is_checked_and_loads_without_a_tokenizer(base_folders, tmp_path):
    """Call-level methods write their tensors through their hooks; the file is checked before the hook runs."""
    from jaxpeft.methods.prompt_tuning import PromptTuningConfig

    model = AutoModelForSequenceClassification.from_pretrained(base_folders["bert"])
    config = PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS", modules_to_save=["classifier"])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    folder = save_adapter(tmp_path / "prompt", variables, config, model.apply_fn, IDS, MASK)
    tensors = _file_tensors(folder)
    assert {key: value.shape for key, value in tensors.items()} == {
        "prompt_embeddings": (3, 32), "base_model.classifier.weight": (3, 32), "base_model.classifier.bias": (3,)}

    # TEXT would need a tokenizer to initialise the prompt; loading takes the file's values instead.
    text = _copy_adapter(folder, tmp_path / "text", edit_config=lambda c: {
        **c, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hello", "tokenizer_name_or_path": "no/such"})
    loaded, loaded_config = load_adapter(text, model.apply_fn, model.params, IDS, MASK)
    assert loaded_config.prompt_tuning_init == "TEXT"
    np.testing.assert_array_equal(np.asarray(loaded["params"]["prompt_embeddings"]["default"]),
                                  tensors["prompt_embeddings"])
    _compare("seq_cls", _jax_logits(model, loaded, loaded_config), _jax_logits(model, variables, config))

    longer = _copy_adapter(folder, tmp_path / "longer", edit_tensors=lambda t: {
        **t, "prompt_embeddings": np.zeros((4, 32), np.float32)})
    with pytest.raises(jaxpeft.AdapterError, match=r"tensor 'prompt_embeddings' has shape \(4, 32\), expected "
                                                   r"\(3, 32\)"):
        load_adapter(longer, model.apply_fn, model.params, IDS, MASK)
    dropped = _copy_adapter(folder, tmp_path / "dropped", edit_tensors=lambda t: {
        k: v for k, v in t.items() if k != "prompt_embeddings"})
    with pytest.raises(jaxpeft.AdapterError, match="1 tensor.* missing, e.g. prompt_embeddings"):
        load_adapter(dropped, model.apply_fn, model.params, IDS, MASK)
