"""Trainer and TrainingArguments on tiny models: learning, what changes, accumulation, resume, NaN stop, files."""

import json
import math

import jax
import numpy as np
import pytest
import transformers

import jaxpeft
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification
from jaxpeft.trainer import Trainer, TrainingArguments, TrainingStopped


def bert_config(num_labels=2, dropout=0.1):
    return transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                                   hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                   initializer_range=0.2)


@pytest.fixture(scope="module")
def bert_base():
    return AutoModelForSequenceClassification.from_config(bert_config(), seed=0)


def sentiment_data(count=32, seed=0):
    """Label 1 when token 7 occurs in the sentence, 0 when token 8 does; other tokens are noise."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        label = i % 2
        words = list(rng.integers(10, 32, rng.integers(3, 9)))
        words.insert(int(rng.integers(0, len(words))), 7 if label else 8)
        examples.append({"input_ids": [1, *map(int, words), 2], "labels": label})
    return examples


def lora_model(base, **options):
    return jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, target_modules=["query", "value"], **options))


def leaves(params):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def reference_eval_loss(model, examples):
    """Mean cross-entropy of every example, one example at a time through the model's own forward."""
    losses = []
    for example in examples:
        logits = np.asarray(model(input_ids=[example["input_ids"]]).logits[0], np.float64)
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        losses.append(-log_probs[example["labels"]])
    return float(np.mean(losses))


def test_training_learns_changes_only_trainable_leaves_and_writes_its_files(bert_base, tmp_path):
    model = lora_model(bert_base)
    before = leaves(model.params)
    mask = dict(zip(leaves(model.params), jax.tree_util.tree_leaves(model.trainable_mask), strict=True))
    train, test = sentiment_data(64, seed=0), sentiment_data(16, seed=1)
    args = TrainingArguments(tmp_path, num_train_epochs=10, per_device_train_batch_size=8, learning_rate=3e-2,
                             logging_steps=8, eval_strategy="steps", eval_steps=16, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    first = trainer.evaluate()
    result = trainer.train()
    last = trainer.evaluate()

    assert result.global_step == 10 * 64 // 8
    losses = [r["loss"] for r in trainer.log_history if "loss" in r]
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    assert last["eval_loss"] < 0.5 * first["eval_loss"] and last["eval_accuracy"] >= 0.9
    assert last["eval_loss"] == pytest.approx(reference_eval_loss(model, test), rel=1e-4)

    after = leaves(model.params)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed and all(mask[name] for name in changed)
    assert all(np.array_equal(before[name], after[name]) for name in before if not mask[name])

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "eval_loss" not in r] == list(range(8, 81, 8))
    assert [r["step"] for r in records if "eval_loss" in r and "train_runtime" not in r] == [0, 16, 32, 48, 64, 80, 80]
    assert all(r["learning_rate"] > 0 and r["samples_per_second"] > 0 for r in records if "grad_norm" in r)
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    base = AutoModelForSequenceClassification.from_config(bert_config(dropout=0.0), seed=1)
    data = sentiment_data(32)
    trained = []
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        model = lora_model(base)
        args = TrainingArguments(tmp_path / f"{batch}", max_steps=3, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, learning_rate=1e-2, save_strategy="no",
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data).train()
        trained.append(leaves(jaxpeft.partition(model.params, model.trainable_mask)[0]))
    for other in trained[1:]:
        for name, value in trained[0].items():
            np.testing.assert_allclose(other[name], value, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(value, 0) for value in trained[0].values())


class StopAfter:
    """A collator that raises on its ``limit + 1``-th call: a run killed between two steps."""

    def __init__(self, collator, limit):
        self.collator, self.limit, self.calls = collator, limit, 0

    def __call__(self, features):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt
        return self.collator(features)


