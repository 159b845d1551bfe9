"""Prefix tuning against torch PEFT on tiny random GPT-2, Llama (grouped-query attention) and BERT models.

The adapters go both ways: torch PEFT's (through its state dict, and for ``prefix_projection`` also its MLP weights)
must give torch PEFT's logits in jaxpeft, and jaxpeft's (through ``hf_tensors``) torch PEFT's logits in torch.
"""

import dataclasses

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
from jaxpeft.methods import prefix_tuning
from jaxpeft.methods.prefix_tuning import PrefixTuningConfig
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification
from jaxpeft.tree import flatten

torch.set_num_threads(2)
# torch PEFT 0.21 still passes the prefix as `past_key_values`, which transformers 5 renames (with this warning).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

NUM_VIRTUAL = 3
TOLERANCE = 1e-4
FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0, bos_token_id=None, eos_token_id=None,
                                             initializer_range=0.2), "CAUSAL_LM"),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0, bos_token_id=None, eos_token_id=None,
                                               initializer_range=0.2), "CAUSAL_LM"),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=37, vocab_size=99, num_labels=3), "SEQ_CLS"),
}
TORCH_CLASSES = {"CAUSAL_LM": transformers.AutoModelForCausalLM,
                 "SEQ_CLS": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
LEFT_PADDED_IDS = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
LEFT_PADDED_MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> folder of a tiny random torch model (saved once per family)."""
    folders = {}
    for family, (make_config, task) in FAMILIES.items():
        torch.manual_seed(0)
        config = make_config()
        config._attn_implementation = "eager"
        folders[family] = tmp_path_factory.mktemp(family)
        TORCH_CLASSES[task].from_config(config).save_pretrained(folders[family])
    return folders


_JAX_MODELS = {}


def jax_model(checkpoints, family, scan_layers=False):
    key = (family, scan_layers)
    if key not in _JAX_MODELS:
        task = FAMILIES[family][1]
        _JAX_MODELS[key] = JAX_CLASSES[task].from_pretrained(checkpoints[family], scan_layers=scan_layers)
    return _JAX_MODELS[key]


def torch_peft_model(checkpoints, family, projection, inference_mode=False, seed=1):
    """A torch PEFT prefix tuning model with its own random (non-trivial) prefix."""
    task = FAMILIES[family][1]
    base = TORCH_CLASSES[task].from_pretrained(checkpoints[family], attn_implementation="eager").eval()
    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=task, prefix_projection=projection,
                                     encoder_hidden_size=24 if projection else None, inference_mode=inference_mode)
    return peft.get_peft_model(base, config).eval()


def jax_config(model, family, projection):
    config = PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL, task_type=FAMILIES[family][1],
                                prefix_projection=projection, encoder_hidden_size=24 if projection else None)
    return prefix_tuning.prepare(config, model)


def torch_logits(peft_model, ids, mask, position_ids=None):
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        if peft_model.peft_config["default"].task_type == "CAUSAL_LM":
            positions = None if position_ids is None else torch.tensor(position_ids)
            return peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
        # torch PEFT's SEQ_CLS forward refuses BERT under transformers 5 (BertForSequenceClassification.forward has no
        # `past_key_values`); these are the steps of its _prefix_tuning_forward for a model without it.
        model = peft_model.base_model
        full_mask = torch.cat([torch.ones(len(ids), NUM_VIRTUAL, dtype=mask.dtype), mask], dim=1)
        prefix = peft_model.get_prompt(len(ids))
        pooled = model.bert(input_ids=ids, attention_mask=full_mask, cache=prefix).pooler_output
        return model.classifier(model.dropout(pooled)).numpy()


_APPLIES = {}


def jax_logits(model, config, variables, ids, mask, **kwargs):
    key = (id(model), config.prefix_projection)  # one jitted apply per model and form, reused across tests
    if key not in _APPLIES:
        _APPLIES[key] = (model, jax.jit(jaxpeft.rewrite(model.apply_fn, config)))
    out = _APPLIES[key][1](variables, ids, attention_mask=mask, **kwargs)
    return np.asarray(out.logits)


def compared(logits, mask):
    """The logits that mean something: real tokens of a causal LM, every row of a classifier."""
    return logits[mask.astype(bool)] if logits.ndim == 3 else logits


def mlp_leaves_from_torch(peft_model) -> dict:
    encoder = peft_model.prompt_encoder["default"]
    weights = {
        prefix_tuning.EMBEDDING: encoder.embedding.weight,
        prefix_tuning.MLP_IN_KERNEL: encoder.transform[0].weight.T,
        prefix_tuning.MLP_IN_BIAS: encoder.transform[0].bias,
        prefix_tuning.MLP_OUT_KERNEL: encoder.transform[2].weight.T,
        prefix_tuning.MLP_OUT_BIAS: encoder.transform[2].bias,
    }
    return {key: {"default": jnp.asarray(value.detach().numpy())} for key, value in weights.items()}


def with_leaves(variables, leaves: dict):
    return {**variables, "params": {**variables["params"], **leaves}}


def from_torch(config, peft_model, base_variables, via: str):
    """jaxpeft variables holding torch PEFT's adapter: through its state dict (the file) or its MLP weights."""
    if via == "file":
        tensors = {name: value.numpy() for name, value in peft.get_peft_model_state_dict(peft_model).items()}
        return prefix_tuning.METHOD.leaves_from_hf(config, {"prompt_embeddings": tensors["prompt_embeddings"]},
                                                   base_variables, "default")
    return with_leaves(base_variables, mlp_leaves_from_torch(peft_model))


# ----- the config -----

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_is_filled_from_the_model_like_torch_peft(checkpoints, family):
    torch_config = torch_peft_model(checkpoints, family, projection=False).peft_config["default"]
    config = prefix_tuning.prepare(PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL),
                                   jax_model(checkpoints, family))
    for name in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules",
                 "encoder_hidden_size"):
        assert getattr(config, name) == getattr(torch_config, name), name
    if family == "llama":  # grouped-query attention: the prefix has the key/value heads
        assert (config.num_attention_heads, config.token_dim) == (2, 16)


