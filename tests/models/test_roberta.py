"""RoBERTa against the transformers torch reference."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

from jaxpeft.models import AutoModelForTokenClassification, roberta

torch.set_num_threads(2)

TORCH_CLASSES = {
    "base": transformers.RobertaModel,
    "seq_cls": transformers.RobertaForSequenceClassification,
    "token_cls": transformers.RobertaForTokenClassification,
}
HEADS = tuple(TORCH_CLASSES)
TOLERANCE = 1e-4


def tiny_config(**overrides):
    settings = dict(
        vocab_size=57,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=24,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.RobertaConfig(**(settings | overrides))


def randomize_(torch_model, seed):
    """Weights of order 0.1 (LayerNorm scales around 1) so that outputs are O(1) and errors can show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            noise = 0.1 * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise + 1.0 if "LayerNorm.weight" in name else noise)
    return torch_model.eval()


def padded_batch(config, seed=0):
    """Right-padded rows of ``<s> tokens </s>`` with ``pad_token_id`` (RoBERTa positions depend on it)."""
    rng = np.random.default_rng(seed)
    lengths = [9, 6, 3]
    input_ids = rng.integers(3, config.vocab_size, (len(lengths), max(lengths)))
    attention_mask = np.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, 0], input_ids[row, length - 1] = config.bos_token_id, config.eos_token_id
    return np.where(attention_mask == 1, input_ids, config.pad_token_id), attention_mask


def torch_outputs(torch_model, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        return torch_model(
            input_ids=None if input_ids is None else torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            **kwargs,
        )


def max_error(ours, reference, attention_mask=None):
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if attention_mask is not None:
        keep = attention_mask.astype(bool)
        ours, reference = ours[keep], reference[keep]
    return float(np.abs(ours - reference).max())


def compare_with_torch(outputs, torch_out, head, attention_mask):
    if head == "base":
        assert max_error(outputs.last_hidden_state, torch_out.last_hidden_state, attention_mask) < TOLERANCE
        assert max_error(outputs.pooler_output, torch_out.pooler_output) < TOLERANCE
    elif head == "token_cls":
        assert max_error(outputs.logits, torch_out.logits, attention_mask) < TOLERANCE
    else:
        assert max_error(outputs.logits, torch_out.logits) < TOLERANCE


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """head -> (torch model, tensors) of a tiny random torch model saved with ``save_pretrained``."""
    config = tiny_config()
    saved = {}
    for seed, (head, torch_class) in enumerate(TORCH_CLASSES.items()):
        torch_model = randomize_(torch_class(config), seed + 10)
        folder = tmp_path_factory.mktemp(f"roberta_{head}")
        torch_model.save_pretrained(folder)
        saved[head] = (torch_model, safetensors.numpy.load_file(os.path.join(folder, "model.safetensors")), folder)
    return config, saved


def test_position_ids_match_torch():
    config = tiny_config()
    input_ids, _ = padded_batch(config)
    for past_length in (0, 4):
        expected = RobertaEmbeddings.create_position_ids_from_input_ids(
            torch.from_numpy(input_ids), config.pad_token_id, past_length
        )
        actual = roberta.create_position_ids_from_input_ids(jnp.asarray(input_ids), config.pad_token_id, past_length)
        np.testing.assert_array_equal(actual, expected.numpy())


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_torch_on_padded_batch(checkpoints, head, scan_layers):
    config, saved = checkpoints
    torch_model, tensors, _ = saved[head]
    input_ids, attention_mask = padded_batch(config)
    params, unused = roberta.params_from_hf(tensors, config, head, scan_layers)
    module = roberta.FAMILY.modules[head](config=config, scan_layers=scan_layers)

    assert unused == []
    initialised = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(input_ids)))
    shapes = jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), nn.unbox(initialised))
    assert jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), params) == shapes

    outputs = module.apply(params, input_ids, attention_mask)
    compare_with_torch(outputs, torch_outputs(torch_model, input_ids, attention_mask), head, attention_mask)


