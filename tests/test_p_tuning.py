"""P-tuning against torch PEFT on tiny random GPT-2, Llama (GQA) and BERT models, and the encoders against
torch PEFT's ``PromptEncoder`` with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from peft.tuners.p_tuning import PromptEncoder

import jaxpeft
from jaxpeft.methods.p_tuning import (
    LEAF_KEYS,
    METHOD,
    TABLE,
    PromptEncoderConfig,
    encoder_leaves_from_torch,
    prompt_table,
)
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

NUM_VIRTUAL, HIDDEN = 4, 12
FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0, num_labels=3)),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0, num_labels=3)),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3)),
}
HEADS = {
    "CAUSAL_LM": (transformers.AutoModelForCausalLM, AutoModelForCausalLM),
    "SEQ_CLS": (transformers.AutoModelForSequenceClassification, AutoModelForSequenceClassification),
}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
ENCODERS = {"mlp": dict(encoder_reparameterization_type="MLP"),
            "lstm1": dict(encoder_reparameterization_type="LSTM", encoder_num_layers=1),
            "lstm2": dict(encoder_reparameterization_type="LSTM", encoder_num_layers=2)}

_BASES: dict = {}


def _bases(family: str, task: str, tmp_path_factory):
    """(torch base model, its folder) for one family and head; built once."""
    if (family, task) not in _BASES:
        torch.manual_seed(0)
        config = FAMILIES[family]()
        config._attn_implementation = "eager"
        folder = tmp_path_factory.mktemp(f"{family}_{task}")
        HEADS[task][0].from_config(config).save_pretrained(folder)
        _BASES[(family, task)] = folder
    folder = _BASES[(family, task)]
    return HEADS[task][0].from_pretrained(folder).eval(), folder


def _config(task: str, encoder: str, **options) -> PromptEncoderConfig:
    return PromptEncoderConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task, encoder_hidden_size=HIDDEN,
                               **ENCODERS[encoder], **options)


def _torch_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{name: torch.tensor(value) for name, value in inputs.items()}).logits.numpy()


def _adapter_paths(params) -> set:
    return {path for path in jaxpeft.tree.flatten(params) if path[1] in LEAF_KEYS}


# ----- the encoder itself -----

@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_output_equals_torch_prompt_encoder(encoder):
    torch.manual_seed(2)
    torch_config = peft.PromptEncoderConfig(num_virtual_tokens=5, token_dim=16, encoder_hidden_size=HIDDEN,
                                            num_transformer_submodules=1, **ENCODERS[encoder])
    torch_encoder = PromptEncoder(torch_config).eval()
    with torch.no_grad():
        expected = torch_encoder(torch.arange(5)[None])[0].numpy()
    config = PromptEncoderConfig(num_virtual_tokens=5, token_dim=16, encoder_hidden_size=HIDDEN, **ENCODERS[encoder])
    leaves = encoder_leaves_from_torch(config, {k: v.numpy() for k, v in torch_encoder.state_dict().items()})
    variables = {"params": {key: {"default": jnp.asarray(value)} for key, value in leaves.items()}}
    # the leaves have the shapes jaxpeft creates
    created = METHOD.create(jax.random.key(0), config, None, "float32")
    assert {key: value.shape for (_, key), value in created.items()} == {k: v.shape for k, v in leaves.items()}
    got = np.asarray(jax.jit(lambda v: prompt_table(config, v))(variables))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if encoder == "lstm2":
        with_dropout = PromptEncoderConfig(num_virtual_tokens=5, token_dim=16, encoder_hidden_size=HIDDEN,
                                           encoder_dropout=0.5, **ENCODERS[encoder])

        def dropped_and_grads(variables, key):  # dropout between the LSTM's layers only when given a key
            loss = lambda v: jnp.sum(prompt_table(with_dropout, v) ** 2)  # noqa: E731
            return prompt_table(with_dropout, variables, dropout_key=key), jax.grad(loss)(variables)

        dropped, grads = jax.jit(dropped_and_grads)(variables, jax.random.key(1))
        assert np.abs(np.asarray(dropped) - got).max() > 1e-3
        assert len(grads["params"]) == 10  # the embedding, 5 LSTM and 4 MLP leaves, all of which train
        assert all(float(jnp.abs(g["default"]).max()) > 0 for g in grads["params"].values())


# ----- files both ways with torch PEFT -----

CASES = [("gpt2", "CAUSAL_LM", "mlp"), ("llama", "CAUSAL_LM", "lstm2"), ("bert", "SEQ_CLS", "mlp")]


@pytest.mark.parametrize(("family", "task", "encoder"), CASES, ids=["-".join(case) for case in CASES])
def test_adapter_folders_go_both_ways_with_torch_peft(family, task, encoder, tmp_path_factory, tmp_path):
    torch_model, folder = _bases(family, task, tmp_path_factory)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    base_logits = _torch_logits(torch_model, inputs)

    # torch PEFT (its encoder, in training mode) saves; jaxpeft loads the folder
    torch.manual_seed(1)
    torch_config = peft.PromptEncoderConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task,
                                            encoder_hidden_size=HIDDEN, **ENCODERS[encoder])
    torch_peft = peft.get_peft_model(torch_model, torch_config).eval()
    expected = _torch_logits(torch_peft, inputs)
    torch_peft.save_pretrained(tmp_path / "torch")
    loaded = jaxpeft.PeftModel.from_pretrained(HEADS[task][1].from_pretrained(folder), str(tmp_path / "torch"))
    assert _adapter_paths(loaded.params) == {("params", TABLE, "default")}
    got = np.asarray(loaded(**inputs).logits)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    real = slice(NUM_VIRTUAL, None) if task == "CAUSAL_LM" else slice(None)
    assert np.abs(got[:, real] - base_logits).max() > 1e-2  # the prompt changes the outputs

    # jaxpeft (its encoder, its own init) saves; torch PEFT loads the folder
    ours = jaxpeft.get_peft_model(HEADS[task][1].from_pretrained(folder), _config(task, encoder), seed=5)
    assert ours.peft_config["default"].encoder_hidden_size == HIDDEN
    ours_logits = np.asarray(ours(**inputs).logits)
    ours.save_pretrained(str(tmp_path / "jax"))
    torch_loaded = peft.PeftModel.from_pretrained(HEADS[task][0].from_pretrained(folder).eval(),
                                                  str(tmp_path / "jax")).eval()
    np.testing.assert_allclose(_torch_logits(torch_loaded, inputs), ours_logits, atol=1e-4, rtol=1e-4)
    if family == "gpt2":  # generate: prompt tuning's cached path, the encoder run at each step (torch: no cache,
        with torch.no_grad():  # see tests/test_prompt_tuning.py)
            tokens = torch_loaded.generate(input_ids=torch.tensor(IDS[:1]), attention_mask=torch.tensor(MASK[:1]),
                                           max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                                           use_cache=False).numpy()
        np.testing.assert_array_equal(ours.generate(IDS[:1], MASK[:1], max_new_tokens=3, eos_token_id=None), tokens)
    assert np.abs(ours_logits - got).max() > 1e-3  # another prompt (the tiny BERT's class logits are small)


def test_hidden_size_defaults_to_token_dim_as_torch_peft(tmp_path_factory):
    torch_model, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    torch_peft = peft.get_peft_model(torch_model, peft.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                   PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    theirs = torch_peft.peft_config["default"]
    ours = model.peft_config["default"]
    for name in ("token_dim", "encoder_hidden_size", "num_layers", "num_attention_heads",
                 "num_transformer_submodules"):
        assert getattr(ours, name) == getattr(theirs, name), name
    trainable = sum(p.numel() for p in torch_peft.parameters() if p.requires_grad)
    assert jaxpeft.count_parameters(model.params, model.trainable_mask).trainable == trainable


# ----- training, scanning, merging -----

def test_training_changes_only_the_p_tuning_leaves(tmp_path_factory):
    _, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), _config("CAUSAL_LM", "mlp"))
    mask = model.trainable_mask
    trainable = {path for path, trains in jaxpeft.tree.flatten(mask).items() if trains}
    assert trainable == _adapter_paths(model.params) and len(trainable) == 7  # the embedding and the MLP's 6
    apply_fn, labels = model.apply_fn, jnp.asarray(IDS)

    def loss_fn(params):
        logits = apply_fn(params, IDS, attention_mask=MASK).logits[:, NUM_VIRTUAL:]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = model.params, optimizer.init(model.params)
    losses = []
    for _ in range(3):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    before, after = jaxpeft.tree.flatten(model.params), jaxpeft.tree.flatten(params)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed == trainable
    assert losses[-1] < losses[0]


def test_scanned_llama_equals_unscanned(tmp_path_factory):
    _, folder = _bases("llama", "CAUSAL_LM", tmp_path_factory)
    plain = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), _config("CAUSAL_LM", "mlp"))
    scanned = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder, scan_layers=True),
                                     _config("CAUSAL_LM", "mlp"), seed=9)
    flat = jaxpeft.tree.flatten(scanned.params)
    flat.update({path: leaf for path, leaf in jaxpeft.tree.flatten(plain.params).items() if path[1] in LEAF_KEYS})
    scanned.params = jaxpeft.tree.unflatten_like(flat, scanned.params)
    np.testing.assert_allclose(np.asarray(scanned(input_ids=IDS, attention_mask=MASK).logits),
                               np.asarray(plain(input_ids=IDS, attention_mask=MASK).logits), atol=1e-5, rtol=1e-5)


def test_merge_is_refused_and_disabling_gives_the_base(tmp_path_factory):
    _, folder = _bases("gpt2", "CAUSAL_LM", tmp_path_factory)
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = jaxpeft.get_peft_model(base, _config("CAUSAL_LM", "mlp"))
    expected = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
    with model.disable_adapter():
        np.testing.assert_array_equal(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), expected)
    with pytest.raises(jaxpeft.AdapterError, match="P_TUNING adapters cannot be merged"):
        model.merge_and_unload()


# ----- config -----

def test_config_dict_has_torch_peft_keys_and_values():
    options = dict(num_virtual_tokens=3, task_type="CAUSAL_LM", token_dim=32, encoder_reparameterization_type="LSTM",
                   encoder_hidden_size=8, encoder_num_layers=3, encoder_dropout=0.1)
    ours = PromptEncoderConfig(**options).to_dict()
    theirs = peft.PromptEncoderConfig(**options).to_dict()
    assert set(ours) == set(theirs) - {"auto_mapping", "peft_version"}
    assert all(ours[key] == theirs[key] for key in ours), {k: (ours[k], theirs[k]) for k in ours}
    assert PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="lstm") \
        .encoder_reparameterization_type == "LSTM"


def test_config_errors_are_one_line():
    cases = [
        (dict(), "needs num_virtual_tokens"),
        (dict(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "use MLP or LSTM"),
        (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size must be a positive int"),
        (dict(num_virtual_tokens=2, encoder_num_layers=0), "encoder_num_layers must be a positive int"),
        (dict(num_virtual_tokens=2, encoder_dropout=1.0), r"encoder_dropout must be a number in \[0, 1\)"),
        (dict(num_virtual_token=3), "did you mean 'num_virtual_tokens'"),
    ]
    for options, message in cases:
        with pytest.raises(jaxpeft.ConfigError, match=message) as error:
            PromptEncoderConfig(**options)
        assert "\n" not in str(error.value)
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        METHOD.create(jax.random.key(0), PromptEncoderConfig(num_virtual_tokens=2, token_dim=4, encoder_num_layers=3),
                      None, "float32")