def test_config_json_has_torch_peft_keys_and_accepts_the_tutorial_spelling():
    config = PrefixTuningConfig(prefix_length=10, task_type="text-generation")
    assert (config.num_virtual_tokens, config.task_type) == (10, "CAUSAL_LM")
    ours = config.to_dict()
    theirs = peft.PrefixTuningConfig(num_virtual_tokens=10, task_type="CAUSAL_LM").to_dict()
    assert set(ours) == set(theirs) - {"auto_mapping", "peft_version"}
    assert ours["peft_type"] == "PREFIX_TUNING" and "prefix_length" not in ours
    for name in ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "init_weights", "task_type"):
        assert ours[name] == theirs[name], name
    assert PrefixTuningConfig(**{k: v for k, v in ours.items() if k != "peft_type"}) == config


@pytest.mark.parametrize("options, message", [
    ({}, "needs num_virtual_tokens"),
    ({"prefix_length": 4, "num_virtual_tokens": 5}, "disagree"),
    ({"num_virtual_tokens": 4, "init_weights": "normal"}, "init_weights"),
    ({"num_virtual_tokens": 4, "task_type": "SEQ_2_SEQ_LM"}, "encoder-decoder"),
    ({"num_virtual_tokens": 4, "num_transformer_submodules": 2}, "encoder-decoder"),
    ({"num_virtual_tokens": 4, "token_dim": 10, "num_attention_heads": 4}, "multiple of num_attention_heads"),
    ({"num_virtual_tokens": 4, "prefix_lenght": 4}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(jaxpeft.ConfigError, match=message) as error:
        PrefixTuningConfig(**options)
    assert "\n" not in str(error.value)


# ----- torch PEFT <-> jaxpeft -----

@pytest.mark.parametrize("projection, scan_layers", [(False, False), (True, False), (False, True)],
                         ids=["table-unscanned", "projection-unscanned", "table-scanned"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_peft_adapter_gives_torch_peft_logits(checkpoints, family, projection, scan_layers):
    peft_model = torch_peft_model(checkpoints, family, projection)
    model = jax_model(checkpoints, family, scan_layers)
    config = jax_config(model, family, projection)
    expected = torch_logits(peft_model, IDS, MASK)
    base = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    assert np.abs(compared(base, MASK) - compared(expected, MASK)).max() > 1e-2  # the prefix matters

    prompt = peft_model.get_prompt(1)
    for via in ("file", "mlp") if projection else ("file",):
        variables = from_torch(config, peft_model, model.params, via)
        keys, values = prefix_tuning.prefix_key_values(config, variables)
        for layer in range(config.num_layers):
            torch_keys, torch_values = prompt.layers[layer].keys, prompt.layers[layer].values  # (1, heads, P, dim)
            np.testing.assert_allclose(keys[layer], torch_keys.detach().numpy().transpose(0, 2, 1, 3), atol=1e-5)
            np.testing.assert_allclose(values[layer], torch_values.detach().numpy().transpose(0, 2, 1, 3), atol=1e-5)
        got = jax_logits(model, config, variables, IDS, MASK)
        np.testing.assert_allclose(compared(got, MASK), compared(expected, MASK), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jaxpeft_adapter_gives_the_same_logits_in_torch_peft(checkpoints, family, projection):
    model = jax_model(checkpoints, family)
    config = jax_config(model, family, projection)
    variables = jaxpeft.init_adapters(jax.random.key(3), config, model.apply_fn, model.params, IDS, MASK)
    got = jax_logits(model, config, variables, IDS, MASK)

    # The file form, loaded as torch PEFT loads it (prompt learning adapters load for inference: the table form).
    loaded = torch_peft_model(checkpoints, family, projection, inference_mode=True, seed=7)
    tensors = peft.get_peft_model_state_dict(loaded)  # its classifier copy (SEQ_CLS) equals the base classifier
    tensors.update({name: torch.tensor(value) for name, value in
                    prefix_tuning.METHOD.hf_tensors(config, variables, "default").items()})
    peft.set_peft_model_state_dict(loaded, tensors)
    np.testing.assert_allclose(compared(got, MASK), compared(torch_logits(loaded, IDS, MASK), MASK),
                               atol=TOLERANCE, rtol=0)
    if projection:  # the MLP itself, in a trainable torch PEFT model
        trainable = torch_peft_model(checkpoints, family, projection, seed=8)
        encoder = trainable.prompt_encoder["default"]
        leaves = {key: np.asarray(variables["params"][key]["default"]) for key in prefix_tuning.PROJECTION_KEYS}
        with torch.no_grad():
            encoder.embedding.weight.copy_(torch.tensor(leaves[prefix_tuning.EMBEDDING]))
            encoder.transform[0].weight.copy_(torch.tensor(leaves[prefix_tuning.MLP_IN_KERNEL].T))
            encoder.transform[0].bias.copy_(torch.tensor(leaves[prefix_tuning.MLP_IN_BIAS]))
            encoder.transform[2].weight.copy_(torch.tensor(leaves[prefix_tuning.MLP_OUT_KERNEL].T))
            encoder.transform[2].bias.copy_(torch.tensor(leaves[prefix_tuning.MLP_OUT_BIAS]))
        np.testing.assert_allclose(compared(got, MASK), compared(torch_logits(trainable, IDS, MASK), MASK),
                                   atol=TOLERANCE, rtol=0)


def test_position_ids_given_by_the_caller_come_after_the_prefix_as_in_torch_peft(checkpoints):
    peft_model = torch_peft_model(checkpoints, "llama", projection=False)
    model = jax_model(checkpoints, "llama")
    config = jax_config(model, "llama", False)
    variables = from_torch(config, peft_model, model.params, "file")
    positions = np.maximum(np.cumsum(LEFT_PADDED_MASK, axis=1) - 1, 0)
    expected = torch_logits(peft_model, LEFT_PADDED_IDS, LEFT_PADDED_MASK, positions)
    got = jax_logits(model, config, variables, LEFT_PADDED_IDS, LEFT_PADDED_MASK, position_ids=positions)
    np.testing.assert_allclose(compared(got, LEFT_PADDED_MASK), compared(expected, LEFT_PADDED_MASK),
                               atol=TOLERANCE, rtol=0)


def torch_peft_generate(peft_model, ids, mask, max_new_tokens):
    """torch PEFT's greedy ``generate``. torch PEFT 0.21 hands the prefix to the model as ``past_key_values`` while
    transformers 5's generate passes its own (empty) cache as ``cache``, which wins: the prefix would be lost. Naming
    generate's cache ``past_key_values`` for PEFT's prepare_inputs_for_generation restores what PEFT intends."""
    original = peft_model.base_model_prepare_inputs_for_generation

    def renamed(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = renamed
    try:
        with torch.no_grad():
            return peft_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                       max_new_tokens=max_new_tokens, do_sample=False).numpy()
    finally:
        peft_model.base_model_prepare_inputs_for_generation = original
        peft_model.base_model.prepare_inputs_for_generation = original


def torch_peft_greedy_without_cache(peft_model, ids, mask, max_new_tokens):
    """Greedy decoding by whole torch PEFT forward passes, positions counted over real tokens as generate does."""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids.numpy()


@pytest.mark.parametrize("family, projection, scans", [("gpt2", False, (False,)), ("llama", True, (False, True))])
def test_generate_gives_torch_peft_tokens_scanned_and_unscanned(checkpoints, family, projection, scans):
    peft_model = torch_peft_model(checkpoints, family, projection)
    expected = torch_peft_generate(peft_model, LEFT_PADDED_IDS, LEFT_PADDED_MASK, 8)
    np.testing.assert_array_equal(
        expected, torch_peft_greedy_without_cache(peft_model, LEFT_PADDED_IDS, LEFT_PADDED_MASK, 8))
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family]).generate(
            input_ids=torch.tensor(LEFT_PADDED_IDS), attention_mask=torch.tensor(LEFT_PADDED_MASK),
            max_new_tokens=8, do_sample=False)
    assert (plain.numpy() != expected).any()  # the prefix changes what is generated
    for scan_layers in scans:
        base = jax_model(checkpoints, family, scan_layers)
        model = jaxpeft.get_peft_model(base, jax_config(base, family, projection))
        model.params = from_torch(model.peft_config["default"], peft_model, model.params,
                                  "mlp" if projection else "file")
        got = model.generate(LEFT_PADDED_IDS, attention_mask=LEFT_PADDED_MASK, max_length=13, eos_token_id=None)
        np.testing.assert_array_equal(got, expected)


def test_adapter_folders_go_both_ways_with_torch_peft(checkpoints, tmp_path):
    """PeftModel.save_pretrained / from_pretrained: the projected table is the file, as torch PEFT writes it."""
    base = jax_model(checkpoints, "gpt2")
    model = jaxpeft.get_peft_model(base, jax_config(base, "gpt2", True))
    model.save_pretrained(tmp_path / "ours")
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"], attn_implementation="eager")
    loaded_in_torch = peft.PeftModel.from_pretrained(torch_base.eval(), tmp_path / "ours").eval()
    np.testing.assert_allclose(compared(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), MASK),
                               compared(torch_logits(loaded_in_torch, IDS, MASK), MASK), atol=TOLERANCE, rtol=0)

    peft_model = torch_peft_model(checkpoints, "gpt2", projection=True, seed=5)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path / "theirs")
    np.testing.assert_allclose(compared(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), MASK),
                               compared(torch_logits(peft_model, IDS, MASK), MASK), atol=TOLERANCE, rtol=0)


# ----- PeftModel workflow -----

def test_tutorial_spelling_on_gpt2(checkpoints):
    model = jaxpeft.get_peft_model(jax_model(checkpoints, "gpt2"),
                                   PrefixTuningConfig(prefix_length=10, task_type="text-generation"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 10 * 2 * 2 * 32  # tokens x layers x (key, value) x n_embd
    assert model(input_ids=[[5, 6, 7]]).logits.shape == (1, 3, 99)


@pytest.mark.parametrize("family, projection", [("bert", True), ("gpt2", False)])
def test_trainable_parameters_match_torch_peft(checkpoints, family, projection):
    peft_model = torch_peft_model(checkpoints, family, projection)
    model = jaxpeft.get_peft_model(jax_model(checkpoints, family), jax_config(jax_model(checkpoints, family), family,
                                                                             projection))
    assert model.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    if family == "bert":  # SEQ_CLS trains a copy of the classifier head, as in torch PEFT
        assert model.peft_config["default"].modules_to_save == ["classifier"]


@pytest.mark.parametrize("family, projection", [("bert", True), ("gpt2", False)])
def test_a_training_step_changes_only_the_trainable_leaves(checkpoints, family, projection):
    base = jax_model(checkpoints, family)
    model = jaxpeft.get_peft_model(base, jax_config(base, family, projection))
    mask = model.trainable_mask
    optimizer = jaxpeft.freeze(optax.sgd(0.1), mask)

    def loss(params):
        out = model.apply_fn(params, input_ids=IDS, attention_mask=MASK, deterministic=True)
        return jnp.mean(out.logits ** 2)

    @jax.jit
    def step(params):
        updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    params = model.params
    new_params = step(params)
    before, after, trains = flatten(params), flatten(new_params), flatten(mask)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    trainable = {path for path, flag in trains.items() if flag}
    assert changed == trainable
    expected_keys = set(prefix_tuning.PROJECTION_KEYS if projection else (prefix_tuning.TABLE,))
    assert {path[1] for path in trainable if path[1] in prefix_tuning.LEAF_KEYS} == expected_keys
    assert any("modules_to_save" in path for path in trainable) == (family == "bert")


def test_disable_adapter_gives_the_base_model_and_merging_is_refused(checkpoints):
    base = jax_model(checkpoints, "gpt2")
    model = jaxpeft.get_peft_model(base, jax_config(base, "gpt2", True))
    expected = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
    with model.disable_adapter():
        np.testing.assert_array_equal(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), expected)
    assert np.abs(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits) - expected).max() > 1e-3
    with pytest.raises(jaxpeft.AdapterError, match="PREFIX_TUNING adapters cannot be merged"):
        model.merge_and_unload()


# ----- the HF file hooks and your own model -----

def test_hf_tensor_hooks_explain_a_wrong_file(checkpoints):
    model = jax_model(checkpoints, "gpt2")
    config = jax_config(model, "gpt2", False)
    with pytest.raises(jaxpeft.AdapterError, match="lack 'prompt_embeddings'"):
        prefix_tuning.METHOD.leaves_from_hf(config, {"lora_A": np.ones(2)}, model.params, "default")
    with pytest.raises(jaxpeft.AdapterError, match=r"shape \(3, 64\); this config needs \(3, 128\)"):
        prefix_tuning.METHOD.leaves_from_hf(config, {"prompt_embeddings": np.ones((3, 64))}, model.params, "default")
    with pytest.raises(jaxpeft.AdapterError, match="holds? no prefix tuning adapter"):
        prefix_tuning.METHOD.hf_tensors(config, model.params, "default")


def test_loading_replaces_projection_leaves_by_the_table(checkpoints):
    model = jax_model(checkpoints, "gpt2")
    config = jax_config(model, "gpt2", True)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    table = prefix_tuning.METHOD.hf_tensors(config, variables, "default")["prompt_embeddings"]
    loaded = prefix_tuning.METHOD.leaves_from_hf(config, {"prompt_embeddings": table}, variables, "default")
    keys = {path[0] for path in flatten(loaded["params"]) if path[0] in prefix_tuning.LEAF_KEYS}
    assert keys == {prefix_tuning.TABLE}
    np.testing.assert_allclose(jax_logits(model, config, loaded, IDS, MASK),
                               jax_logits(model, config, variables, IDS, MASK), atol=1e-5)


def test_zero_init_gives_zero_keys_and_values(checkpoints):
    model = jax_model(checkpoints, "gpt2")
    for projection in (False, True):
        config = dataclasses.replace(jax_config(model, "gpt2", projection), init_weights="zero")
        variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
        keys, values = prefix_tuning.prefix_key_values(config, variables)
        assert not np.any(np.asarray(keys)) and not np.any(np.asarray(values))


class PrefixRecorder(nn.Module):
    """A model of one's own following the convention: it returns the prefix and positions it was given."""

    @nn.compact
    def __call__(self, input_ids, position_ids=None, prefix_key_values=None):
        nn.Dense(4)(jnp.ones((1, 2)))
        return prefix_key_values, position_ids


def test_own_linen_model_gets_hf_peft_layout_and_shifted_positions():
    model = PrefixRecorder()
    ids = jnp.ones((2, 5), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    with pytest.raises(jaxpeft.ConfigError, match="needs num_layers, token_dim, num_attention_heads"):
        jaxpeft.init_adapters(jax.random.key(1), PrefixTuningConfig(num_virtual_tokens=3), model.apply, variables, ids)
    config = PrefixTuningConfig(num_virtual_tokens=3, num_layers=2, token_dim=8, num_attention_heads=2)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, variables, ids)
    table = np.asarray(variables["params"]["prefix_kv_table"]["default"])
    (keys, values), positions = jaxpeft.rewrite(model.apply, config)(variables, ids, position_ids=jnp.zeros((2, 5)))
    # HF PEFT: view(batch, tokens, layers * 2, heads, head_dim), permute(2, 0, 3, 1, 4), split into (key, value) pairs
    by_layer_and_kind = np.transpose(table.reshape(3, 4, 2, 4), (1, 0, 2, 3))  # (layers * 2, tokens, heads, dim)
    for layer in range(2):
        for row in range(2):
            np.testing.assert_array_equal(keys[layer, row], by_layer_and_kind[2 * layer])
            np.testing.assert_array_equal(values[layer, row], by_layer_and_kind[2 * layer + 1])
    np.testing.assert_array_equal(positions, np.full((2, 5), 3))
    assert jaxpeft.rewrite(model.apply, config)(variables, ids)[1] is None  # no positions: the model's own default
