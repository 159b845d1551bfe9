"""IA3 through the functional core: hand computations, merge, stacking, and torch PEFT's IA3 on jaxpeft's models."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from toy_models import LAYERS, Transformer, sample_ids, unscanned_params

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.methods import ia3
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

TARGETS = ["query", "value", "output", "intermediate", "mlp_out"]
FEEDFORWARD = ["mlp_out"]


_CACHE: dict = {}


def _scanned(**options):
    """The scanned toy transformer with IA3 (built once per set of options: tracing and init are the slow part)."""
    key = repr(sorted(options.items()))
    if key not in _CACHE:
        model = Transformer(scan=True)
        ids = sample_ids()
        if "base" not in _CACHE:
            _CACHE["base"] = model.init(jax.random.key(0), ids)
        base = _CACHE["base"]
        config = jaxpeft.IA3Config(**{"target_modules": TARGETS, "feedforward_modules": FEEDFORWARD, **options})
        _CACHE[key] = model, ids, base, config, jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base,
                                                                     ids)
    return _CACHE[key]


def _leaf(variables, *path):
    node = variables["params"]
    for part in path:
        node = node[part]
    return node


def test_docstring_example():
    result = doctest.testmod(ia3, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("jit", [False, True])
def test_starts_exactly_equal_to_base(jit):
    model, ids, base, config, variables = _scanned()
    adapted = jaxpeft.rewrite(model.apply, config)
    adapted = jax.jit(adapted) if jit else adapted
    np.testing.assert_array_equal(adapted(variables, ids), model.apply(base, ids))


def test_random_vectors_change_the_output_and_none_gives_the_base():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False)
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config), static_argnames="adapter_name")
    assert float(jnp.abs(adapted(variables, ids) - model.apply(base, ids)).max()) > 1e-3
    np.testing.assert_array_equal(adapted(variables, ids, adapter_name=None), model.apply(base, ids))


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_hand_computation_for_one_dense_layer(feedforward):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    base = model.init(jax.random.key(1), x)
    config = jaxpeft.IA3Config(target_modules=".*", feedforward_modules=".*" if feedforward else None,
                               init_ia3_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    w, b = np.asarray(base["params"]["kernel"]), np.asarray(base["params"]["bias"])
    vector = np.asarray(variables["params"]["ia3_l"]["default"])
    xn = np.asarray(x, np.float64)
    if feedforward:
        assert vector.shape == (4, 1)
        expected = (xn * vector[:, 0]) @ w + b
    else:
        assert vector.shape == (1, 5)
        expected = (xn @ w + b) * vector[0]
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, rtol=1e-5, atol=1e-5)
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(model.apply(merged, x), expected, rtol=1e-5, atol=1e-5)


class _EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 2, 3), "btd,dnh->btnh", name="proj")(x)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("kind", ["dense_general", "conv", "einsum"])
def test_other_layer_kinds_match_a_hand_computation_and_merge(kind, feedforward):
    key = jax.random.key(0)
    if kind == "dense_general":
        model, x = nn.DenseGeneral((2, 3), axis=(-2, -1), name="proj"), jax.random.normal(key, (2, 5, 4, 6))
    elif kind == "conv":
        model, x = nn.Conv(5, (3, 3), strides=2, name="proj"), jax.random.normal(key, (2, 8, 8, 3))
    else:
        model, x = _EinsumModel(), jax.random.normal(key, (2, 5, 4))
    base = model.init(jax.random.key(1), x)
    config = jaxpeft.IA3Config(target_modules=".*", feedforward_modules=".*" if feedforward else None,
                               init_ia3_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    params = variables["params"].get("proj", variables["params"])
    vector = np.asarray(params["ia3_l"]["default"])
    xn = np.asarray(x)
    if feedforward:
        # Scaled input features: DenseGeneral's last two axes, the channels, the contracted 'd'.
        scale = vector.reshape({"dense_general": (4, 6), "conv": (3,), "einsum": (4,)}[kind])
        expected = model.apply(base, jnp.asarray(xn * scale))
    else:
        scale = vector.reshape({"dense_general": (2, 3), "conv": (5,), "einsum": (2, 3)}[kind])
        expected = np.asarray(model.apply(base, x)) * scale
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, x)
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(jaxpeft.merge(variables, config), x), expected, rtol=1e-5, atol=1e-5)


def test_leaf_shapes_are_stacked_under_scan():
    _, _, _, _, variables = _scanned()
    attention = _leaf(variables, "layer", "block", "attention")
    assert attention["query"]["ia3_l"]["default"].shape == (LAYERS, 1, 2, 8)  # DenseGeneral 16 -> (2, 8)
    assert attention["output"]["ia3_l"]["default"].shape == (LAYERS, 1, 1, 16)  # DenseGeneral (2, 8) -> 16
    assert _leaf(variables, "layer", "block", "mlp_out", "ia3_l", "default").shape == (LAYERS, 32, 1)
    assert _leaf(variables, "layer", "block", "intermediate", "ia3_l", "default").dtype == jnp.float32
    np.testing.assert_array_equal(attention["query"]["ia3_active"]["default"], np.ones(LAYERS))


def test_scanned_equals_unscanned_with_the_same_vectors():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False)
    scanned_out = jaxpeft.rewrite(model.apply, config)(variables, ids)
    unscanned = Transformer(scan=False)
    unscanned_variables = unscanned_params(variables)
    unscanned_out = jaxpeft.rewrite(unscanned.apply, config)(unscanned_variables, ids)
    np.testing.assert_allclose(unscanned_out, scanned_out, rtol=1e-5, atol=1e-5)
    # and the unscanned init makes the same per-layer leaves
    fresh = jaxpeft.init_adapters(jax.random.key(1), config, unscanned.apply, unscanned_params(base), ids)
    assert _leaf(fresh, "layer", "1", "block", "mlp_out", "ia3_l", "default").shape == (32, 1)


def test_a_partly_selected_stack_leaves_the_other_layers_alone():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False, exclude_modules=["layer.1.block.mlp_out"])
    active = _leaf(variables, "layer", "block", "mlp_out", "ia3_active", "default")
    np.testing.assert_array_equal(active, [1, 0, 1])
    adapted = jaxpeft.rewrite(model.apply, config)
    # The same as the unscanned model with layer 1's mlp_out vector set to ones by hand.
    unscanned_variables = unscanned_params(variables)
    by_hand = jax.tree_util.tree_map(np.array, unscanned_variables)
    by_hand["params"]["layer"]["1"]["block"]["mlp_out"]["ia3_l"]["default"][:] = 1.0
    expected = jaxpeft.rewrite(Transformer(scan=False).apply, config)(by_hand, ids)
    np.testing.assert_allclose(adapted(variables, ids), expected, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda v: jnp.sum(adapted(v, ids) ** 2))(variables)
    grad = _leaf(grads, "layer", "block", "mlp_out", "ia3_l", "default")
    assert float(jnp.abs(grad[1]).max()) == 0 and float(jnp.abs(grad[0]).max()) > 0


def test_gradients_exist_only_for_ia3_vectors():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False)
    adapted = jaxpeft.rewrite(model.apply, config)
    mask = jaxpeft.trainable_mask(variables, config)
    trainable, frozen = jaxpeft.partition(variables, mask)
    grads = jax.grad(lambda t: jnp.mean(adapted(jaxpeft.combine(t, frozen), ids) ** 2))(trainable)
    trained = {path: g for path, g in jaxpeft.tree.flatten(grads).items() if g is not None}
    assert len(trained) == len(TARGETS) and all(path[-2] == "ia3_l" for path in trained)
    assert all(float(jnp.abs(g).max()) > 0 for g in trained.values())
    count = jaxpeft.count_parameters(variables, mask)
    assert count.trainable == LAYERS * (16 + 16 + 16 + 32 + 32)  # query, value, output, intermediate; mlp_out input


def test_merge_equals_rewritten_apply_and_unmerge_restores():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False)
    adapted = jaxpeft.rewrite(model.apply, config)(variables, ids)
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(model.apply(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    for path, leaf in jaxpeft.tree.flatten(variables).items():
        np.testing.assert_allclose(jaxpeft.tree.flatten(restored)[path], leaf, rtol=1e-5, atol=1e-6,
                                   err_msg=str(path))


def test_bias_is_scaled_for_output_modules_only():
    model, ids, base, config, variables = _scanned(init_ia3_weights=False)
    merged = jaxpeft.merge(variables, config)
    query = _leaf(variables, "layer", "block", "attention", "query")
    np.testing.assert_allclose(_leaf(merged, "layer", "block", "attention", "query", "bias"),
                               np.asarray(query["bias"]) * np.asarray(query["ia3_l"]["default"])[:, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(_leaf(merged, "layer", "block", "mlp_out", "bias"),
                                  _leaf(base, "layer", "block", "mlp_out", "bias"))


def test_bf16_layer_computes_in_its_dtype_and_merges_in_float32():
    model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((2, 4), jnp.bfloat16)
    base = model.init(jax.random.key(0), x)
    config = jaxpeft.IA3Config(target_modules=".*", init_ia3_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, x)
    assert variables["params"]["ia3_l"]["default"].dtype == jnp.float32
    assert jaxpeft.rewrite(model.apply, config)(variables, x).dtype == jnp.bfloat16
    merged = jaxpeft.merge(variables, config)["params"]["kernel"]
    exact = np.asarray(base["params"]["kernel"], np.float32) * np.asarray(variables["params"]["ia3_l"]["default"])
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged, np.float32),
                                  np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float32))


# ----- bad inputs -----

@pytest.mark.parametrize("options,expected", [
    ({"target_modules": ["q"], "feedforward_modules": ["fc"]}, r"feedforward_modules must be a subset.*\['fc'\]"),
    ({"init_ia3_weights": "ones"}, "init_ia3_weights must be True or False"),
    ({"target_module": ["q"]}, "did you mean 'target_modules'"),
    ({"feedforward": ["q"]}, "did you mean 'feedforward_modules'"),
])
def test_bad_config_values(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected) as error:
        jaxpeft.IA3Config(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("targets,expected", [
    (["q_proj"], "matched no layer; modules that exist: embed, layer.0.block"),
    (None, "IA3 needs target_modules"),
    (["embed"], r"'embed' \(a Embed\), which IA3 cannot adapt"),
    (["ln1"], r"\(a LayerNorm\), which IA3 cannot adapt"),
])
def test_bad_targets(targets, expected):
    model = Transformer(scan=True)
    ids = sample_ids()
    base = model.init(jax.random.key(0), ids)
    with pytest.raises(jaxpeft.AdapterError, match=expected) as error:
        jaxpeft.init_adapters(jax.random.key(0), jaxpeft.IA3Config(target_modules=targets), model.apply, base, ids)
    assert "\n" not in str(error.value)


def test_feedforward_that_differs_within_a_scanned_stack_is_refused():
    with pytest.raises(jaxpeft.AdapterError, match="some of the stacked layers layer.block.mlp_out feedforward"):
        _scanned(target_modules=".*mlp_out", feedforward_modules=r"layer\.0\..*")


# ----- torch PEFT's IA3 on jaxpeft's model families -----

FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), "causal_lm", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), "causal_lm", ["k_proj", "v_proj", "down_proj"],
              ["down_proj"]),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3), "seq_cls",
             ["key", "value", "output.dense"], ["output.dense"]),
}
TORCH_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
                 "seq_cls": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def torch_ia3(request, tmp_path_factory):
    torch.manual_seed(0)
    make_config, head, targets, feedforward = FAMILIES[request.param]
    config = make_config()
    config._attn_implementation = "eager"
    model = TORCH_CLASSES[head].from_config(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    peft_model = peft.get_peft_model(model, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "ia3_l" in name:
                parameter.copy_(0.5 + 2 * torch.rand_like(parameter))
    return folder, head, targets, feedforward, peft_model.eval()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_ia3_vectors_reproduce_torch_peft_outputs(torch_ia3, scan_layers):
    folder, head, targets, feedforward, peft_model = torch_ia3
    model = JAX_CLASSES[head].from_pretrained(folder, scan_layers=scan_layers)
    ids = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    config = jaxpeft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, ids, mask)

    trace = trace_layers(model.apply_fn, model.params, (ids, mask), {})
    by_name = {name: (path, index) for path, layer in trace.layers.items()
               for index, name in layer.virtual_paths.items()}
    params = jax.tree_util.tree_map(np.array, variables["params"])
    torch_names = set()
    for key, value in peft_model.named_parameters():
        if "ia3_l" not in key:
            continue
        module_name = key.removeprefix("base_model.model.").split(".ia3_l")[0]
        torch_names.add(module_name)
        path, index = by_name[module_name]
        target = _leaf({"params": params}, *path, "ia3_l", "default")
        target[index] = value.detach().numpy().reshape(target[index].shape)  # HF [out, 1] / [1, in]: same order
    ours = {name for path, layer in trace.layers.items() for index, name in layer.virtual_paths.items()
            if "ia3_active" in _leaf({"params": params}, *path)
            and _leaf({"params": params}, *path, "ia3_active", "default")[index] == 1}
    assert ours == torch_names and len(ours) >= 2 * len(targets)

    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    output = jax.jit(jaxpeft.rewrite(model.apply_fn, config))({"params": params}, ids, mask)
    got = np.asarray(output.logits if hasattr(output, "logits") else output["logits"])
    keep = mask.astype(bool) if head == "causal_lm" else np.ones(len(ids), bool)
    error = np.abs(got[keep] - expected[keep]).max()
    print(f"max |jaxpeft - torch PEFT| = {error:.2e}")
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    base = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    assert np.abs(base[keep] - expected[keep]).max() > 100 * max(error, 1e-7)
