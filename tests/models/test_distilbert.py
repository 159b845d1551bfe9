"""DistilBERT against the transformers torch reference and an independent numpy forward pass."""

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

from jaxpeft.models import AutoModelForSequenceClassification, distilbert

torch.set_num_threads(2)

TORCH_CLASSES = {
    "base": transformers.DistilBertModel,
    "seq_cls": transformers.DistilBertForSequenceClassification,
    "token_cls": transformers.DistilBertForTokenClassification,
}
HEADS = tuple(TORCH_CLASSES)
TOLERANCE = 1e-4


def tiny_config(**overrides):
    settings = dict(
        vocab_size=53,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=48,
        max_position_embeddings=20,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.DistilBertConfig(**(settings | overrides))


def randomize_(torch_model, seed):
    """Weights of order 0.1 (LayerNorm scales around 1) so that outputs are O(1) and errors can show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            noise = 0.1 * torch.randn(parameter.shape, generator=generator)
            is_norm_scale = name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name)
            parameter.copy_(noise + 1.0 if is_norm_scale else noise)
    return torch_model.eval()


def padded_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [9, 6, 3]
    input_ids = rng.integers(1, config.vocab_size, (len(lengths), max(lengths)))
    attention_mask = np.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
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
        torch_model = randomize_(torch_class(config), seed + 20)
        folder = tmp_path_factory.mktemp(f"distilbert_{head}")
        torch_model.save_pretrained(folder)
        saved[head] = (torch_model, safetensors.numpy.load_file(os.path.join(folder, "model.safetensors")), folder)
    return config, saved


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("head", HEADS)
def test_matches_torch_on_padded_batch(checkpoints, head, scan_layers):
    config, saved = checkpoints
    torch_model, tensors, _ = saved[head]
    input_ids, attention_mask = padded_batch(config)
    params, unused = distilbert.params_from_hf(tensors, config, head, scan_layers)
    module = distilbert.FAMILY.modules[head](config=config, scan_layers=scan_layers)

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
        params, _ = distilbert.params_from_hf(tensors, config, head, scan_layers)
        written = distilbert.params_to_hf(params, config, head, scan_layers)
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
    """A freshly initialised classifier (``pre_classifier`` + ``classifier``) exported to torch agrees."""
    config = tiny_config(num_labels=4)
    module = distilbert.DistilBertForSequenceClassification(config=config)
    variables = nn.unbox(jax.jit(module.init)(jax.random.key(2), jnp.ones((1, 4), jnp.int32)))
    tensors = distilbert.params_to_hf(variables, config, "seq_cls", scan_layers=False)
    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    torch_model, info = transformers.DistilBertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids, attention_mask = padded_batch(config, seed=1)
    logits = module.apply(variables, input_ids, attention_mask).logits
    assert max_error(logits, torch_outputs(torch_model.eval(), input_ids, attention_mask).logits) < TOLERANCE


def test_sinusoidal_positions_initialise_like_torch():
    config = tiny_config(sinusoidal_pos_embds=True)
    torch_table = transformers.DistilBertModel(config).embeddings.position_embeddings.weight.detach().numpy()
    embeddings = distilbert.DistilBertEmbeddings(distilbert.distilbert_settings(config))
    positions = jnp.zeros((1, 2), jnp.int32)
    variables = nn.unbox(embeddings.init(jax.random.key(0), positions, positions, None, True))
    np.testing.assert_allclose(variables["params"]["position_embeddings"]["embedding"], torch_table, atol=1e-6)


def test_inputs_embeds_match_torch(checkpoints):
    config, saved = checkpoints
    torch_model, tensors, _ = saved["base"]
    input_ids, attention_mask = padded_batch(config)
    inputs_embeds = np.random.default_rng(3).normal(size=input_ids.shape + (config.dim,)).astype(np.float32)
    params, _ = distilbert.params_from_hf(tensors, config, "base", scan_layers=False)
    module = distilbert.DistilBertModel(config=config)
    outputs = module.apply(params, None, attention_mask, inputs_embeds=inputs_embeds)
    expected = torch_outputs(torch_model, None, attention_mask, inputs_embeds=torch.from_numpy(inputs_embeds))
    assert max_error(outputs.last_hidden_state, expected.last_hidden_state, attention_mask) < TOLERANCE
    looked_up = module.apply(params, jnp.asarray(input_ids), method=module.embed_input_ids)
    np.testing.assert_array_equal(looked_up, tensors["embeddings.word_embeddings.weight"][input_ids])


def numpy_distilbert(tensors, config, input_ids, attention_mask, prefix_keys, prefix_values):
    """DistilBERT's forward pass written from the torch code in float64, with prefix keys/values per layer."""
    tensors = {name: np.asarray(t, np.float64) for name, t in tensors.items()}

    def linear(x, name):
        return x @ tensors[f"{name}.weight"].T + tensors[f"{name}.bias"]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(variance + 1e-12) * tensors[f"{name}.weight"] + tensors[f"{name}.bias"]

    erf = np.vectorize(math.erf)
    batch, length = input_ids.shape
    heads, head_dim = config.n_heads, config.dim // config.n_heads
    num_prefix = prefix_keys.shape[2]
    hidden = tensors["embeddings.word_embeddings.weight"][input_ids]
    hidden = layer_norm(hidden + tensors["embeddings.position_embeddings.weight"][:length], "embeddings.LayerNorm")
    key_mask = np.concatenate([np.ones((batch, num_prefix)), attention_mask], axis=1).astype(bool)
    for index in range(config.n_layers):
        name = f"transformer.layer.{index}"

        def split(x):
            return x.reshape(batch, -1, heads, head_dim)

        query = split(linear(hidden, f"{name}.attention.q_lin"))
        key = np.concatenate([prefix_keys[index], split(linear(hidden, f"{name}.attention.k_lin"))], 1)
        value = np.concatenate([prefix_values[index], split(linear(hidden, f"{name}.attention.v_lin"))], 1)
        scores = np.einsum("bthd,bshd->bhts", query, key) / np.sqrt(head_dim)
        scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("bhts,bshd->bthd", weights, value).reshape(batch, length, -1)
        attended = layer_norm(linear(context, f"{name}.attention.out_lin") + hidden, f"{name}.sa_layer_norm")
        inner = linear(attended, f"{name}.ffn.lin1")
        inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0)))
        hidden = layer_norm(linear(inner, f"{name}.ffn.lin2") + attended, f"{name}.output_layer_norm")
    return hidden


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_prefix_key_values_match_numpy(checkpoints, scan_layers):
    config, saved = checkpoints
    _, tensors, _ = saved["base"]
    input_ids, attention_mask = padded_batch(config)
    shape = (config.n_layers, input_ids.shape[0], 4, config.n_heads, config.dim // config.n_heads)
    rng = np.random.default_rng(5)
    keys, values = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    params, _ = distilbert.params_from_hf(tensors, config, "base", scan_layers)
    module = distilbert.DistilBertModel(config=config, scan_layers=scan_layers)
    outputs = module.apply(params, input_ids, attention_mask, prefix_key_values=(keys, values))
    expected = numpy_distilbert(tensors, config, input_ids, attention_mask, keys, values)
    assert max_error(outputs.last_hidden_state, expected, attention_mask) < TOLERANCE

    # The numpy pass without a prefix is checked against torch too, so both references agree.
    no_prefix = numpy_distilbert(tensors, config, input_ids, attention_mask, keys[:, :, :0], values[:, :, :0])
    torch_hidden = torch_outputs(saved["base"][0], input_ids, attention_mask).last_hidden_state
    assert max_error(no_prefix, torch_hidden, attention_mask) < TOLERANCE


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
    params, _ = distilbert.params_from_hf(tensors, config, head, scan_layers=False)
    unscanned = module_paths(distilbert.FAMILY.modules[head](config=config), params, input_ids)
    assert unscanned == torch_modules
    prefix = "distilbert." if head != "base" else ""
    assert ("Dense", prefix + "transformer.layer.0.attention.q_lin") in unscanned

    params, _ = distilbert.params_from_hf(tensors, config, head, scan_layers=True)
    scanned = module_paths(distilbert.FAMILY.modules[head](config=config, scan_layers=True), params, input_ids)
    assert scanned == {
        (kind, name.replace(".layer.0.", ".layer.").replace(".layer.1.", ".layer.")) for kind, name in torch_modules
    }
    assert ("Dense", prefix + "transformer.layer.attention.v_lin") in scanned


def test_logical_axis_names():
    config = tiny_config()
    module = distilbert.DistilBertForTokenClassification(config=config, scan_layers=True)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    boxes = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned)
    )
    names = {"/".join(key.key for key in path): box.names for path, box in boxes}
    layer = "distilbert/transformer/layer"
    assert names[f"{layer}/attention/q_lin/kernel"] == ("layers", "embed", "heads")
    assert names[f"{layer}/attention/out_lin/kernel"] == ("layers", "heads", "embed")
    assert names[f"{layer}/ffn/lin1/kernel"] == ("layers", "embed", "mlp")
    assert names[f"{layer}/ffn/lin2/kernel"] == ("layers", "mlp", "embed")
    assert names[f"{layer}/sa_layer_norm/scale"] == ("layers", "embed")
    assert names["distilbert/embeddings/word_embeddings/embedding"] == ("vocab", "embed")
    assert names["classifier/kernel"] == ("embed", None)


