"""Sequence packing: a row of packed examples (segment ids in ``attention_mask``, positions restarting) computes
what each example computes alone, in every decoder family and attention kernel, through the loss, the Trainer
(``packing=True``) and its one-line errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jaxpeft
from jaxpeft import data, training
from jaxpeft.models import AutoModelForCausalLM, attention_kernels

CONFIGS = {
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32),
    "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64),
    "gemma2": transformers.Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                        sliding_window=3, attn_logit_softcapping=5.0, final_logit_softcapping=9.0,
                                        query_pre_attn_scalar=8),
}  # fmt: skip
EXAMPLES = [[5, 9, 11, 3, 7], [8, 2, 6], [13, 4, 10, 12]]
ROW_LENGTH = 14


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return AutoModelForCausalLM.from_config(CONFIGS[request.param], seed=1, scan_layers=request.param == "llama")


def packed_row():
    (row,) = data.pack_examples([{"input_ids": ids} for ids in EXAMPLES], ROW_LENGTH)
    return data.CausalLMCollator(pad_token_id=0, max_length=ROW_LENGTH, buckets=(ROW_LENGTH,))([row])


def apart():
    """The examples one per row, right-padded to the packed row's length (one shape: one compilation)."""
    return data.CausalLMCollator(pad_token_id=0, max_length=ROW_LENGTH, buckets=(ROW_LENGTH,))(
        [{"input_ids": ids} for ids in EXAMPLES]
    )


@pytest.mark.parametrize("implementation", [None, "xla_chunked"])
def test_a_packed_row_equals_its_examples_run_alone(model, implementation, monkeypatch):
    monkeypatch.setattr(attention_kernels, "DEFAULT_BLOCK_SIZE", 4)  # several query blocks in a 14-token row
    batch = packed_row()
    assert batch["attention_mask"].tolist() == [[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2]
    chosen = AutoModelForCausalLM.from_config(model.config, seed=1, scan_layers=model.module.scan_layers,
                                              attention_implementation=implementation)
    packed = np.asarray(chosen(batch["input_ids"], batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits)[0]
    alone = apart()
    alone = np.asarray(model(alone["input_ids"], alone["attention_mask"]).logits)
    start = 0
    for row, ids in enumerate(EXAMPLES):
        np.testing.assert_allclose(packed[start : start + len(ids)], alone[row, : len(ids)], atol=2e-5)
        start += len(ids)


def test_the_packed_loss_is_the_sum_of_the_examples_losses(model):
    peft_model = jaxpeft.get_peft_model(model, jaxpeft.LoraConfig(r=2, init_lora_weights=False), seed=0)
    outputs = training.peft_outputs_fn(peft_model, lm_loss_chunk_size=4)
    batch = {name: jnp.asarray(value) for name, value in packed_row().items()}
    packed = outputs(peft_model.params, batch, None)[0]
    separate = outputs(peft_model.params, {name: jnp.asarray(value) for name, value in apart().items()}, None)[0]
    assert float(packed["count"]) == float(separate["count"]) == sum(len(ids) - 1 for ids in EXAMPLES)
    np.testing.assert_allclose(float(packed["loss_sum"]), float(separate["loss_sum"]), rtol=1e-5)


def _lines(count=24, seed=0):
    rng = np.random.RandomState(seed)
    return [{"input_ids": rng.randint(1, 64, rng.randint(3, 9)).tolist()} for _ in range(count)]


def test_the_trainer_packs_rows_of_max_length_and_trains(tmp_path):
    base = AutoModelForCausalLM.from_config(CONFIGS["llama"], seed=1)
    peft_model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2), seed=0)
    args = jaxpeft.TrainingArguments(tmp_path, packing=True, max_length=16, per_device_train_batch_size=2,
                                     max_steps=3, learning_rate=1e-2, save_strategy="no", logging_steps=1,
                                     disable_tqdm=True)
    trainer = jaxpeft.Trainer(peft_model, args, train_dataset=_lines())
    rows = trainer._features(trainer.train_dataset)
    assert len(rows) < 24 and all(len(row["input_ids"]) <= 16 for row in rows)
    packed = sorted(ids for row in rows for ids in _segments(row))
    assert packed == sorted(line["input_ids"] for line in _lines())  # every example once, whole
    batch = trainer.data_collator(rows[:2])
    assert batch["input_ids"].shape == (2, 16) and batch["position_ids"].shape == (2, 16)
    result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))


def _segments(row):
    """The examples of a packed row, split by its segment ids."""
    ids, segments = np.asarray(row["input_ids"]), np.asarray(row["attention_mask"])
    return [ids[segments == segment].tolist() for segment in range(1, segments.max() + 1)]


@pytest.mark.parametrize("options, config, message", [
    ({}, jaxpeft.LoraConfig(r=2), "packing=True needs max_length="),
    ({"max_length": 16}, jaxpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
     "adds no positions"),
])  # fmt: skip
def test_packing_that_cannot_keep_examples_apart_is_a_one_line_error(tmp_path, options, config, message):
    base = AutoModelForCausalLM.from_config(CONFIGS["gpt2"], seed=1)
    args = jaxpeft.TrainingArguments(tmp_path, packing=True, **options)
    with pytest.raises(ValueError, match=message):
        jaxpeft.Trainer(jaxpeft.get_peft_model(base, config), args, train_dataset=_lines())
    classifier = jaxpeft.models.AutoModelForSequenceClassification.from_config(
        transformers.GPT2Config(**{**CONFIGS["gpt2"].to_dict(), "pad_token_id": 0}), seed=1)
    with pytest.raises(ValueError, match="packing=True is for causal_lm training, not seq_cls"):
        jaxpeft.Trainer(jaxpeft.get_peft_model(classifier, jaxpeft.LoraConfig(r=2, task_type="SEQ_CLS")),
                        jaxpeft.TrainingArguments(tmp_path, packing=True, max_length=16), train_dataset=_lines())
