"""The demo's pieces and command line; the demos themselves on a few examples of the real assets."""

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import transformers

from jaxpeft import assets, demo
from jaxpeft.models import AutoModel, AutoModelForCausalLM, PretrainedModel
from jaxpeft.quantization import QuantizedArray
from jaxpeft.trainer import plot_history


def tiny_encoder():
    return AutoModel.from_config(transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=16,
                                                         max_position_embeddings=64))


def test_mean_pooled_embeddings_ignore_padding():
    encoder = tiny_encoder()
    features = [{"input_ids": [2, 5, 6, 7, 3]}, {"input_ids": [2, 9, 3]}, {"input_ids": [2, 4, 3]}]
    embeddings = demo.mean_pooled_embeddings(encoder, features, batch_size=3)  # one batch, two rows padded
    alone = np.asarray(encoder(input_ids=[features[0]["input_ids"]]).last_hidden_state[0])  # unpadded
    np.testing.assert_allclose(embeddings[0], alone.mean(0), atol=1e-5)
    pair = np.asarray(encoder(input_ids=[features[1]["input_ids"], features[2]["input_ids"]]).last_hidden_state)
    np.testing.assert_allclose(embeddings[1:], pair.mean(1), atol=1e-5)
    assert embeddings.shape == (3, 8)
    in_pairs = demo.mean_pooled_embeddings(encoder, features, batch_size=2)  # the last batch filled to 2 rows
    np.testing.assert_allclose(in_pairs, embeddings, atol=1e-5)


def test_linear_probe_matches_a_separating_direction():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(400, 6)).astype(np.float32) * np.array([1, 1, 1, 1, 1, 10], np.float32)
    labels = (inputs[:, 2] - inputs[:, 4] > 0).astype(int)  # the large 6th feature is noise
    predict = demo.train_linear_probe(inputs, labels)
    fresh = rng.normal(size=(200, 6)).astype(np.float32)
    assert np.mean(predict(fresh) == (fresh[:, 2] - fresh[:, 4] > 0)) > 0.95
    with pytest.raises(ValueError, match="needs embeddings"):
        demo.train_linear_probe(inputs, labels[:10])