@pytest.mark.parametrize("head", HEADS)
def test_round_trip_to_torch(checkpoints, head, tmp_path):
    config, saved = checkpoints
    torch_model, tensors, _ = saved[head]
    weights = {name: tensor for name, tensor in tensors.items() if not name.endswith("position_ids")}
    for scan_layers in (False, True):
        params, _ = roberta.params_from_hf(tensors, config, head, scan_layers)
        written = roberta.params_to_hf(params, config, head, scan_layers)
        assert written.keys() == weights.keys()
        for name, tensor in weights.items():
            np.testing.assert_array_equal(written[name], tensor, err_msg=name)

    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(written, os.path.join(tmp_path, "model.safetensors"))
    reloaded, info = TORCH_CLASSES[head].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids, attention_mask = padded_batch(config)
    expected = torch_outputs(torch_model, input_ids, attention_mask)
    torch.testing.assert_close(
        torch_outputs(reloaded.eval(), input_ids, attention_mask)[0], expected[0], rtol=0, atol=0
    )


def test_flax_init_loads_into_torch(tmp_path):
    """A freshly initialised classifier (``classifier.dense`` / ``out_proj`` head) exported to torch agrees."""
    config = tiny_config(num_labels=4)
    module = roberta.RobertaForSequenceClassification(config=config, scan_layers=True)
    variables = nn.unbox(jax.jit(module.init)(jax.random.key(2), jnp.ones((1, 4), jnp.int32)))
    position_table = variables["params"]["roberta"]["embeddings"]["position_embeddings"]["embedding"]
    np.testing.assert_array_equal(position_table[config.pad_token_id], 0.0)

    tensors = roberta.params_to_hf(variables, config, "seq_cls", scan_layers=True)
    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    torch_model, info = transformers.RobertaForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids, attention_mask = padded_batch(config, seed=1)
    logits = module.apply(variables, input_ids, attention_mask).logits
    assert max_error(logits, torch_outputs(torch_model.eval(), input_ids, attention_mask).logits) < TOLERANCE


def test_inputs_embeds_match_torch(checkpoints):
    """With ``inputs_embeds`` torch numbers positions from pad_token_id + 1 regardless of padding."""
    config, saved = checkpoints
    torch_model, tensors, _ = saved["base"]
    input_ids, attention_mask = padded_batch(config)
    inputs_embeds = np.random.default_rng(3).normal(size=input_ids.shape + (config.hidden_size,)).astype(np.float32)
    params, _ = roberta.params_from_hf(tensors, config, "base", scan_layers=False)
    outputs = roberta.RobertaModel(config=config).apply(params, None, attention_mask, inputs_embeds=inputs_embeds)
    expected = torch_outputs(torch_model, None, attention_mask, inputs_embeds=torch.from_numpy(inputs_embeds))
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_prefix_key_values_match_torch_cache(checkpoints, scan_layers):
    """Torch ``RobertaModel`` given the prefix as a filled cache: positions shift by the prefix length."""
    config, saved = checkpoints
    torch_model, tensors, _ = saved["base"]
    input_ids, attention_mask = padded_batch(config)
    batch, num_prefix = input_ids.shape[0], 3
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (config.num_hidden_layers, batch, num_prefix, config.num_attention_heads, head_dim)
    rng = np.random.default_rng(6)
    keys, values = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    cache = transformers.DynamicCache(config=config)
    for index in range(config.num_hidden_layers):
        cache.update(
            torch.from_numpy(keys[index]).transpose(1, 2), torch.from_numpy(values[index]).transpose(1, 2), index
        )
    prefixed_mask = np.concatenate([np.ones((batch, num_prefix), np.int64), attention_mask], axis=1)
    expected = torch_outputs(torch_model, input_ids, prefixed_mask, cache=cache)

    params, _ = roberta.params_from_hf(tensors, config, "base", scan_layers)
    module = roberta.RobertaModel(config=config, scan_layers=scan_layers)
    outputs = module.apply(params, input_ids, attention_mask, prefix_key_values=(keys, values))
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE
    assert max_error(outputs.pooler_output, expected.pooler_output) < TOLERANCE


