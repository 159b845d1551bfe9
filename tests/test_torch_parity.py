"""Adapter files both ways with torch PEFT as the reference, for every method that HF PEFT has.

torch -> jaxpeft: torch PEFT adapts a tiny random transformers model, its adapter weights are moved off their
initial values, ``save_pretrained`` writes the folder, and ``jaxpeft.PeftModel.from_pretrained`` on the jaxpeft
model built from the same base folder must give torch's logits. jaxpeft -> torch: ``jaxpeft.get_peft_model``, its
trainable leaves moved off their initial values, ``save_pretrained``; torch ``PeftModel.from_pretrained`` must load
it with no missing or unexpected keys and give jaxpeft's logits. Classification heads (``SEQ_CLS``) travel as
``modules_to_save``; scanned (``scan_layers=True``) jaxpeft models are written and read per layer.
"""

import os
import warnings

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxpeft
from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
from jaxpeft.methods.prompt_tuning import PromptTuningConfig
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), "CAUSAL_LM"),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3), "SEQ_CLS"),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0, num_labels=2), "SEQ_CLS"),
    "llama_lm": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                                  pad_token_id=0), "CAUSAL_LM"),
}
TORCH_CLASSES = {"CAUSAL_LM": transformers.AutoModelForCausalLM,
                 "SEQ_CLS": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}
JAX_CONFIGS = {"LoraConfig": jaxpeft.LoraConfig, "IA3Config": jaxpeft.IA3Config,
               "PromptTuningConfig": PromptTuningConfig, "PrefixTuningConfig": PrefixTuningConfig}