@pytest.mark.parametrize("scan_layers, remat_policy", [(False, "full"), (True, "dots")], ids=["remat", "scan+remat"])
def test_gradients_match_torch(checkpoints, scan_layers, remat_policy):
    config, saved = checkpoints
    torch_model, tensors, _ = saved["token_cls"]
    input_ids, attention_mask = padded_batch(config)
    labels = np.random.default_rng(4).integers(0, config.num_labels, input_ids.shape)
    weights = attention_mask / attention_mask.sum()

    torch_model.zero_grad()
    logits = torch_model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)).logits
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(labels), reduction="none")
    expected_loss = (token_losses * torch.from_numpy(weights)).sum()
    expected_loss.backward()
    expected_gradients = {name: parameter.grad.numpy() for name, parameter in torch_model.named_parameters()}

    module = distilbert.DistilBertForTokenClassification(
        config=config, scan_layers=scan_layers, remat_policy=remat_policy
    )

    def loss(params):
        logits = module.apply(params, input_ids, attention_mask).logits
        token_losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
        return (token_losses * weights).sum()

    params, _ = distilbert.params_from_hf(tensors, config, "token_cls", scan_layers)
    value, gradients = jax.jit(jax.value_and_grad(loss))(params)
    gradients = distilbert.params_to_hf(gradients, config, "token_cls", scan_layers)
    assert abs(float(value) - expected_loss.item()) < TOLERANCE
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        np.testing.assert_allclose(gradient, expected_gradients[name], atol=TOLERANCE, err_msg=name)


