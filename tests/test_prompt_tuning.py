"""Prompt tuning against torch PEFT on tiny random GPT-2, Llama (GQA), BERT and DistilBERT models, and by hand.

Weights go both ways through the method's HF format hooks (``leaves_from_hf`` takes what torch PEFT's
``get_peft_model_state_dict`` gives; ``set_peft_model_state_dict`` takes what ``hf_tensors`` gives).

torch PEFT 0.21.2's cached ``generate`` looks for ``past_key_values``, which transformers 5 calls ``cache``: it puts
the virtual tokens in again at every decoding step, so its tokens after the first disagree with its own forward pass.
``generate(use_cache=False)`` runs the forward pass on the whole sequence at each step and is the reference here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.methods.prompt_tuning import METHOD, PromptTuningConfig, extend_labels
from jaxpeft.models import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

NUM_VIRTUAL = 4
FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0, num_labels=3)),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0, num_labels=3)),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3)),
    "distilbert": (lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                         vocab_size=99, num_labels=3)),
}
HEADS = {
    "CAUSAL_LM": (transformers.AutoModelForCausalLM, AutoModelForCausalLM),
    "SEQ_CLS": (transformers.AutoModelForSequenceClassification, AutoModelForSequenceClassification),
    "TOKEN_CLS": (transformers.AutoModelForTokenClassification, AutoModelForTokenClassification),
}
CASES = [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("gpt2", "SEQ_CLS"), ("llama", "SEQ_CLS"),
         ("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("distilbert", "SEQ_CLS")]
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TOKEN_TYPES = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])

_BASES: dict = {}


def _bases(family: str, task: str, tmp_path_factory):
    """(torch base model, its folder) for one family and head; built once."""
    if (family, task) not in _BASES:
        torch.manual_seed(0)
        config = FAMILIES[family]()
        config._attn_implementation = "eager"
        model = HEADS[task][0].from_config(config).eval()
        folder = tmp_path_factory.mktemp(f"{family}_{task}")
        model.save_pretrained(folder)
        _BASES[(family, task)] = folder
    folder = _BASES[(family, task)]
    return HEADS[task][0].from_pretrained(folder).eval(), folder


def _torch_peft(torch_model, task: str, **options):
    if torch_model.config.model_type == "distilbert":  # torch PEFT cannot read DistilBERT's sizes (`dim`, ...)
        options = dict(token_dim=32, num_layers=2, num_attention_heads=4, **options)
    config = peft.PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task, **options)
    return peft.get_peft_model(torch_model, config).eval()


def _inputs(family: str) -> dict:
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    if family == "bert":
        inputs["token_type_ids"] = TOKEN_TYPES
    return inputs


def _torch_logits(model, inputs: dict) -> np.ndarray:
    """torch's logits; for a decoder classifier, each row run without its padding: with prompt tuning torch pools
    the last position of ``inputs_embeds`` (a pad token in a right-padded row), jaxpeft the last token the mask
    keeps."""
    with torch.no_grad():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if base.config.model_type in ("bert", "distilbert", "roberta") or not type(base).__name__.endswith(
                "SequenceClassification") or not hasattr(model, "get_base_model"):
            return model(**{name: torch.tensor(value) for name, value in inputs.items()}).logits.numpy()
        keep = inputs["attention_mask"] == 1
        return np.concatenate([
            model(**{name: torch.tensor(value[row][keep[row]][None]) for name, value in inputs.items()
                     if name != "attention_mask"}).logits.numpy() for row in range(len(keep))])


def _real_positions(logits: np.ndarray, task: str) -> np.ndarray:
    """The logits of the real tokens (prompt-tuned CAUSAL_LM / TOKEN_CLS logits include the virtual positions)."""
    return logits[:, NUM_VIRTUAL:] if task in ("CAUSAL_LM", "TOKEN_CLS") else logits


@pytest.mark.parametrize(("family", "task"), CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_weights_go_both_ways_with_torch_peft(family, task, tmp_path_factory):
    torch_model, folder = _bases(family, task, tmp_path_factory)
    torch_peft = _torch_peft(torch_model, task)
    base = HEADS[task][1].from_pretrained(folder)
    model = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task), seed=3)
    config = model.peft_config["default"]
    torch_config = torch_peft.peft_config["default"].to_dict()
    for name in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(config, name) == torch_config[name], name
    inputs = _inputs(family)

    # torch PEFT -> jaxpeft
    torch_state = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(torch_peft).items()}
    model.params = METHOD.leaves_from_hf(config, torch_state, model.params, "default")
    expected = _torch_logits(torch_peft, inputs)
    got = np.asarray(model(**inputs).logits)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    base_logits = _torch_logits(torch_model, inputs)  # prompt tuning leaves the torch base model as it was
    assert np.abs(_real_positions(expected, task) - base_logits).max() > 1e-2  # the prompt changes the outputs

    # jaxpeft (its own random init) -> torch PEFT
    ours = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task), seed=7)
    tensors = METHOD.hf_tensors(config, ours.params, "default")
    assert set(tensors) == {"prompt_embeddings"} and tensors["prompt_embeddings"].shape == (NUM_VIRTUAL, 32)
    # The head copies (modules_to_save) are the base weights on both sides; only the prompt comes from jaxpeft.
    state = {**torch_state, **tensors}
    peft.set_peft_model_state_dict(torch_peft, {k: torch.tensor(v) for k, v in state.items()})
    expected = _torch_logits(torch_peft, inputs)
    ours_logits = np.asarray(model(**inputs, params=ours.params).logits)
    np.testing.assert_allclose(ours_logits, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(ours_logits - got).max() > 1e-2


def test_scanned_llama_matches_torch_peft(tmp_path_factory):
    torch_model, folder = _bases("llama", "CAUSAL_LM", tmp_path_factory)
    torch_peft = _torch_peft(torch_model, "CAUSAL_LM")
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, scan_layers=True),
                                   PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="CAUSAL_LM"))
    torch_state = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(torch_peft).items()}
    model.params = METHOD.leaves_from_hf(model.peft_config["default"], torch_state, model.params, "default")
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits),
                               _torch_logits(torch_peft, _inputs("llama")), atol=1e-4, rtol=1e-4)


def test_feature_extraction_ignores_token_types_and_positions_as_torch_peft(tmp_path_factory):
    torch.manual_seed(0)
    config = FAMILIES["bert"]()
    config._attn_implementation = "eager"
    folder = tmp_path_factory.mktemp("bert_base")
    transformers.BertModel(config).save_pretrained(folder)
    torch_peft = _torch_peft(transformers.BertModel.from_pretrained(folder).eval(), "FEATURE_EXTRACTION")
    model = jaxpeft.get_peft_model(AutoModel.from_pretrained(folder), PromptTuningConfig(
        num_virtual_tokens=NUM_VIRTUAL, task_type="FEATURE_EXTRACTION"))
    torch_state = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(torch_peft).items()}
    model.params = METHOD.leaves_from_hf(model.peft_config["default"], torch_state, model.params, "default")
    inputs = {**_inputs("bert"), "position_ids": np.array([[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])}
    with torch.no_grad():
        expected = torch_peft(**{k: torch.tensor(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    with pytest.warns(UserWarning, match="ignored with prompt tuning") as warned:
        got = np.asarray(model(**inputs).last_hidden_state)
    assert {str(w.message).split(" ")[0] for w in warned} == {"position_ids", "token_type_ids"}
    assert got.shape == (2, NUM_VIRTUAL + 6, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_matches_torch_peft(family, tmp_path_factory):
    torch_model, folder = _bases(family, "CAUSAL_LM", tmp_path_factory)
    torch_peft = _torch_peft(torch_model, "CAUSAL_LM")
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                   PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="CAUSAL_LM"))
    torch_state = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(torch_peft).items()}
    model.params = METHOD.leaves_from_hf(model.peft_config["default"], torch_state, model.params, "default")
    prompts = np.array([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])  # left padding in the first row
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = torch_peft.generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
                                       max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                                       use_cache=False).numpy()
    got = model.generate(prompts, mask, max_new_tokens=10, eos_token_id=None)
    np.testing.assert_array_equal(got, expected)
    with model.disable_adapter():
        plain = model.generate(prompts, mask, max_new_tokens=10, eos_token_id=None)
    assert not np.array_equal(plain, got)


def test_tutorial_spelling_on_distilbert(tmp_path_factory, capsys):
    torch_model, folder = _bases("distilbert", "SEQ_CLS", tmp_path_factory)
    model = jaxpeft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(folder),
                                   PromptTuningConfig(prompt_length=5, task_type="classification"))
    config = model.peft_config["default"]
    assert (config.num_virtual_tokens, config.task_type, config.modules_to_save) == (5, "SEQ_CLS", ["classifier"])
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (32, 2, 4)
    model.print_trainable_parameters()
    # the prompt and the copies of the heads: "classifier" also selects pre_classifier, as in HF PEFT
    trainable = 5 * 32 + (32 * 3 + 3) + (32 * 32 + 32)
    total = sum(p.numel() for p in torch_model.parameters()) + trainable
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert model(input_ids=IDS, attention_mask=MASK).logits.shape == (2, 3)


def test_trainable_parameter_line_matches_torch_peft(tmp_path_factory, capsys):
    torch_model, folder = _bases("bert", "SEQ_CLS", tmp_path_factory)
    model = jaxpeft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(folder),
                                   PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="SEQ_CLS"))
    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    _torch_peft(torch_model, "SEQ_CLS").print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_only_the_prompt_and_saved_head_train(tmp_path_factory):
    _, folder = _bases("distilbert", "SEQ_CLS", tmp_path_factory)
    model = jaxpeft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(folder),
                                   PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="SEQ_CLS"))
    mask = model.trainable_mask
    trainable = {path for path, trains in jaxpeft.tree.flatten(mask).items() if trains}
    assert trainable == {("params", "prompt_embeddings", "default"),
                         ("params", "classifier", "modules_to_save", "default", "kernel"),
                         ("params", "classifier", "modules_to_save", "default", "bias"),
                         ("params", "pre_classifier", "modules_to_save", "default", "kernel"),
                         ("params", "pre_classifier", "modules_to_save", "default", "bias")}
    labels = jnp.array([0, 2])
    apply_fn = model.apply_fn

    def loss_fn(trained, frozen):
        logits = apply_fn(jaxpeft.combine(trained, frozen), IDS, attention_mask=MASK).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    trained, frozen = jaxpeft.partition(model.params, mask)
    grads = jax.jit(jax.grad(loss_fn))(trained, frozen)
    grad_leaves = {path: leaf for path, leaf in jaxpeft.tree.flatten(grads).items() if leaf is not None}
    assert set(grad_leaves) == trainable and all(float(jnp.abs(g).max()) > 0 for g in grad_leaves.values())

    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)
    # Nonzero gradients everywhere: the frozen leaves must stay as they are all the same.
    full_grads = jaxpeft.combine(grads, jax.tree_util.tree_map(jnp.ones_like, frozen))
    updates, _ = optimizer.update(full_grads, optimizer.init(model.params), model.params)
    stepped = optax.apply_updates(model.params, updates)
    before, after = jaxpeft.tree.flatten(model.params), jaxpeft.tree.flatten(stepped)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed == trainable


def test_disable_adapter_gives_base_outputs_and_merge_is_refused(tmp_path_factory):
    _, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="CAUSAL_LM"))
    expected = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
    with model.disable_adapter():
        np.testing.assert_array_equal(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), expected)
    assert model(input_ids=IDS, attention_mask=MASK).logits.shape == (2, NUM_VIRTUAL + 6, 99)
    with pytest.raises(jaxpeft.AdapterError, match="PROMPT_TUNING adapters cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    np.testing.assert_array_equal(np.asarray(unloaded(input_ids=IDS, attention_mask=MASK).logits), expected)


def test_extend_labels_gives_torch_peft_loss(tmp_path_factory):
    torch_model, folder = _bases("llama", "CAUSAL_LM", tmp_path_factory)
    torch_peft = _torch_peft(torch_model, "CAUSAL_LM")
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                   PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type="CAUSAL_LM"))
    torch_state = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(torch_peft).items()}
    model.params = METHOD.leaves_from_hf(model.peft_config["default"], torch_state, model.params, "default")
    labels = np.where(MASK == 1, IDS, -100)
    with torch.no_grad():
        expected = torch_peft(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                              labels=torch.tensor(labels)).loss.item()
    logits = model(input_ids=IDS, attention_mask=MASK).logits[:, :-1]
    targets = extend_labels(labels, NUM_VIRTUAL)[:, 1:]
    keep = targets != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
    assert float((losses * keep).sum() / keep.sum()) == pytest.approx(expected, abs=1e-5)
    assert extend_labels(labels, 2).shape == (2, 8) and (np.asarray(extend_labels(labels, 2))[:, :2] == -100).all()


# ----- initialisation -----

def _word_tokenizer(folder):
    import tokenizers

    words = ["[UNK]", "the", "movie", "was", "great", "bad", "review", "sentiment"]
    vocab = {word: i + 10 for i, word in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("num_virtual", [2, 7], ids=["truncated", "repeated"])
def test_text_init_matches_torch_peft(num_virtual, tmp_path_factory, tmp_path):
    torch_model, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    options = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="the movie was great",
                   tokenizer_name_or_path=_word_tokenizer(tmp_path))
    torch_peft = peft.get_peft_model(torch_model, peft.PromptTuningConfig(
        num_virtual_tokens=num_virtual, task_type="CAUSAL_LM", **options))
    expected = peft.get_peft_model_state_dict(torch_peft)["prompt_embeddings"].numpy()
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), PromptTuningConfig(
        num_virtual_tokens=num_virtual, task_type="CAUSAL_LM", **options))
    np.testing.assert_array_equal(METHOD.hf_tensors(None, model.params, "default")["prompt_embeddings"], expected)


def test_sample_vocab_and_random_init(tmp_path_factory):
    _, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    base = AutoModelForCausalLM.from_pretrained(folder)
    table = np.asarray(base.params["params"]["transformer"]["wte"]["embedding"])
    sampled = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = np.asarray(sampled.params["params"]["prompt_embeddings"]["default"])
    assert all(any(np.array_equal(row, vocab_row) for vocab_row in table) for row in rows)
    assert len({row.tobytes() for row in rows}) > 1
    random = jaxpeft.get_peft_model(base, PromptTuningConfig(num_virtual_tokens=40))
    values = np.asarray(random.params["params"]["prompt_embeddings"]["default"])
    assert values.dtype == np.float32 and values.shape == (40, 32)
    assert abs(values.mean()) < 0.1 and 0.9 < values.std() < 1.1  # standard normal, as torch's nn.Embedding
    assert not any(np.array_equal(row, vocab_row) for row in values[:3] for vocab_row in table)


def test_text_init_without_a_reachable_tokenizer_is_a_clear_error(tmp_path_factory):
    _, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                tokenizer_name_or_path="no-such-org/no-such-tokenizer")
    with pytest.raises(jaxpeft.ConfigError, match="cannot load tokenizer_name_or_path") as error:
        jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)
    assert "\n" not in str(error.value)


# ----- a linen model of one's own, through the functional core -----

class TinyClassifier(nn.Module):
    """Follows the convention: ``inputs_embeds=`` in place of ``input_ids``, and ``embed_input_ids``."""

    def setup(self):
        self.embed = nn.Embed(20, 8)
        self.out = nn.Dense(3)

    def embed_input_ids(self, input_ids):
        return self.embed(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        weights = jnp.ones(hidden.shape[:2]) if attention_mask is None else attention_mask
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
        return self.out(pooled)


def test_own_linen_model_by_hand():
    model = TinyClassifier()
    ids, mask = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([[1, 1, 1], [1, 1, 0]])
    base = model.init(jax.random.key(0), ids, mask)
    config = PromptTuningConfig(num_virtual_tokens=2)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids, mask)
    prompt = variables["params"]["prompt_embeddings"]["default"]
    assert prompt.shape == (2, 8)  # token_dim from the nn.Embed
    got = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids, attention_mask=mask)

    table, kernel, bias = (np.asarray(x) for x in (base["params"]["embed"]["embedding"],
                                                   base["params"]["out"]["kernel"], base["params"]["out"]["bias"]))
    for row in range(2):
        real = table[np.asarray(ids[row])[np.asarray(mask[row]) == 1]]
        pooled = np.concatenate([np.asarray(prompt), real]).mean(0)
        np.testing.assert_allclose(np.asarray(got[row]), pooled @ kernel + bias, rtol=1e-5, atol=1e-6)
    trainable = jaxpeft.count_parameters(variables, jaxpeft.trainable_mask(variables, config)).trainable
    assert trainable == 16


def test_own_model_without_embedding_needs_token_dim():
    model = nn.Dense(4)
    x = jnp.ones((1, 3, 5))
    with pytest.raises(jaxpeft.AdapterError, match=r"set PromptTuningConfig\(token_dim=") as error:
        jaxpeft.init_adapters(jax.random.key(0), PromptTuningConfig(num_virtual_tokens=2), model.apply,
                              model.init(jax.random.key(1), x), x)
    assert "\n" not in str(error.value)
    variables = jaxpeft.init_adapters(jax.random.key(0), PromptTuningConfig(num_virtual_tokens=2, token_dim=5),
                                      model.apply, model.init(jax.random.key(1), x), x)
    assert variables["params"]["prompt_embeddings"]["default"].shape == (2, 5)


# ----- config and file format -----

def test_config_dict_has_torch_peft_keys_and_values():
    ours = PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", token_dim=32).to_dict()
    theirs = peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", token_dim=32).to_dict()
    assert set(ours) == set(theirs) - {"auto_mapping", "peft_version"}
    assert all(ours[key] == theirs[key] for key in ours), {k: (ours[k], theirs[k]) for k in ours}


def test_config_errors_are_one_line():
    cases = [
        (dict(), "needs num_virtual_tokens"),
        (dict(num_virtual_tokens=0), "positive int"),
        (dict(prompt_length=3, num_virtual_tokens=4), "disagree"),
        (dict(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x"), "tokenizer_name_or_path"),
        (dict(num_virtual_tokens=3, prompt_tuning_init="TEXT", tokenizer_name_or_path="t"), "init_text"),
        (dict(num_virtual_tokens=3, prompt_tuning_init="ZEROS"), "RANDOM, TEXT, SAMPLE_VOCAB"),
        (dict(num_virtual_tokens=3, tokenizer_kwargs={"use_fast": True}), "only with prompt_tuning_init='TEXT'"),
        (dict(num_virtual_token=3), "did you mean 'num_virtual_tokens'"),
    ]
    for options, message in cases:
        with pytest.raises(jaxpeft.ConfigError, match=message) as error:
            PromptTuningConfig(**options)
        assert "\n" not in str(error.value)
    assert PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="sample_vocab").prompt_tuning_init == \
        "SAMPLE_VOCAB"


def test_hf_tensor_errors():
    config = PromptTuningConfig(num_virtual_tokens=3, token_dim=4)
    variables = {"params": {"w": jnp.ones(2)}}
    with pytest.raises(jaxpeft.AdapterError, match="lack 'prompt_embeddings'"):
        METHOD.leaves_from_hf(config, {"other": np.ones((3, 4))}, variables, "default")
    with pytest.raises(jaxpeft.AdapterError, match=r"shape \(2, 4\); this config and model need \(3, 4\)"):
        METHOD.leaves_from_hf(config, {"prompt_embeddings": np.ones((2, 4))}, variables, "default")
    loaded = METHOD.leaves_from_hf(config, {"prompt_embeddings": np.full((3, 4), 2.0)}, variables, "a")
    assert loaded["params"]["prompt_embeddings"]["a"].dtype == jnp.float32
    with pytest.raises(jaxpeft.AdapterError, match="no prompt tuning adapter 'b'"):
        METHOD.hf_tensors(config, loaded, "b")
