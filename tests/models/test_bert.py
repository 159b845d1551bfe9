"""BERT against the transformers torch reference and an independent numpy forward pass."""

import math
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

from jaxpeft.models import AutoModel, AutoModelForSequenceClassification, bert

torch.set_num_threads(2)

TORCH_CLASSES = {
    "base": transformers.BertModel,
    "seq_cls": transformers.BertForSequenceClassification,
    "token_cls": transformers.BertForTokenClassification,
}
HEADS = tuple(TORCH_CLASSES)
TOLERANCE = 1e-4


def tiny_config(**overrides):
    settings = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.BertConfig(**(settings | overrides))


def randomize_(torch_model, seed):
    """Weights of order 0.1 (LayerNorm scales around 1) so that outputs are O(1) and errors can show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            noise = 0.1 * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise + 1.0 if "LayerNorm.weight" in name else noise)
    return torch_model.eval()


def padded_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [9, 6, 3]
    input_ids = rng.integers(3, config.vocab_size, (len(lengths), max(lengths)))
    attention_mask = np.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = np.where(attention_mask == 1, input_ids, config.pad_token_id)
    token_type_ids = (np.arange(input_ids.shape[1]) >= 4).astype(np.int64)[None].repeat(len(lengths), 0)
    return input_ids, attention_mask, token_type_ids


def torch_outputs(torch_model, input_ids, attention_mask, token_type_ids=None, **kwargs):
    as_torch = lambda array: None if array is None else torch.as_tensor(array)
    with torch.no_grad():
        return torch_model(
            input_ids=as_torch(input_ids),
            attention_mask=as_torch(attention_mask),
            token_type_ids=as_torch(token_type_ids),
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
    """head -> (folder, torch model, tensors) of a tiny random torch model saved with ``save_pretrained``."""
    config = tiny_config()
    saved = {}
    for seed, (head, torch_class) in enumerate(TORCH_CLASSES.items()):
        torch_model = randomize_(torch_class(config), seed)
        folder = tmp_path_factory.mktemp(f"bert_{head}")
        torch_model.save_pretrained(folder)
        tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
        saved[head] = (folder, torch_model, tensors)
    return config, saved


def abstract_params(module, input_ids):
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(input_ids)))
    return jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), nn.unbox(variables))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_torch_on_padded_batch(checkpoints, head, scan_layers):
    config, saved = checkpoints
    _, torch_model, tensors = saved[head]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    params, unused = bert.params_from_hf(tensors, config, head, scan_layers)
    module = bert.FAMILY.modules[head](config=config, scan_layers=scan_layers)

    assert unused == []
    converted = jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), params)
    assert converted == abstract_params(module, input_ids)

    outputs = module.apply(params, input_ids, attention_mask, token_type_ids)
    compare_with_torch(
        outputs, torch_outputs(torch_model, input_ids, attention_mask, token_type_ids), head, attention_mask
    )


@pytest.mark.parametrize("head", HEADS)
def test_round_trip_to_torch(checkpoints, head, tmp_path):
    config, saved = checkpoints
    _, torch_model, tensors = saved[head]
    weights = {name: tensor for name, tensor in tensors.items() if not name.endswith("position_ids")}
    for scan_layers in (False, True):
        params, _ = bert.params_from_hf(tensors, config, head, scan_layers)
        written = bert.params_to_hf(params, config, head, scan_layers)
        assert written.keys() == weights.keys()
        for name, tensor in weights.items():
            np.testing.assert_array_equal(written[name], tensor, err_msg=name)

    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(written, os.path.join(tmp_path, "model.safetensors"))
    reloaded, info = TORCH_CLASSES[head].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    expected = torch_outputs(torch_model, input_ids, attention_mask, token_type_ids)
    actual = torch_outputs(reloaded.eval(), input_ids, attention_mask, token_type_ids)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def initialised():
    """Variables of every head cut from one ``init`` of the sequence classifier (init is slow on CPU)."""
    config = tiny_config(num_labels=4, initializer_range=0.05, pad_token_id=2)
    module = bert.BertForSequenceClassification(config=config)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32)))["params"]
    backbone = params["bert"]
    without_pooler = {name: value for name, value in backbone.items() if name != "pooler"}
    variables = {
        "base": {"params": backbone},
        "seq_cls": {"params": params},
        "token_cls": {"params": {"bert": without_pooler, "classifier": params["classifier"]}},
    }
    return config, variables


def test_initialisation_follows_transformers(initialised):
    _, variables = initialised
    params = variables["seq_cls"]["params"]
    word_table = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(word_table[2], 0.0)
    assert 0.04 < word_table.std() < 0.06
    query = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    assert 0.04 < np.asarray(query["kernel"]).std() < 0.06
    np.testing.assert_array_equal(query["bias"], 0.0)
    norm = params["bert"]["encoder"]["layer"]["1"]["output"]["LayerNorm"]
    np.testing.assert_array_equal(norm["scale"], 1.0)
    np.testing.assert_array_equal(norm["bias"], 0.0)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)


@pytest.mark.parametrize("head", HEADS)
def test_flax_init_loads_into_torch_and_scanned_equals_unscanned(initialised, head, tmp_path):
    """A freshly initialised model exported to torch gives torch's outputs, scanned or not."""
    config, variables = initialised
    variables = variables[head]
    input_ids, attention_mask, token_type_ids = padded_batch(config, seed=1)
    tensors = bert.params_to_hf(variables, config, head, scan_layers=False)
    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    torch_model, info = TORCH_CLASSES[head].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch_out = torch_outputs(torch_model.eval(), input_ids, attention_mask, token_type_ids)

    scanned_params, unused = bert.params_from_hf(tensors, config, head, scan_layers=True)
    assert unused == []
    unscanned_out = bert.FAMILY.modules[head](config=config).apply(variables, input_ids, attention_mask, token_type_ids)
    scanned_out = bert.FAMILY.modules[head](config=config, scan_layers=True).apply(
        scanned_params, input_ids, attention_mask, token_type_ids
    )
    compare_with_torch(unscanned_out, torch_out, head, attention_mask)
    compare_with_torch(scanned_out, torch_out, head, attention_mask)
    for ours, theirs in zip(
        jax.tree_util.tree_leaves(unscanned_out), jax.tree_util.tree_leaves(scanned_out), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_inputs_embeds_match_torch(checkpoints):
    config, saved = checkpoints
    _, torch_model, tensors = saved["base"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    inputs_embeds = np.random.default_rng(3).normal(size=input_ids.shape + (config.hidden_size,)).astype(np.float32)
    params, _ = bert.params_from_hf(tensors, config, "base", scan_layers=False)
    module = bert.BertModel(config=config)
    outputs = module.apply(params, None, attention_mask, token_type_ids, inputs_embeds=inputs_embeds)
    with torch.no_grad():
        expected = torch_model(
            inputs_embeds=torch.from_numpy(inputs_embeds),
            attention_mask=torch.from_numpy(attention_mask),
            token_type_ids=torch.from_numpy(token_type_ids),
        )
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE

    looked_up = module.apply(params, jnp.asarray(input_ids), method=module.embed_input_ids)
    np.testing.assert_array_equal(looked_up, tensors["embeddings.word_embeddings.weight"][input_ids])


# --- prefix key/values --------------------------------------------------------------------------------------------


def numpy_layer_norm(x, tensors, name, epsilon):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * tensors[f"{name}.weight"] + tensors[f"{name}.bias"]


def numpy_bert(tensors, config, input_ids, attention_mask, token_type_ids, prefix_keys, prefix_values):
    """BERT's forward pass written from the torch code in float64, with prefix keys/values in every layer."""
    tensors = {name: np.asarray(t, np.float64) for name, t in tensors.items() if not name.endswith("position_ids")}

    def linear(x, name):
        return x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]

    erf = np.vectorize(math.erf)
    batch, length = input_ids.shape
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    num_prefix = prefix_keys.shape[2]
    positions = np.arange(num_prefix, num_prefix + length)
    hidden = (
        tensors["embeddings.word_embeddings.weight"][input_ids]
        + tensors["embeddings.position_embeddings.weight"][positions][None]
        + tensors["embeddings.token_type_embeddings.weight"][token_type_ids]
    )
    hidden = numpy_layer_norm(hidden, tensors, "embeddings.LayerNorm", config.layer_norm_eps)
    key_mask = np.concatenate([np.ones((batch, num_prefix)), attention_mask], axis=1).astype(bool)
    for index in range(config.num_hidden_layers):
        name = f"encoder.layer.{index}"

        def split(x):
            return x.reshape(batch, -1, heads, head_dim)

        query = split(linear(hidden, f"{name}.attention.self.query"))
        key = np.concatenate([prefix_keys[index], split(linear(hidden, f"{name}.attention.self.key"))], 1)
        value = np.concatenate([prefix_values[index], split(linear(hidden, f"{name}.attention.self.value"))], 1)
        scores = np.einsum("bthd,bshd->bhts", query, key) / np.sqrt(head_dim)
        scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("bhts,bshd->bthd", weights, value).reshape(batch, length, -1)
        attended = linear(context, f"{name}.attention.output.dense") + hidden
        attended = numpy_layer_norm(attended, tensors, f"{name}.attention.output.LayerNorm", config.layer_norm_eps)
        intermediate = linear(attended, f"{name}.intermediate.dense")
        intermediate = 0.5 * intermediate * (1.0 + erf(intermediate / np.sqrt(2.0)))
        hidden = linear(intermediate, f"{name}.output.dense") + attended
        hidden = numpy_layer_norm(hidden, tensors, f"{name}.output.LayerNorm", config.layer_norm_eps)
    return hidden


def random_prefix(config, batch, num_prefix, seed):
    """``(keys, values)``, each (layers, batch, num_prefix, heads, head_dim)."""
    shape = (config.num_hidden_layers, batch, num_prefix, config.num_attention_heads)
    shape += (config.hidden_size // config.num_attention_heads,)
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_prefix_key_values_match_numpy(checkpoints, scan_layers):
    config, saved = checkpoints
    _, _, tensors = saved["base"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    keys, values = random_prefix(config, input_ids.shape[0], num_prefix=4, seed=5)
    params, _ = bert.params_from_hf(tensors, config, "base", scan_layers)
    module = bert.BertModel(config=config, scan_layers=scan_layers)
    outputs = module.apply(params, input_ids, attention_mask, token_type_ids, prefix_key_values=(keys, values))
    expected = numpy_bert(tensors, config, input_ids, attention_mask, token_type_ids, keys, values)
    assert max_error(outputs.last_hidden_state, expected, attention_mask) < TOLERANCE

    # A prefix with batch 1 is shared by every row.
    shared = (keys[:, :1], values[:, :1])
    outputs = module.apply(params, input_ids, attention_mask, token_type_ids, prefix_key_values=shared)
    expected = numpy_bert(
        tensors, config, input_ids, attention_mask, token_type_ids, keys[:, :1].repeat(3, 1), values[:, :1].repeat(3, 1)
    )
    assert max_error(outputs.last_hidden_state, expected, attention_mask) < TOLERANCE


def test_prefix_key_values_match_torch_cache(checkpoints):
    """Torch ``BertModel`` given the prefix as a filled cache (as HF PEFT prefix tuning passes it)."""
    config, saved = checkpoints
    _, torch_model, tensors = saved["base"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    num_prefix = 3
    keys, values = random_prefix(config, input_ids.shape[0], num_prefix, seed=6)
    cache = transformers.DynamicCache(config=config)
    for index in range(config.num_hidden_layers):
        cache.update(
            torch.from_numpy(keys[index]).transpose(1, 2), torch.from_numpy(values[index]).transpose(1, 2), index
        )
    prefixed_mask = np.concatenate([np.ones((input_ids.shape[0], num_prefix), np.int64), attention_mask], axis=1)
    expected = torch_outputs(torch_model, input_ids, prefixed_mask, token_type_ids, cache=cache)

    params, _ = bert.params_from_hf(tensors, config, "base", scan_layers=True)
    module = bert.BertModel(config=config, scan_layers=True)
    outputs = module.apply(params, input_ids, attention_mask, token_type_ids, prefix_key_values=(keys, values))
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE
    assert max_error(outputs.pooler_output, expected.pooler_output) < TOLERANCE


# --- structure: names, axes, interception ---------------------------------------------------------------------------


def dense_paths(module, variables, input_ids):
    seen = set()

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Embed)):
            seen.add((type(context.module).__name__, context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        module.apply(variables, jnp.asarray(input_ids))
    return seen


@pytest.mark.parametrize("head", HEADS)
def test_interception_sees_dense_at_torch_paths(checkpoints, head):
    config, saved = checkpoints
    _, torch_model, tensors = saved[head]
    input_ids, _, _ = padded_batch(config)
    torch_linears = {name for name, layer in torch_model.named_modules() if isinstance(layer, torch.nn.Linear)}
    torch_embeddings = {name for name, layer in torch_model.named_modules() if isinstance(layer, torch.nn.Embedding)}

    params, _ = bert.params_from_hf(tensors, config, head, scan_layers=False)
    seen = dense_paths(bert.FAMILY.modules[head](config=config), params, input_ids)
    assert {".".join(path) for kind, path in seen if kind == "Dense"} == torch_linears
    assert {".".join(path) for kind, path in seen if kind == "Embed"} == torch_embeddings
    prefix = ("bert",) if head != "base" else ()
    assert ("Dense", prefix + ("encoder", "layer", "0", "attention", "self", "query")) in seen

    params, _ = bert.params_from_hf(tensors, config, head, scan_layers=True)
    seen = dense_paths(bert.FAMILY.modules[head](config=config, scan_layers=True), params, input_ids)
    unindexed = {name.replace(".layer.0.", ".layer.").replace(".layer.1.", ".layer.") for name in torch_linears}
    assert {".".join(path) for kind, path in seen if kind == "Dense"} == unindexed
    assert ("Dense", prefix + ("encoder", "layer", "attention", "self", "query")) in seen


def partition_names(module):
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    is_box = lambda leaf: isinstance(leaf, nn.Partitioned)
    boxes = jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=is_box)
    assert all(is_box(box) for _, box in boxes)
    return {"/".join(key.key for key in path): box.names for path, box in boxes}


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_logical_axis_names(scan_layers):
    names = partition_names(bert.BertForSequenceClassification(config=tiny_config(), scan_layers=scan_layers))
    layer, layers_axis = ("bert/encoder/layer", ("layers",)) if scan_layers else ("bert/encoder/layer/0", ())
    assert names[f"{layer}/attention/self/query/kernel"] == layers_axis + ("embed", "heads")
    assert names[f"{layer}/attention/self/query/bias"] == layers_axis + ("heads",)
    assert names[f"{layer}/attention/output/dense/kernel"] == layers_axis + ("heads", "embed")
    assert names[f"{layer}/intermediate/dense/kernel"] == layers_axis + ("embed", "mlp")
    assert names[f"{layer}/output/dense/kernel"] == layers_axis + ("mlp", "embed")
    assert names[f"{layer}/output/LayerNorm/scale"] == layers_axis + ("embed",)
    assert names["bert/embeddings/word_embeddings/embedding"] == ("vocab", "embed")
    assert names["bert/pooler/dense/kernel"] == ("embed", None)
    assert names["classifier/kernel"] == ("embed", None)


def test_default_lora_targets_are_peft_defaults():
    assert list(bert.FAMILY.default_lora_targets) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["bert"]
    assert bert.FAMILY.model_types == ("bert",)


# --- loading odd checkpoints ---------------------------------------------------------------------------------------


def test_loading_prefixed_legacy_and_foreign_tensors(checkpoints):
    config, saved = checkpoints
    _, torch_model, tensors = saved["seq_cls"]
    legacy = {
        name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): tensor
        for name, tensor in tensors.items()
    }
    legacy["bert.embeddings.position_ids"] = np.arange(config.max_position_embeddings)[None]
    legacy["cls.predictions.bias"] = np.zeros(config.vocab_size, np.float32)

    params, unused = bert.params_from_hf(legacy, config, "base", scan_layers=False)
    assert sorted(unused) == ["classifier.bias", "classifier.weight", "cls.predictions.bias"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    outputs = bert.BertModel(config=config).apply(params, input_ids, attention_mask, token_type_ids)
    expected = torch_outputs(torch_model.bert, input_ids, attention_mask, token_type_ids)
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE

    _, unused = bert.params_from_hf(legacy, config, "token_cls", scan_layers=True)
    assert sorted(unused) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "cls.predictions.bias"]


# --- training-time options -------------------------------------------------------------------------------------------


def torch_gradients(torch_model, input_ids, attention_mask, token_type_ids, labels):
    torch_model.zero_grad()
    logits = torch_model(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        token_type_ids=torch.from_numpy(token_type_ids),
    ).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    return loss.item(), {name: parameter.grad.numpy() for name, parameter in torch_model.named_parameters()}


@pytest.mark.parametrize(
    "scan_layers, remat_policy", [(False, None), (False, "full"), (True, "dots")], ids=["plain", "remat", "scan+remat"]
)
def test_gradients_match_torch(checkpoints, scan_layers, remat_policy):
    config, saved = checkpoints
    _, torch_model, tensors = saved["seq_cls"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    labels = np.array([0, 2, 1])
    expected_loss, expected_gradients = torch_gradients(torch_model, input_ids, attention_mask, token_type_ids, labels)

    module = bert.BertForSequenceClassification(config=config, scan_layers=scan_layers, remat_policy=remat_policy)

    def loss(params):
        logits = module.apply(params, input_ids, attention_mask, token_type_ids).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()

    params, _ = bert.params_from_hf(tensors, config, "seq_cls", scan_layers)
    value, gradients = jax.jit(jax.value_and_grad(loss))(params)
    gradients = bert.params_to_hf(gradients, config, "seq_cls", scan_layers)
    assert abs(float(value) - expected_loss) < TOLERANCE
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        np.testing.assert_allclose(gradient, expected_gradients[name], atol=TOLERANCE, err_msg=name)


def test_dropout_in_training_only(checkpoints):
    config, saved = checkpoints
    _, _, tensors = saved["seq_cls"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    params, _ = bert.params_from_hf(tensors, config, "seq_cls", scan_layers=False)
    module = bert.BertForSequenceClassification(config=config)
    evaluated = module.apply(params, input_ids, attention_mask, token_type_ids).logits
    trained = module.apply(
        params, input_ids, attention_mask, token_type_ids, deterministic=False, rngs={"dropout": jax.random.key(0)}
    ).logits
    assert np.isfinite(trained).all()
    assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 1e-3
    with pytest.raises(ValueError, match="remat_policy"):
        bert.BertModel(config=config, remat_policy="bogus").apply({"params": params["params"]["bert"]}, input_ids)


def test_bfloat16_compute_and_params(checkpoints):
    config, saved = checkpoints
    _, torch_model, tensors = saved["token_cls"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    params, _ = bert.params_from_hf(tensors, config, "token_cls", scan_layers=True)
    module = bert.BertForTokenClassification(
        config=config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True
    )
    assert abstract_params(module, input_ids)["params"]["classifier"]["kernel"][1] == jnp.bfloat16
    bf16_params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.bfloat16), params)
    logits = module.apply(bf16_params, input_ids, attention_mask, token_type_ids).logits
    assert logits.dtype == jnp.bfloat16
    expected = torch_outputs(torch_model, input_ids, attention_mask, token_type_ids).logits
    assert max_error(logits, expected, attention_mask) < 0.1


def test_rejects_bad_inputs(checkpoints):
    config, saved = checkpoints
    params, _ = bert.params_from_hf(saved["base"][2], config, "base", scan_layers=False)
    module = bert.BertModel(config=config)
    input_ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="exactly one"):
        module.apply(params, None)
    with pytest.raises(ValueError, match="prefix_key_values"):
        module.apply(params, input_ids, prefix_key_values=jnp.zeros((2, 2, 3, 4, 8)))
    with pytest.raises(ValueError, match="prefix_key_values"):
        module.apply(params, input_ids, prefix_key_values=(jnp.zeros((2, 2, 3, 4, 8)), jnp.zeros((2, 2, 3, 4, 7))))
    with pytest.raises(NotImplementedError):
        bert.BertModel(config=tiny_config(is_decoder=True)).apply(params, input_ids)


def test_auto_classes_load_and_save(checkpoints, tmp_path):
    config, saved = checkpoints
    folder, torch_model, _ = saved["seq_cls"]
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    expected = torch_outputs(torch_model, input_ids, attention_mask, token_type_ids)

    model = AutoModelForSequenceClassification.from_pretrained(folder, scan_layers=True)
    logits = model(input_ids, attention_mask, token_type_ids=token_type_ids).logits
    assert max_error(logits, expected.logits) < TOLERANCE
    model.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(reloaded) is transformers.BertForSequenceClassification
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(
        torch_outputs(reloaded.eval(), input_ids, attention_mask, token_type_ids).logits,
        expected.logits,
        rtol=0,
        atol=0,
    )

    # The ``bert.``-prefixed classifier checkpoint loads into the base model (the classifier is left out).
    base = AutoModel.from_pretrained(folder)
    hidden = base(input_ids, attention_mask, token_type_ids=token_type_ids).last_hidden_state
    reference = torch_outputs(torch_model.bert, input_ids, attention_mask, token_type_ids).last_hidden_state
    assert max_error(hidden, reference, attention_mask) < TOLERANCE