def test_token_blocks_cut_the_token_stream():
    tokenizer = transformers.BertTokenizer(
        vocab={word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])},
        eos_token="[SEP]")
    texts = ["a b c", "b", "c c a b"]
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [3]
    blocks = demo.token_blocks(texts, tokenizer, 4)
    assert [block["input_ids"] for block in blocks] == [stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert len(demo.token_blocks(texts, tokenizer, 4, max_blocks=2)) == 2


def test_bad_arguments_exit_with_one_line(tmp_path):
    for argv, message in ((["--steps", "0"], "--steps must be at least 1"),
                          (["--batch-size", "-2"], "--batch-size must be at least 1"),
                          (["--learning-rate", "0"], "--learning-rate must be > 0"),
                          (["--quantize", "nf4"], "--quantize and --double-quant apply to the causal-LM demo"),
                          (["--causal-lm", "--double-quant"], "--double-quant needs --quantize nf4 or fp4"),
                          (["--causal-lm", "--quantize", "int8", "--double-quant"], "double_quant applies to nf4")):
        with pytest.raises(SystemExit, match=message):
            demo.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_missing_asset_exits_with_the_command_that_gets_it(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no .assets/ here
    with pytest.raises(SystemExit, match=r"^error: .*pip download --no-deps --no-binary :all: vaderSentiment"):
        demo.main(["--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_quick_sentiment_demo_writes_its_outputs(tmp_path, capsys, monkeypatch):
    plotted = []

    def recording_plot(log_history, path, **options):
        plotted.append((pathlib.Path(path), options))
        return plot_history(log_history, path, **options)

    monkeypatch.setattr(demo, "plot_history", recording_plot)
    recipe = demo.SentimentRecipe(steps=3, batch_size=8, max_length=16, validation_size=16, eval_every=3,
                                  train_limit=64, test_limit=24)
    results = demo.sentiment_demo(tmp_path, recipe, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["steps"] == 3
    assert saved["test_sentences"] == 24 and saved["train_sentences"] == 48
    assert all(0 <= value <= 1 for value in results["test"].values())
    assert all(0 <= value <= 1 for value in results["validation"].values())
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and "classifier" in adapter["modules_to_save"]
    assert adapter["base_model_name_or_path"] == assets.minilm_folder()  # what torch's AutoPeftModel loads
    # the curves are drawn again with the frozen-encoder probe's validation accuracy as a line
    assert plotted == [(tmp_path / "training_curves.png", {
        "title": demo.SENTIMENT_PLOT_TITLE,
        "baselines": {"eval_accuracy": {"frozen-encoder probe": results["validation"]["baseline_accuracy"]}}})]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 100_000
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [3]  # logging_steps = eval_every
    assert any("eval_accuracy" in r for r in logs)
    printed = capsys.readouterr().out
    assert f"test accuracy {results['test']['fine_tuned_accuracy']:.4f}" in printed and str(tmp_path) in printed
    assert printed.count("truly ") == 4  # the reloaded adapter labelled four held-out sentences


def test_quantize_option_reaches_the_causal_lm_recipe(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(demo, "causal_lm_demo", lambda output_dir, recipe, **options: ran.append(recipe) or {})
    demo.main(["--causal-lm", "--quick", "--quantize", "nf4", "--double-quant", "--output-dir", str(tmp_path)])
    demo.main(["--causal-lm", "--output-dir", str(tmp_path)])
    assert ran == [dataclasses.replace(demo.QUICK_CAUSAL_LM, quantize="nf4", double_quant=True), demo.CausalLMRecipe()]
    assert ran[1].quantization_config() is None  # the default run keeps its float32 base


def test_quick_causal_lm_demo_trains_on_a_4bit_base(tmp_path, monkeypatch):
    loaded = []
    load = AutoModelForCausalLM.from_pretrained

    def recording_load(path, **options):
        loaded.append(load(path, **options))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording_load)
    # Greedy decoding compiles twice (base, tuned) for ~10 s and has nothing quantization-specific: one token echoed.
    monkeypatch.setattr(PretrainedModel, "generate",
                        lambda self, input_ids, **options: np.concatenate([input_ids, input_ids[:, -1:]], axis=1))
    recipe = dataclasses.replace(demo.QUICK_CAUSAL_LM, steps=1, batch_size=1, block_size=16, eval_articles=1,
                                 eval_tokens=16, new_tokens=1, r=4, target_modules=("q_proj", "v_proj"),
                                 quantize="nf4")
    results = demo.causal_lm_demo(tmp_path, recipe, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quantization"]["quant_type"] == "nf4" and saved["recipe"]["quantize"] == "nf4"
    # The file's Q4_1 kernels are kept in their own codes (uint4), about 0.31 of their bf16 bytes.
    assert saved["base_quantized_kernels"] == {"uint4": 7}
    sizes = saved["base_parameter_bytes"]
    assert 0 < sizes["quantized"] <= 0.35 * sizes["quantized_as_bf16"]
    (model,) = loaded
    q_proj = model.params["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, QuantizedArray) and q_proj.quant_type == "uint4"
    assert saved["steps"] == 1 and math.isfinite(saved["training_loss"])
    before, after = results["perplexity"]["before"], results["perplexity"]["after"]
    assert math.isfinite(before) and math.isfinite(after) and after != before  # the adapter took effect
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logs if "loss" in r]
    assert len(losses) == 1 and losses[0][0] == 1 and math.isfinite(losses[0][1])
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and sorted(results["samples"]) == ["base", "tuned"]
    assert adapter["base_model_name_or_path"] == assets.smollm2_gguf()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 100_000


def test_assets_command_prints_paths_and_writes_the_demo_split(tmp_path, capsys):
    assert assets.main(["minilm"]) == 0
    assert capsys.readouterr().out == assets.minilm_folder() + "\n"
    assert assets.main([]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["minilm", "smollm2", "rotten-tomatoes", "bbc-news"]
    assert assets.main(["--write-rotten-tomatoes", str(tmp_path)]) == 0
    train, test = assets.rotten_tomatoes()
    written = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
               for name in ("train", "validation", "test")}
    size = demo.SentimentRecipe().validation_size
    assert written == {"train": train[size:], "validation": train[:size], "test": test}  # the demo's split