def module_paths(module, variables, input_ids):
    seen = set()

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Embed)):
            seen.add((type(context.module).__name__, ".".join(context.module.path)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        module.apply(variables, jnp.asarray(input_ids))
    return seen


@pytest.mark.parametrize("head", HEADS)
def test_interception_sees_dense_at_torch_paths(checkpoints, head):
    config, saved = checkpoints
    torch_model, tensors, _ = saved[head]
    input_ids, _ = padded_batch(config)
    torch_modules = {
        (kind, name)
        for name, layer in torch_model.named_modules()
        for kind, torch_type in (("Dense", torch.nn.Linear), ("Embed", torch.nn.Embedding))
        if isinstance(layer, torch_type)
    }
    params, _ = roberta.params_from_hf(tensors, config, head, scan_layers=False)
    assert module_paths(roberta.FAMILY.modules[head](config=config), params, input_ids) == torch_modules

    params, _ = roberta.params_from_hf(tensors, config, head, scan_layers=True)
    scanned = module_paths(roberta.FAMILY.modules[head](config=config, scan_layers=True), params, input_ids)
    assert scanned == {
        (kind, name.replace(".layer.0.", ".layer.").replace(".layer.1.", ".layer.")) for kind, name in torch_modules
    }
    prefix = "roberta." if head != "base" else ""
    assert ("Dense", prefix + "encoder.layer.attention.self.query") in scanned


def test_loading_reports_unused_tensors(checkpoints):
    config, saved = checkpoints
    torch_model, tensors, _ = saved["base"]
    with_lm_head = dict(tensors, **{"lm_head.bias": np.zeros(config.vocab_size, np.float32)})
    prefixed = {f"roberta.{name}": tensor for name, tensor in with_lm_head.items() if not name.startswith("lm_head")}
    params, unused = roberta.params_from_hf(with_lm_head, config, "token_cls", scan_layers=False)
    assert sorted(unused) == ["lm_head.bias", "pooler.dense.bias", "pooler.dense.weight"]
    assert "classifier" not in params["params"]
    params, unused = roberta.params_from_hf(prefixed, config, "base", scan_layers=False)
    assert unused == []
    input_ids, attention_mask = padded_batch(config)
    outputs = roberta.RobertaModel(config=config).apply(params, input_ids, attention_mask)
    expected = torch_outputs(torch_model, input_ids, attention_mask)
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE


def test_classification_head_dropout(checkpoints):
    config, saved = checkpoints
    _, tensors, _ = saved["seq_cls"]
    input_ids, attention_mask = padded_batch(config)
    params, _ = roberta.params_from_hf(tensors, config, "seq_cls", scan_layers=False)
    module = roberta.RobertaForSequenceClassification(config=config)
    deterministic = module.apply(params, input_ids, attention_mask).logits
    dropped = module.apply(params, input_ids, attention_mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert np.isfinite(dropped.logits).all()
    assert np.abs(np.asarray(dropped.logits) - np.asarray(deterministic)).max() > 1e-3


def test_family_metadata():
    assert list(roberta.FAMILY.default_lora_targets) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["roberta"]
    assert roberta.FAMILY.model_types == ("roberta", "xlm-roberta", "camembert")


@pytest.mark.parametrize(
    "config_class, torch_class",
    [
        (transformers.XLMRobertaConfig, transformers.XLMRobertaForSequenceClassification),
        (transformers.CamembertConfig, transformers.CamembertForSequenceClassification),
    ],
    ids=["xlm-roberta", "camembert"],
)
def test_roberta_variants_match_torch(config_class, torch_class, tmp_path):
    config = config_class(**tiny_config().to_diff_dict() | {"attn_implementation": "eager"})
    torch_model = randomize_(torch_class(config), seed=30)
    torch_model.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
    input_ids, attention_mask = padded_batch(config)
    params, unused = roberta.params_from_hf(tensors, config, "seq_cls", scan_layers=False)
    assert unused == []
    logits = roberta.RobertaForSequenceClassification(config=config).apply(params, input_ids, attention_mask).logits
    assert max_error(logits, torch_outputs(torch_model, input_ids, attention_mask).logits) < TOLERANCE
    written = roberta.params_to_hf(params, config, "seq_cls", scan_layers=False)
    assert written.keys() == {name for name in tensors if not name.endswith("position_ids")}


def test_auto_class_loads_token_classifier(checkpoints):
    config, saved = checkpoints
    torch_model, _, folder = saved["token_cls"]
    input_ids, attention_mask = padded_batch(config)
    model = AutoModelForTokenClassification.from_pretrained(folder, scan_layers=True, remat_policy="full")
    logits = model(input_ids, attention_mask).logits
    assert max_error(logits, torch_outputs(torch_model, input_ids, attention_mask).logits, attention_mask) < TOLERANCE