# method -> (config class name, shared options); target_modules=None takes each library's default for the family,
# and prompt learning's dimensions (token_dim, num_layers, ...) are filled from the model by each library.
METHODS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8)),
    "rslora": ("LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "dora": ("LoraConfig", dict(r=2, lora_alpha=4, use_dora=True)),
    "ia3": ("IA3Config", dict()),
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "prefix_mlp": ("PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)),
}
# Where each direction runs a scanned (scan_layers=True) jaxpeft model; the other direction runs an unscanned one.
SCANNED_WHEN_LOADING = ("lora", "ia3", "prompt")
# Each method on GPT-2 (CAUSAL_LM, Conv1D layers), BERT and Llama (SEQ_CLS, the head in modules_to_save). LoRA and
# rsLoRA complete tests/test_hf_format.py, which runs LoRA on GPT-2 and rsLoRA on BERT and Llama. Prefix tuning runs
# on a Llama CAUSAL_LM instead, also with prefix_projection (the file holds the projected table): torch PEFT's
# SEQ_CLS forward refuses prefix tuning under transformers 5 (BertForSequenceClassification and
# LlamaForSequenceClassification take no past_key_values).
CASES = [("bert", "lora"), ("llama", "lora"), ("gpt2", "rslora"), ("gpt2", "prefix"), ("llama_lm", "prefix"),
         ("llama_lm", "prefix_mlp")]
CASES += [(family, method) for method in ("dora", "ia3", "prompt") for family in ("gpt2", "bert", "llama")]
# Options for one case only: a GPT-2 Conv1D layer (weight stored [in, out]) in modules_to_save.
CASE_OPTIONS = {("gpt2", "ia3"): dict(modules_to_save=["mlp.c_fc"])}
# torch PEFT loads a prompt-learning adapter's tensor through its prompt encoder after the model's load_state_dict,
# which reports it as unexpected.
LOADED_BY_THE_PROMPT_ENCODER = "prompt_embeddings"
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """family -> folder of a tiny random transformers torch model (eager attention) with the family's head."""
    folders = {}
    for family, (make_config, task) in FAMILIES.items():
        torch.manual_seed(0)
        config = make_config()
        config._attn_implementation = "eager"
        folder = tmp_path_factory.mktemp(f"{family}-base")
        TORCH_CLASSES[task].from_config(config).eval().save_pretrained(folder)
        folders[family] = folder
    return folders


def _torch_base(folder, task):
    return TORCH_CLASSES[task].from_pretrained(folder, attn_implementation="eager").eval()


def _torch_logits(model):
    """torch's logits; for a prompt-tuned decoder classifier, each row run without its padding: torch pools the last
    position of ``inputs_embeds`` (a pad token in a right-padded row), jaxpeft the last token the mask keeps."""
    with torch.no_grad():
        if not _pools_last_position(model):
            return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
        return np.concatenate([model(input_ids=torch.tensor(ids[mask == 1][None])).logits.numpy()
                               for ids, mask in zip(IDS, MASK, strict=True)])


def _pools_last_position(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prompt = getattr(getattr(model, "peft_config", {}).get("default"), "peft_type", None) == "PROMPT_TUNING"
    return prompt and base.config.model_type != "bert" and type(base).__name__.endswith("SequenceClassification")


def _kept(task, logits):
    """The logits that padding does not make meaningless (a causal LM's padded positions are left out; prompt
    tuning's virtual positions come first and are kept)."""
    if task != "CAUSAL_LM":
        return logits
    virtual = np.ones((len(IDS), logits.shape[1] - IDS.shape[1]), bool)
    return logits[np.concatenate([virtual, MASK.astype(bool)], axis=1)]


def _assert_close(task, got, expected):
    np.testing.assert_allclose(_kept(task, got), _kept(task, expected), atol=TOLERANCE, rtol=TOLERANCE)


def _assert_adapter_matters(task, adapted, base):
    """The adapter changes the logits of the real tokens (prompt tuning's virtual positions come first)."""
    real = adapted[:, adapted.shape[1] - IDS.shape[1]:] if task == "CAUSAL_LM" else adapted
    assert np.abs(_kept(task, real) - _kept(task, base)).max() > 1e-2


def _configs(family, method):
    task = FAMILIES[family][1]
    class_name, options = METHODS[method]
    options = {**options, **CASE_OPTIONS.get((family, method), {})}
    return getattr(peft, class_name)(task_type=task, **options), JAX_CONFIGS[class_name](task_type=task, **options)


def _load_in_torch(base, folder):
    """torch PeftModel.from_pretrained, and what torch PEFT reported missing or unexpected: its warnings, and the
    load result of the same folder loaded again as a second adapter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, folder).eval()
        load_result = model.load_adapter(folder, adapter_name="again")
    problems = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    unexpected = [key for key in load_result.unexpected_keys if key != LOADED_BY_THE_PROMPT_ENCODER]
    return model, problems + load_result.missing_keys + unexpected


def _randomised_jax(peft_model, seed):
    """The jaxpeft model with every trainable leaf (adapter leaves, modules_to_save copies) moved off its init."""
    rng = np.random.default_rng(seed)
    peft_model.params = jax.tree_util.tree_map(
        lambda leaf, trains: leaf + rng.normal(0, 0.3, np.shape(leaf)).astype(leaf.dtype) if trains else leaf,
        peft_model.params, peft_model.trainable_mask)
    return peft_model


@pytest.mark.parametrize("family, method", CASES)
def test_torch_peft_adapter_gives_torch_logits_in_jaxpeft(base_folders, family, method, tmp_path):
    task = FAMILIES[family][1]
    torch_config, _ = _configs(family, method)
    torch_base = _torch_base(base_folders[family], task)
    base_logits = _torch_logits(torch_base)
    torch.manual_seed(1)
    torch_model = peft.get_peft_model(torch_base, torch_config).eval()
    with torch.no_grad():
        for parameter in torch_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model.save_pretrained(tmp_path)
    expected = _torch_logits(torch_model)

    base = JAX_CLASSES[task].from_pretrained(base_folders[family], scan_layers=method in SCANNED_WHEN_LOADING)
    loaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    assert type(loaded.peft_config["default"]).__name__ == METHODS[method][0]
    _assert_close(task, np.asarray(loaded(IDS, MASK).logits), expected)
    _assert_adapter_matters(task, expected, base_logits)


@pytest.mark.parametrize("family, method", CASES)
def test_jaxpeft_adapter_gives_jaxpeft_logits_in_torch_peft(base_folders, family, method, tmp_path):
    task = FAMILIES[family][1]
    _, jax_config = _configs(family, method)
    base = JAX_CLASSES[task].from_pretrained(base_folders[family], scan_layers=method not in SCANNED_WHEN_LOADING)
    model = _randomised_jax(jaxpeft.get_peft_model(base, jax_config), seed=2)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = np.asarray(model(IDS, MASK).logits)

    torch_base = _torch_base(base_folders[family], task)
    base_logits = _torch_logits(torch_base)
    torch_model, problems = _load_in_torch(torch_base, tmp_path)
    assert not problems
    assert isinstance(torch_model.peft_config["default"], getattr(peft, METHODS[method][0]))
    assert torch_model.peft_config["default"].peft_type == model.peft_config["default"].peft_type
    written = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(written) == set(peft.get_peft_model_state_dict(torch_model))
    if task == "SEQ_CLS":
        assert any(key.endswith(("classifier.weight", "score.weight")) for key in written)
    for name in jax_config.modules_to_save or []:
        assert any(f".{name}.weight" in key for key in written)
    expected = _torch_logits(torch_model)
    _assert_close(task, ours, expected)
    _assert_adapter_matters(task, expected, base_logits)
