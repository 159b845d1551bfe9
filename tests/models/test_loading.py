"""Loading: name resolution (folder, HF cache, offline), shards, errors, and the Auto classes of every family."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxpeft.models import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    supported_model_types,
)

torch.set_num_threads(2)

GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    reference.save_pretrained(folder)
    return reference, str(folder)


def logits_of(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor(ids)).logits.numpy()


def edited_copy(folder, destination, edit):
    """A copy of the checkpoint whose tensors went through ``edit(dict) -> dict``."""
    shutil.copytree(folder, destination)
    path = os.path.join(destination, "model.safetensors")
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return str(destination)


def test_unknown_architecture_lists_supported_types(tmp_path):
    transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="Unsupported model type 'opt'.*gpt2.*llama.*qwen3"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_is_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder

    def drop(tensors):
        return {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"}

    broken = edited_copy(folder, tmp_path / "missing", drop)
    for scan_layers in (False, True):
        with pytest.raises(ValueError, match=r"missing \['transformer\.h\.1\.mlp\.c_fc\.weight'\]"):
            AutoModelForCausalLM.from_pretrained(broken, scan_layers=scan_layers)


def test_misshaped_tensor_is_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    broken = edited_copy(
        folder, tmp_path / "misshaped", lambda t: dict(t, **{"transformer.wpe.weight": np.zeros((7, 32))})
    )
    with pytest.raises(ValueError, match=r"mis-shaped \[.transformer\.wpe\.weight: got \(7, 32\), expected \(64, 32\)"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_unexpected_tensor_is_named(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    extra = {"transformer.h.0.attn.rotation.weight": np.zeros((2, 2), np.float32)}
    broken = edited_copy(folder, tmp_path / "unexpected", lambda t: dict(t, **extra))
    with pytest.raises(ValueError, match=r"unexpected \['transformer\.h\.0\.attn\.rotation\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_offline_unknown_id_says_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-model'.*offline.*local folder"):
        AutoModel.from_pretrained("nobody/no-such-model")


def test_hub_id_found_in_the_cache(gpt2_folder, monkeypatch, tmp_path):
    reference, folder = gpt2_folder
    repo = tmp_path / "models--tiny--gpt2"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained("tiny/gpt2")
    ids = np.array([[5, 6, 7, 8]])
    assert np.abs(np.asarray(model(ids).logits) - logits_of(reference, ids)).max() < 1e-4


def test_sharded_bfloat16_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64,
    )  # fmt: skip
    reference = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, param_dtype="bfloat16", dtype="float32")
    kernel = model.params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32), reference.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    )
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["dtype"] == "bfloat16"


def test_head_the_family_lacks(gpt2_folder):
    _, folder = gpt2_folder
    with pytest.raises(ValueError, match="has no 'token_cls' head"):
        AutoModelForTokenClassification.from_pretrained(folder)


def test_bad_call_inputs_are_explained(gpt2_folder):
    _, folder = gpt2_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="does not take \\['pixel_values'\\]"):
        model(input_ids=[[1, 2]], pixel_values=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]])
    with pytest.raises(ValueError, match="Unknown remat_policy 'most'"):
        AutoModelForCausalLM.from_pretrained(folder, remat_policy="most")


def test_tokenizer_output_is_accepted(gpt2_folder):
    reference, folder = gpt2_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    encoded = transformers.BatchEncoding({"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3))})
    for tensors in (encoded, {k: jnp.asarray(v) for k, v in encoded.items()}):
        assert np.abs(np.asarray(model(**tensors).logits) - logits_of(reference, [[5, 6, 7]])).max() < 1e-4


ENCODERS = {
    "bert": transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
        max_position_embeddings=64, num_labels=3,
    ),
    "roberta": transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
        max_position_embeddings=64, num_labels=3,
    ),
    "distilbert": transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99, max_position_embeddings=64, num_labels=3,
    ),
}  # fmt: skip
ENCODER_HEADS = [
    (AutoModel, transformers.AutoModel),
    (AutoModelForSequenceClassification, transformers.AutoModelForSequenceClassification),
    (AutoModelForTokenClassification, transformers.AutoModelForTokenClassification),
]


def test_every_family_is_registered():
    assert set(supported_model_types()) >= {"gpt2", "llama", "mistral", "qwen2", "qwen3", *ENCODERS}


@pytest.mark.parametrize("auto,torch_auto", ENCODER_HEADS, ids=["base", "seq_cls", "token_cls"])
@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_auto_classes_serve_the_encoder_families(model_type, auto, torch_auto, tmp_path):
    torch.manual_seed(0)
    reference = torch_auto.from_config(ENCODERS[model_type]).eval()
    reference.save_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(3, 99, (2, 7))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    out = auto.from_pretrained(tmp_path, scan_layers=True)(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if auto is AutoModel:
        ours, expected = np.asarray(out.last_hidden_state)[mask == 1], expected.last_hidden_state.numpy()[mask == 1]
    else:
        ours, expected = np.asarray(out.logits), expected.logits.numpy()
        if ours.ndim == 3:
            ours, expected = ours[mask == 1], expected[mask == 1]
    assert np.abs(ours - expected).max() < 1e-4
