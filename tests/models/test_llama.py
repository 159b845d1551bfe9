"""Llama, Mistral, Qwen2 and Qwen3 against transformers' torch models: every head, scanned and unrolled."""

import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

torch.set_num_threads(2)

TOLERANCE = 1e-4
SMALL = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
)  # fmt: skip
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
VARIANTS = {
    # Llama 3.x: llama3 RoPE scaling, tied embeddings, biases everywhere, GQA.
    "llama3_tied": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                                   attention_bias=True, mlp_bias=True)),
    # Llama 2 style: untied, multi-head attention (no GQA).
    "llama_untied_mha": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    # Mistral with a sliding window shorter than the batch so that the window matters.
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=4, tie_word_embeddings=False)),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    # Qwen3: q/k norms and head_dim from the config (not hidden_size / heads).
    "qwen3_head_dim": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
}  # fmt: skip
TORCH_CLASSES = {
    "base": transformers.AutoModel,
    "causal_lm": transformers.AutoModelForCausalLM,
    "seq_cls": transformers.AutoModelForSequenceClassification,
}
AUTO = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


def padded_batch(vocab_size=101, seq_len=9):
    """Row 0 right-padded, row 1 left-padded, row 2 full; pad id 0 never appears as a real token."""
    ids = np.random.RandomState(0).randint(3, vocab_size, (3, seq_len))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, :2] = 0
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """For one variant: torch reference models of every head sharing weights, each saved to a folder."""
    config_class, overrides = VARIANTS[request.param]
    torch.manual_seed(0)
    config = config_class(**dict(SMALL, **overrides))
    causal_lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    seq_cls = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    seq_cls.model.load_state_dict(causal_lm.model.state_dict())
    models = {"causal_lm": causal_lm, "seq_cls": seq_cls, "base": causal_lm.model}
    folders = {}
    for head, model in models.items():
        folders[head] = str(tmp_path_factory.mktemp(f"{request.param}_{head}"))
        model.save_pretrained(folders[head])
    return request.param, models, folders


def torch_output(model, ids, mask, head):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if head == "base" else out.logits).numpy()


def max_diff(ours, reference, mask, head):
    if head == "seq_cls":
        return np.abs(ours - reference).max()
    return np.abs(ours - reference)[mask.astype(bool)].max()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("head", ["base", "causal_lm", "seq_cls"])
def test_matches_torch(variant, head, scan_layers):
    _, models, folders = variant
    ids, mask = padded_batch()
    model = AUTO[head].from_pretrained(folders[head], scan_layers=scan_layers)
    out = model(input_ids=ids, attention_mask=mask)
    ours = np.asarray(out.last_hidden_state if head == "base" else out.logits)
    assert max_diff(ours, torch_output(models[head], ids, mask, head), mask, head) < TOLERANCE


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls"])
def test_save_pretrained_loads_in_torch(variant, head, tmp_path):
    _, models, folders = variant
    model = AUTO[head].from_pretrained(folders[head], scan_layers=True)
    model.save_pretrained(tmp_path)
    reloaded, info = TORCH_CLASSES[head].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(reloaded) is type(models[head])
    ids, mask = padded_batch()
    reference = torch_output(models[head], ids, mask, head)
    assert max_diff(torch_output(reloaded.eval(), ids, mask, head), reference, mask, head) < TOLERANCE


def test_scanned_and_unrolled_parameters_convert_to_the_same_tensors(variant):
    _, _, folders = variant
    scanned = AutoModelForCausalLM.from_pretrained(folders["causal_lm"], scan_layers=True)
    unrolled = AutoModelForCausalLM.from_pretrained(folders["causal_lm"], scan_layers=False)
    a = scanned.family.params_to_hf(scanned.params, scanned.config, "causal_lm", True)
    b = unrolled.family.params_to_hf(unrolled.params, unrolled.config, "causal_lm", False)
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[name], b[name]) for name in a)
