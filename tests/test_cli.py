"""The ``jaxpeft`` command line end to end on tiny models: train -> eval -> generate -> merge -> export, each output
checked against transformers / torch PEFT; config files, bad flags and bad files give one-line errors."""

import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
import yaml

import jaxpeft
from jaxpeft import cli
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxpeft")


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``main(argv)`` in this process."""
    status = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def bert_run(assets):
    """A LoRA run on the BERT classifier, its options split between a YAML file and flags that override it."""
    config = {"model": str(assets / "bert"), "task": "SEQ_CLS", "method": "lora", "r": 2, "lora_alpha": 8,
              "option": {"init_lora_weights": False}, "train_file": str(assets / "reviews.jsonl"),
              "text_column": "review", "label_column": "sentiment", "max_steps": 2, "batch_size": 4,
              "learning_rate": 0.05, "save_steps": 1, "eval_steps": 1, "metric_for_best_model": "accuracy",
              "no_progress": True}
    (assets / "bert.yaml").write_text(yaml.safe_dump(config))
    output = assets / "bert_run"
    status = cli.main(["train", "--config", str(assets / "bert.yaml"), "--r", "4", "--eval-file",
                       str(assets / "reviews.jsonl"), "--output-dir", str(output)])
    assert status == 0
    return output


@pytest.fixture(scope="module")
def texts(assets):
    return [json.loads(line)["review"] for line in (assets / "reviews.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(assets):
    return transformers.AutoTokenizer.from_pretrained(assets / "bert")


def torch_classifier(assets, adapter):
    import peft

    base = transformers.BertForSequenceClassification.from_pretrained(assets / "bert", num_labels=2).eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def torch_logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.numpy()


def jax_logits(model, tokenizer, texts):
    return np.asarray(model(**tokenizer(texts, return_tensors="np", padding=True)).logits)


def test_train_writes_the_run_folder_with_flags_over_the_config_file(bert_run):
    assert sorted(os.listdir(bert_run / "checkpoints")) == ["1", "2"]
    for name in ("metrics.jsonl", "training_curves.png", "adapter/adapter_model.safetensors"):
        assert (bert_run / name).is_file(), name
    adapter_config = json.loads((bert_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4  # the flag, not the file's 2
    assert adapter_config["lora_alpha"] == 8 and adapter_config["task_type"] == "SEQ_CLS"
    assert "classifier" in adapter_config["modules_to_save"]
    run = json.loads((bert_run / cli.RUN_FILE).read_text())
    assert run["task"] == "seq_cls" and run["id2label"] == {"0": "neg", "1": "pos"}
    assert run["training_arguments"]["learning_rate"] == 0.05 and run["training_arguments"]["max_steps"] == 2
    assert run["result"]["global_step"] == 2
    evaluations = [json.loads(line) for line in (bert_run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in evaluations if "eval_accuracy" in record] == [1, 2]


def test_eval_matches_torch_peft(bert_run, assets, texts, tokenizer, capsys):
    status, out, err = run_cli(capsys, "eval", "--run", bert_run, "--data", assets / "reviews.jsonl")
    assert status == 0, err
    metrics = json.loads(out)
    logits = torch_logits(torch_classifier(assets, bert_run / "adapter"), tokenizer, texts)
    labels = np.array([0, 1] * 6)  # the file's sentiments, neg=0 and pos=1 (sorted names)
    predicted = logits.argmax(-1)
    true_positive = np.sum((predicted == 1) & (labels == 1))
    f1 = 2 * true_positive / (2 * true_positive + np.sum(predicted != labels))
    loss = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert metrics["num_examples"] == 12
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-6)
    assert metrics["f1"] == pytest.approx(f1, abs=1e-6)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-4)


def test_merge_writes_a_checkpoint_transformers_loads(bert_run, assets, texts, tokenizer, capsys):
    output = assets / "merged"
    status, out, err = run_cli(capsys, "merge", "--run", bert_run, "--output", output)
    assert status == 0, err
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert torch_model.config.id2label == {0: "neg", 1: "pos"}
    merged_tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    assert merged_tokenizer("good movie")["input_ids"] == tokenizer("good movie")["input_ids"]
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    ours = jaxpeft.PeftModel.from_pretrained(base, bert_run / "adapter")
    reference = jax_logits(ours, tokenizer, texts)
    with ours.disable_adapter():
        assert np.abs(jax_logits(ours, tokenizer, texts) - reference).max() > 1e-3  # the adapter changes something
    np.testing.assert_allclose(torch_logits(torch_model, tokenizer, texts), reference, atol=1e-4)
    assert not [name for name in os.listdir(assets) if name.startswith(".")]  # no temporary folder left behind
    # an existing output folder is never replaced without --overwrite
    status, _, err = run_cli(capsys, "merge", "--model", assets / "bert", "--adapter", bert_run / "adapter",
                             "--output", output)
    assert status == 2 and "already exists" in err and "--overwrite" in err


def test_export_restores_checkpoints_that_torch_peft_loads(bert_run, assets, texts, tokenizer, capsys):
    status, out, err = run_cli(capsys, "export", "--run", bert_run, "--step", 2, "--output", assets / "last")
    assert status == 0, err
    assert json.loads(out)["step"] == 2
    # the last checkpoint holds exactly the adapter the run ended with
    final = safetensors.numpy.load_file(bert_run / "adapter" / "adapter_model.safetensors")
    exported = safetensors.numpy.load_file(assets / "last" / "adapter_model.safetensors")
    assert sorted(final) == sorted(exported)
    for name in final:
        np.testing.assert_array_equal(exported[name], final[name], err_msg=name)

    status, out, err = run_cli(capsys, "export", "--run", bert_run, "--best", "--output", assets / "best")
    assert status == 0, err
    records = [json.loads(line) for line in (bert_run / "metrics.jsonl").read_text().splitlines()]
    accuracy = {record["step"]: record["eval_accuracy"] for record in records if "eval_accuracy" in record}
    assert json.loads(out)["step"] == max(sorted(accuracy), key=lambda step: (accuracy[step], -step))
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    ours = jax_logits(jaxpeft.PeftModel.from_pretrained(base, assets / "best"), tokenizer, texts)
    np.testing.assert_allclose(torch_logits(torch_classifier(assets, assets / "best"), tokenizer, texts), ours,
                               atol=1e-4)


@pytest.fixture(scope="module")
def gpt2_adapter(assets):
    """A LoRA adapter of the GPT-2 model with random (non-zero) factors, as jaxpeft saves it."""
    base = AutoModelForCausalLM.from_pretrained(assets / "gpt2")
    config = jaxpeft.LoraConfig(r=2, task_type="CAUSAL_LM", init_lora_weights=False)
    jaxpeft.get_peft_model(base, config, seed=1).save_pretrained(assets / "gpt2_lora")
    return assets / "gpt2_lora"


def torch_causal_lm(assets, adapter):
    import peft

    base = transformers.GPT2LMHeadModel.from_pretrained(assets / "gpt2").eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def test_causal_lm_eval_and_generate_match_torch_peft(gpt2_adapter, assets, tokenizer, capsys):
    reference = torch_causal_lm(assets, gpt2_adapter)
    lines = (assets / "lines.csv").read_text().splitlines()[1:]
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tokenizer(line)["input_ids"]])
            logits = reference(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    # --model/--adapter without a run: the task comes from the adapter's config
    status, out, err = run_cli(capsys, "eval", "--model", assets / "gpt2", "--adapter", gpt2_adapter,
                               "--data", assets / "lines.csv", "--batch-size", 3)
    assert status == 0, err
    metrics = json.loads(out)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert metrics["loss"] == pytest.approx(total / count, abs=1e-4)

    prompts = ["the cat", "a green dog ran"]
    status, out, err = run_cli(capsys, "generate", "--model", assets / "gpt2", "--adapter", gpt2_adapter,
                               "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", 4, "--json")
    assert status == 0, err
    results = json.loads(out)
    assert [result["prompt"] for result in results] == prompts
    for prompt, result in zip(prompts, results, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            tokens = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                        do_sample=False, pad_token_id=0)[0]
        assert len(tokens) > ids.shape[1]
        # as transformers' text-generation pipeline: the whole text decoded, the decoded prompt replaced by the prompt
        decoded_prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
        expected = prompt + tokenizer.decode(tokens, skip_special_tokens=True)[len(decoded_prompt):]
        assert result["generated_text"] == expected


def test_eval_without_an_adapter_is_the_base_model(assets, tokenizer, capsys):
    reference = transformers.GPT2LMHeadModel.from_pretrained(assets / "gpt2").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in (assets / "lines.csv").read_text().splitlines()[1:]:
            ids = torch.tensor([tokenizer(line)["input_ids"]])
            total += reference(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    status, out, err = run_cli(capsys, "eval", "--model", assets / "gpt2", "--task", "causal_lm", "--data",
                               assets / "lines.csv")
    assert status == 0, err
    assert json.loads(out)["loss"] == pytest.approx(total / count, abs=1e-4)


def test_train_overwrite_starts_afresh(assets, bert_run, tmp_path, capsys):  # bert_run writes bert.yaml
    common = ["train", "--config", assets / "bert.yaml", "--output-dir", tmp_path, "--no-progress"]
    status, _, err = run_cli(capsys, *common)
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    status, out, err = run_cli(capsys, *common, "--overwrite", "--max-steps", 1)
    assert status == 0, err
    assert json.loads(out)["global_step"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # the earlier run's step 2 is gone


def test_merge_refuses_adapters_that_are_not_weight_changes(assets, capsys):
    base = AutoModelForCausalLM.from_pretrained(assets / "gpt2")
    jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(num_virtual_tokens=2)).save_pretrained(assets / "prompt")
    status, out, err = run_cli(capsys, "merge", "--model", assets / "gpt2", "--adapter", assets / "prompt",
                               "--output", assets / "merged_prompt")
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert "PROMPT_TUNING adapters cannot be merged" in err
    assert not (assets / "merged_prompt").exists()


@pytest.mark.parametrize("content, message", [
    ({"method": "lora", "learning_rat": 0.1}, "unknown key(s) learning_rat; valid keys for train: "),
    ({"method": "lora", "max_steps": "many"}, "config key 'max_steps' must be an integer, got 'many'"),
    ({"method": "lora", "r": 3, "model": "m", "task": "seq_cls", "output_dir": "o"},
     "the following arguments are required: --train-file"),
    ("method: [lora\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    status, out, err = run_cli(capsys, "train", "--config", path)
    assert status == 2 and out == ""
    assert err.startswith("jaxpeft train: error: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_bad_files_and_options_are_one_line_errors(assets, bert_run, tmp_path, capsys):
    common = ["train", "--model", assets / "bert", "--task", "seq_cls", "--output-dir", tmp_path / "out"]
    cases = [
        (common + ["--method", "lora", "--train-file", tmp_path / "missing.jsonl"],
         f"--train-file '{tmp_path / 'missing.jsonl'}' does not exist"),
        (common + ["--method", "ia3", "--r", 4, "--train-file", assets / "reviews.jsonl"],
         "--r is not an option of --method ia3 (IA3Config)"),
        (common + ["--method", "lora", "--option", "rank=4", "--train-file", assets / "reviews.jsonl"],
         "--rank is not an option of --method lora"),
        (common + ["--method", "lora", "--train-file", assets / "reviews.jsonl"],
         "--train-file has no column 'text' (its columns: review, sentiment); pass --text-column"),
        (["train", "--config", assets / "bert.yaml", "--output-dir", bert_run],
         "holds the outputs of an earlier run (adapter, checkpoints, jaxpeft_run.json, metrics.jsonl, "
         "training_curves.png); pass --resume to continue it, --overwrite to replace them"),
        (["eval", "--run", bert_run, "--data", assets / "lines.csv"],
         "--data has no column 'review' (its columns: text); pass --text-column"),
        (["eval", "--run", tmp_path, "--data", assets / "reviews.jsonl"], "has no jaxpeft_run.json"),
        (["export", "--run", tmp_path, "--output", tmp_path / "x"], "has no jaxpeft_run.json"),
        (["export", "--run", bert_run, "--step", 1, "--best", "--output", tmp_path / "x"], "not both"),
        (["generate", "--run", bert_run, "--prompt", "hi"], "needs a causal_lm model, but the adapter is for seq_cls"),
        (["eval", "--run", bert_run, "--data", tmp_path], "is a folder"),
        (common + ["--method", "lora", "--train-file", assets / "reviews.jsonl", "--mesh", "data=2,model=4",
                   "--text-column", "review", "--label-column", "sentiment"],
         "mesh axes ['model'] are unknown; use ['data', 'fsdp', 'tensor']"),
        (common + ["--method", "lora", "--train-file", assets / "reviews.jsonl", "--coordinator-address",
                   "127.0.0.1:1234"], "['num_processes', 'process_id'] missing"),
    ]
    for argv, message in cases:
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and out == "", argv
        assert err.startswith(f"jaxpeft {argv[0]}: error: ") and len(err.strip().splitlines()) == 1, err
        assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were checked


def test_console_script_help_and_bad_flag():
    done = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "eval", "generate", "merge", "export"):
        assert f"\n    {command} " in done.stdout
    done = subprocess.run([SCRIPT, "train", "--learnin-rate", "0.1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("jaxpeft train: error: unrecognized arguments: --learnin-rate 0.1 "
                                                    "(did you mean --learning-rate?)")


def test_python_m_jaxpeft_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["jaxpeft", "merge", "--output", "somewhere"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("jaxpeft", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("jaxpeft merge: error: pass --model (the base model) or --run (a `jaxpeft "
                                       "train` output folder)\n")