def test_resumed_run_logs_the_same_losses_bit_for_bit(bert_base, tmp_path):
    data = sentiment_data(24)

    def args(folder):  # dropout on (model and LoRA) so the keys matter; 3 steps per epoch so resume crosses one
        return TrainingArguments(folder, max_steps=7, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, logging_steps=1,
                                 save_steps=2, disable_tqdm=True, seed=3)

    whole = lora_model(bert_base, lora_dropout=0.1)
    uninterrupted = Trainer(model=whole, args=args(tmp_path / "whole"), train_dataset=data)
    uninterrupted.train()
    expected = [(r["step"], r["loss"], r["grad_norm"]) for r in uninterrupted.log_history if "grad_norm" in r]

    first = lora_model(bert_base, lora_dropout=0.1)
    interrupted = Trainer(model=first, args=args(tmp_path / "run"), train_dataset=data)
    interrupted.data_collator = StopAfter(interrupted.data_collator, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    second = lora_model(bert_base, lora_dropout=0.1)
    resumed = Trainer(model=second, args=args(tmp_path / "run"), train_dataset=data)
    resumed.data_collator = counted = StopAfter(resumed.data_collator, 100)
    resumed.train(resume_from_checkpoint=True)
    seen = [(r["step"], r["loss"], r["grad_norm"]) for r in resumed.log_history if "grad_norm" in r]

    assert counted.calls == 3  # steps 5, 6, 7: it went on from the checkpoint of step 4
    assert seen == expected  # exact float equality; steps 1-4 come from the interrupted run's log
    for name, value in leaves(whole.params).items():
        np.testing.assert_array_equal(leaves(second.params)[name], value)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "grad_norm" in r] == [1, 2, 3, 4, 5, 6, 7]  # step 5 once: the resumed one


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from jaxpeft import checkpoints

    base = AutoModelForSequenceClassification.from_config(bert_config(num_labels=1, dropout=0.0), seed=0)
    model = lora_model(base)
    data = [{"input_ids": example["input_ids"], "labels": float(example["labels"])} for example in sentiment_data(16)]
    args = TrainingArguments(tmp_path, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, async_checkpointing=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    collate, calls = trainer.data_collator, []

    def poisoned(features):
        batch = collate(features)
        calls.append(1)
        if len(calls) == 3:
            batch["labels"] = np.full_like(batch["labels"], np.nan)
        return batch

    trainer.data_collator = poisoned
    with pytest.raises(TrainingStopped, match=r"nan at step 3 .*parameters of step 2, the last checkpoint is step 2"):
        trainer.train()
    manager = checkpoints.CheckpointManager(tmp_path / "checkpoints")
    assert manager.all_steps() == [2]
    restored = manager.restore(trainer.state)
    manager.close()
    assert int(restored.state.step) == 2 and int(trainer.state.step) == 2
    for name, value in leaves(restored.state.trainable).items():
        np.testing.assert_array_equal(leaves(trainer.state.trainable)[name], value)


def test_best_checkpoint_is_kept_and_loaded_at_the_end(bert_base, tmp_path):
    model = lora_model(bert_base)
    train, test = sentiment_data(32), sentiment_data(8, seed=5)
    args = TrainingArguments(tmp_path, max_steps=8, per_device_train_batch_size=8, learning_rate=2e-2,
                             eval_strategy="steps", eval_steps=2, save_steps=2, save_total_limit=1,
                             load_best_model_at_end=True, metric_for_best_model="loss", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    trainer.train()
    evals = {r["step"]: r["eval_loss"] for r in trainer.log_history if "eval_loss" in r and "step" in r}
    best = min(evals, key=evals.get)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == sorted({best, 8})
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[best], rel=1e-5)


def test_raw_text_is_tokenized_and_compute_metrics_is_called(tmp_path):
    tokenizer = transformers.BertTokenizer(vocab_file=_vocab(tmp_path))
    base = AutoModelForSequenceClassification.from_config(bert_config(), seed=0)
    model = lora_model(base)
    texts = [("a good film", 1), ("a dull film", 0), ("good", 1), ("dull and long", 0)] * 4
    train = [{"text": text, "label": label} for text, label in texts]
    received = []

    def compute_metrics(prediction):
        received.append(prediction)
        return {"agreement": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}

    args = TrainingArguments(tmp_path / "out", max_steps=2, per_device_eval_batch_size=3, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=train[:5], tokenizer=tokenizer,
                      compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert received[-1].predictions.shape == (5, 2) and received[-1].label_ids.tolist() == [1, 0, 1, 0, 1]
    assert metrics["eval_agreement"] == pytest.approx(metrics["eval_accuracy"])
    predicted = trainer.predict([{"text": "good"}, {"text": "dull"}])
    assert predicted.predictions.shape == (2, 2) and predicted.label_ids is None
    trainer.save_model()
    assert (tmp_path / "out" / "adapter_config.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()


def _vocab(folder):
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "dull", "film", "and",
                               "long"]))
    return str(path)


def test_causal_lm_training_in_bf16_keeps_float32_adapters_and_reports_perplexity(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    base = AutoModelForCausalLM.from_config(config, seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4))
    texts = [{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8][: 4 + i % 5]} for i in range(16)]
    args = TrainingArguments(tmp_path, max_steps=12, per_device_train_batch_size=4, learning_rate=3e-2, bf16=True,
                             logging_steps=4, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=texts, eval_dataset=texts[:5])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.7 * before["eval_loss"]
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]), rel=1e-6)
    trainable, _ = jaxpeft.partition(model.params, model.trainable_mask)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(trainable)} == {np.dtype("float32")}