def test_dropout_in_training_only_with_scan_and_remat(checkpoints):
    config, saved = checkpoints
    _, tensors, _ = saved["seq_cls"]
    input_ids, attention_mask = padded_batch(config)
    params, _ = distilbert.params_from_hf(tensors, config, "seq_cls", scan_layers=True)
    module = distilbert.DistilBertForSequenceClassification(config=config, scan_layers=True, remat_policy="full")
    evaluated = module.apply(params, input_ids, attention_mask).logits
    train = jax.jit(
        lambda params, rng: module.apply(params, input_ids, attention_mask, deterministic=False, rngs={"dropout": rng})
    )
    trained = train(params, jax.random.key(0)).logits
    assert np.isfinite(trained).all()
    assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 1e-3


def test_family_metadata():
    assert distilbert.FAMILY.default_lora_targets == ("q_lin", "v_lin")
    assert distilbert.FAMILY.model_types == ("distilbert",)


def test_auto_class_loads_sequence_classifier(checkpoints):
    config, saved = checkpoints
    torch_model, _, folder = saved["seq_cls"]
    input_ids, attention_mask = padded_batch(config)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    logits = model(input_ids, attention_mask).logits
    assert max_error(logits, torch_outputs(torch_model, input_ids, attention_mask).logits) < TOLERANCE
