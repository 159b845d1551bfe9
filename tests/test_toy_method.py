"""A method registered from one file of the tests folder (``toy_method.py``) runs through every part of jaxpeft:
``get_peft_model``, ``save_pretrained``/``from_pretrained``, merging, the Trainer and the command line."""

import json

import jax
import numpy as np
import pytest
import toy_method
import transformers

import jaxpeft
from jaxpeft import cli
from jaxpeft.models import AutoModelForCausalLM

GPT2 = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
IDS = np.array([[1, 5, 9, 3, 7, 2]], np.int32)


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_config(GPT2, seed=0)


def with_random_gains(model, seed=1):
    flat = jaxpeft.tree.flatten(model.params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    flat = {path: (0.5 * jax.random.normal(next(keys), leaf.shape) if toy_method.LEAF in path else leaf)
            for path, leaf in flat.items()}
    model.params = jaxpeft.tree.unflatten_like(flat, model.params)
    return model


def scaled_by_hand(base, peft_model):
    """The base parameters with each c_attn kernel column and bias entry multiplied by 1 + its gain."""
    params = jax.tree_util.tree_map(np.array, base.params)
    for path, leaf in jaxpeft.tree.flatten(peft_model.params).items():
        if toy_method.LEAF in path:
            layer = params
            for key in path[: path.index(toy_method.LEAF)]:
                layer = layer[key]
            layer["kernel"] *= 1 + np.asarray(leaf)[..., None, :]
            layer["bias"] *= 1 + np.asarray(leaf)
    return params


def test_get_peft_model_applies_the_registered_method(base):
    model = jaxpeft.get_peft_model(base, toy_method.GainConfig())  # task_defaults picks c_attn
    assert model.peft_config["default"].target_modules == ["c_attn"]
    np.testing.assert_array_equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    with_random_gains(model)
    expected = base.module.apply(scaled_by_hand(base, model), IDS)
    np.testing.assert_allclose(model(input_ids=IDS).logits, np.asarray(expected.logits), atol=1e-5)
    assert not np.allclose(model(input_ids=IDS).logits, base(input_ids=IDS).logits, atol=1e-3)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(merged(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)


def test_save_and_load_round_trip(base, tmp_path):
    model = with_random_gains(jaxpeft.get_peft_model(base, toy_method.GainConfig(target_modules=["c_attn"])))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY_GAIN"
    loaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    assert isinstance(loaded.peft_config["default"], toy_method.GainConfig)
    np.testing.assert_array_equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_trainer_trains_only_the_gains(base, tmp_path):
    model = jaxpeft.get_peft_model(base, toy_method.GainConfig(target_modules=["c_attn", "c_fc"]))
    before = jaxpeft.tree.flatten(model.params)
    data = [{"input_ids": [int(i) for i in np.random.default_rng(seed).integers(3, 64, 12)]} for seed in range(16)]
    args = jaxpeft.TrainingArguments(tmp_path, max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
                                     save_strategy="no", disable_tqdm=True)
    jaxpeft.Trainer(model=model, args=args, train_dataset=data, task="causal_lm").train()
    after = jaxpeft.tree.flatten(model.params)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    gains = {path for path in before if toy_method.LEAF in path}
    assert changed == gains and len(gains) == 4


def test_cli_offers_and_trains_the_method(assets, tmp_path, capsys):
    parser, _ = cli.build_parser()
    assert "toy-gain" in parser.format_help() or "toy-gain" in cli.method_flags()["--target-modules"][2]
    status = cli.main(["train", "--model", str(assets / "gpt2"), "--task", "causal_lm", "--method", "toy-gain",
                       "--target-modules", "c_attn", "--train-file", str(assets / "lines.csv"), "--max-steps", "2",
                       "--batch-size", "2", "--no-progress", "--output-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY_GAIN" and saved["target_modules"] == ["c_attn"]
    status = cli.main(["eval", "--run", str(tmp_path / "run"), "--data", str(assets / "lines.csv")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["perplexity"] > 1