def test_evaluation_fills_the_last_batch_without_counting_it(bert_base, tmp_path):
    test = sentiment_data(5, seed=2)  # batches of 4: the second holds one example and three weight-0 copies
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, disable_tqdm=True)
    plain = jaxpeft.PeftModel(bert_base, None)  # no adapter: the base model
    metrics = Trainer(model=plain, args=args).evaluate(test)
    assert metrics["eval_loss"] == pytest.approx(reference_eval_loss(bert_base, test), rel=1e-5)
    right = [int(np.argmax(bert_base(input_ids=[e["input_ids"]]).logits[0])) == e["labels"] for e in test]
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(right))


def test_causal_lm_evaluation_of_prompt_tuning_scores_every_token_by_hand(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    base = AutoModelForCausalLM.from_config(config, seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    texts = [{"input_ids": [1, 2, 3, 4, 5, 6, 7][: 3 + i]} for i in range(3)]
    total, count = 0.0, 0
    for text in texts:  # as HF PEFT: the labels get -100 in front, so the last virtual position scores token 0
        logits = np.asarray(model(input_ids=[text["input_ids"]]).logits[0], np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= sum(log_probs[1 + t, token] for t, token in enumerate(text["input_ids"]))
        count += len(text["input_ids"])
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=2, disable_tqdm=True)
    metrics = Trainer(model=model, args=args).evaluate(texts)
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_fresh_run_into_a_folder_with_checkpoints_refuses_unless_told_to_overwrite(bert_base, tmp_path):
    data = sentiment_data(16)

    def trainer(max_steps, **options):
        args = TrainingArguments(tmp_path, max_steps=max_steps, save_steps=1, async_checkpointing=False,
                                 disable_tqdm=True, **options)
        return Trainer(model=lora_model(bert_base), args=args, train_dataset=data)

    trainer(2).train()
    second = trainer(1)
    second.data_collator = counted = StopAfter(second.data_collator, 100)
    with pytest.raises(ValueError) as error:
        second.train()
    assert str(error.value) == (f"{tmp_path} holds the outputs of an earlier run (checkpoints, metrics.jsonl, "
                                "training_curves.png); pass resume_from_checkpoint=True to go on with it, "
                                "overwrite_output_dir=True to replace them (only what jaxpeft wrote there is removed), "
                                "or choose another output_dir")
    assert counted.calls == 0  # refused before any work
    afresh = trainer(1, overwrite_output_dir=True)
    assert afresh.train().global_step == 1
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["1"]  # step 2 of the old run: gone


@pytest.mark.parametrize("options, message", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1, got 0"),
    ({"max_steps": 0}, "max_steps must be -1 \\(train for num_train_epochs\\) or >= 1, got 0"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number, got inf"),
    ({"bf16": "yes"}, "bf16 must be of type bool, got 'yes'"),
    ({"eval_strategy": "sometimes"}, "eval_strategy='sometimes'"),
    ({"lr_scheduler_type": "step"}, "lr_scheduler_type='step'"),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 3, "save_steps": 4},
     "save_steps \\(4\\) to be a multiple of eval_steps \\(3\\)"),
])
def test_bad_arguments_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments("out", **options)


def test_bad_datasets_are_clear_errors(bert_base, tmp_path):
    model = lora_model(bert_base)
    args = TrainingArguments(tmp_path, max_steps=1, save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="pass tokenizer="):
        Trainer(model=model, args=args, train_dataset=[{"text": "hi", "label": 1}]).train()
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        Trainer(model=model, args=args, train_dataset=sentiment_data(3)).train()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer(model=model, args=args, train_dataset=sentiment_data(8)).train(resume_from_checkpoint=True)
    with pytest.raises(TypeError, match="get_peft_model"):
        Trainer(model=bert_base, args=args)


def test_token_ids_outside_the_vocabulary_are_a_one_line_error_before_the_first_step(tmp_path):
    """GPT-2's default bos/eos 50256 padding a model with a tiny vocabulary: refused before any step, not NaN."""
    base = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                                                    n_positions=32), seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2))
    data = [{"input_ids": [1, 2, 3, 4 + i % 5]} for i in range(8)]
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                                          save_strategy="no", disable_tqdm=True), train_dataset=data)
    before = leaves(model.params)
    with pytest.raises(ValueError, match=r"token id 50256, outside the model's vocabulary \(vocab_size=40\); set "
                                         r"pad_token_id and eos_token_id") as error:
        trainer.train()
    assert "\n" not in str(error.value) and trainer.state is None
    for name, value in leaves(model.params).items():
        np.testing.assert_array_equal(value, before[name])
