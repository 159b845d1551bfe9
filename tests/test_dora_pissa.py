"""DoRA (use_dora=True) and PiSSA (init_lora_weights="pissa"): hand computations and torch PEFT as references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from toy_models import Transformer, sample_ids

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.hf_format import load_adapter, save_adapter
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification
from jaxpeft.tree import flatten, unflatten_like

CONFIGS = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), "causal_lm", ["c_attn", "c_proj"]),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), "causal_lm", ["q_proj", "v_proj", "down_proj"]),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3), "seq_cls",
             ["query", "value", "output.dense"]),
}
TORCH_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
                 "seq_cls": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
ATTENTION = ["query", "mlp_out"]


def _torch_base(family, tmp_path_factory):
    torch.manual_seed(0)
    make_config, head, targets = CONFIGS[family]
    config = make_config()
    config._attn_implementation = "eager"
    model = TORCH_CLASSES[head].from_config(config).eval()
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    return model, folder, head, targets


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def torch_dora(request, tmp_path_factory):
    """A torch PEFT DoRA model (random B, magnitudes moved off their init), its base folder and saved adapter."""
    model, folder, head, targets = _torch_base(request.param, tmp_path_factory)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True,
                           layers_to_transform=[0, 2])
    peft_model = peft.get_peft_model(model, lora).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    adapter_folder = tmp_path_factory.mktemp(request.param + "_adapter")
    peft_model.save_pretrained(adapter_folder)
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    return request.param, folder, adapter_folder, head, targets, peft_model, logits


def _keep(head):
    return MASK.astype(bool) if head == "causal_lm" else np.ones(len(IDS), bool)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output["logits"] if isinstance(output, dict) else output


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _dora_config(targets, **options):
    return jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=[0, 2], use_dora=True,
                              **options)


# ----- DoRA -----

@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_dora_weights_reproduce_torch_peft_outputs(torch_dora, scan_layers):
    family, folder, _, head, targets, peft_model, expected = torch_dora
    model = JAX_CLASSES[head].from_pretrained(folder, scan_layers=scan_layers)
    config = _dora_config(targets)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    trace = trace_layers(model.apply_fn, model.params, (IDS, MASK), {})
    by_name = {name: (path, index) for path, layer in trace.layers.items()
               for index, name in layer.virtual_paths.items()}
    params = jax.tree_util.tree_map(np.array, variables["params"])
    copied = set()
    for key, param in peft_model.named_parameters():
        if "lora_" not in key:
            continue
        module_name, leaf = key.removeprefix("base_model.model.").split(".lora_")
        path, index = by_name[module_name]
        value = param.detach().numpy()
        if leaf.startswith("magnitude_vector"):
            _get(params, path)["lora_magnitude_vector"]["default"][index] = value
        else:
            _get(params, path)["lora_A" if leaf.startswith("A") else "lora_B"]["default"][index] = value.T
        copied.add((module_name, leaf.split(".")[0]))
    assert len(copied) >= 3 * 2 * len(targets) and len(copied) % 3 == 0

    got = np.asarray(_logits(jax.jit(jaxpeft.rewrite(model.apply_fn, config))({"params": params}, IDS, MASK)))
    keep = _keep(head)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    lora = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=[0, 2])
    plain = np.asarray(_logits(jaxpeft.rewrite(model.apply_fn, lora)({"params": params}, IDS, MASK)))
    assert np.abs(plain[keep] - expected[keep]).max() > 1e-3  # the magnitudes matter


def test_torch_saved_dora_loads_and_jaxpeft_saved_dora_loads_in_torch(torch_dora, tmp_path):
    family, folder, adapter_folder, head, targets, _, expected = torch_dora
    model = JAX_CLASSES[head].from_pretrained(folder, scan_layers=True)
    loaded, config = load_adapter(adapter_folder, model.apply_fn, model.params, IDS, MASK)
    assert config.use_dora
    got = np.asarray(_logits(jaxpeft.rewrite(model.apply_fn, config)(loaded, IDS, MASK)))
    keep = _keep(head)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=1e-4)

    variables = jax.tree_util.tree_map(lambda x: x, loaded)
    flat = flatten(variables["params"])
    for path, leaf in flat.items():
        if path[-2] == "lora_magnitude_vector":
            flat[path] = leaf * 1.1
    variables = {"params": unflatten_like(flat, variables["params"])}
    save_adapter(tmp_path, variables, config, model.apply_fn, IDS, MASK)
    torch_model = peft.PeftModel.from_pretrained(TORCH_CLASSES[head].from_pretrained(folder).eval(), tmp_path).eval()
    with torch.no_grad():
        torch_logits = torch_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    ours = np.asarray(_logits(jaxpeft.rewrite(model.apply_fn, config)(variables, IDS, MASK)))
    np.testing.assert_allclose(ours[keep], torch_logits[keep], atol=1e-4, rtol=1e-4)
    assert np.abs(ours[keep] - got[keep]).max() > 1e-3


def _scanned_dora(**options):
    model = Transformer(scan=True)
    ids = sample_ids()
    base = model.init(jax.random.key(0), ids)
    config = _dora_config(ATTENTION, **options)
    return model, ids, base, config, jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids)


def test_dora_starts_equal_to_base_and_magnitude_is_the_kernel_norm():
    model, ids, base, config, variables = _scanned_dora()
    out = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids)
    np.testing.assert_allclose(out, jax.jit(model.apply)(base, ids), atol=1e-5)
    query = variables["params"]["layer"]["block"]["attention"]["query"]
    kernel = np.asarray(query["kernel"])  # (layers, hidden, heads, head_dim)
    np.testing.assert_allclose(query["lora_magnitude_vector"]["default"], np.linalg.norm(kernel, axis=1), rtol=1e-6)


def _dense_with_dora(seed=0):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(seed), (3, 4))
    config = jaxpeft.LoraConfig(r=2, lora_alpha=6, target_modules=".*", use_dora=True, init_lora_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, model.init(jax.random.key(2), x), x)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["lora_magnitude_vector"]["default"] = np.asarray(jax.random.uniform(jax.random.key(3), (5,), minval=0.5,
                                                                               maxval=2.0))
    return model, x, config, {"params": params}


def test_dora_forward_matches_a_hand_computation():
    model, x, config, variables = _dense_with_dora()
    p = variables["params"]
    w, bias, a, b = p["kernel"], p["bias"], p["lora_A"]["default"], p["lora_B"]["default"]
    m, s = p["lora_magnitude_vector"]["default"], 3.0
    x = np.asarray(x)
    scale = m / np.linalg.norm(w + s * a @ b, axis=0)
    expected = scale * (x @ w + s * x @ a @ b) + bias
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_dora_gradients_reach_a_b_and_magnitude_with_the_norm_detached():
    model, x, config, variables = _dense_with_dora()
    mask = jaxpeft.trainable_mask(variables, config)
    assert mask["params"]["lora_magnitude_vector"]["default"] and not mask["params"]["kernel"]
    trainable, frozen = jaxpeft.partition(variables, mask)
    apply = jaxpeft.rewrite(model.apply, config)
    grads = jax.grad(lambda t: apply(jaxpeft.combine(t, frozen), x).sum())(trainable)["params"]
    for key in ("lora_A", "lora_B"):
        assert float(jnp.abs(grads[key]["default"]).max()) > 1e-4
    p = variables["params"]
    w, a, b = p["kernel"], p["lora_A"]["default"], p["lora_B"]["default"]
    combined = w + 3.0 * a @ b
    expected = (np.asarray(x) @ combined).sum(axis=0) / np.linalg.norm(combined, axis=0)
    np.testing.assert_allclose(grads["lora_magnitude_vector"]["default"], expected, rtol=1e-5)
    # With the norm a constant, the output is linear in B: d(sum out)/dB = s * m / norm * (x A)^T 1.
    m = p["lora_magnitude_vector"]["default"]
    expected_b = 3.0 * np.outer((np.asarray(x) @ a).sum(axis=0), m / np.linalg.norm(combined, axis=0))
    np.testing.assert_allclose(grads["lora_B"]["default"], expected_b, rtol=1e-5, atol=1e-6)


def test_dora_merge_equals_rewritten_and_unmerge_restores():
    model, ids, base, config, variables = _scanned_dora(init_lora_weights=False)
    flat = flatten(variables["params"])
    for path, leaf in flat.items():
        if path[-2] == "lora_magnitude_vector":
            flat[path] = leaf * jax.random.uniform(jax.random.key(len(path)), leaf.shape, minval=0.5, maxval=1.5)
    variables = {"params": unflatten_like(flat, variables["params"])}
    apply = jax.jit(model.apply)
    out = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids)
    assert float(jnp.abs(out - apply(base, ids)).max()) > 1e-3
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(apply(merged, ids), out, atol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    for path, leaf in flatten(variables).items():
        np.testing.assert_allclose(flatten(restored)[path], leaf, atol=1e-5, err_msg=str(path))


def test_dora_on_embeddings_is_a_clear_error():
    model = nn.Embed(10, 4)
    ids = jnp.array([[1, 2]])
    config = jaxpeft.LoraConfig(r=2, target_modules=".*", use_dora=True)
    with pytest.raises(jaxpeft.AdapterError, match="DoRA cannot adapt .*Embed"):
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, model.init(jax.random.key(1), ids), ids)


# ----- PiSSA -----

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_pissa_and_olora_match_torch_peft_and_keep_the_output(tmp_path_factory, scan_layers, init):
    torch_model, folder, head, targets = _torch_base("llama", tmp_path_factory)
    model = JAX_CLASSES[head].from_pretrained(folder, scan_layers=scan_layers)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                           layers_to_transform=[0, 2])
    peft_model = peft.get_peft_model(torch_model, lora).eval()
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                                layers_to_transform=[0, 2])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    base = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    got = np.asarray(_logits(jaxpeft.rewrite(model.apply_fn, config)(variables, IDS, MASK)))
    np.testing.assert_allclose(got, base, atol=1e-5)

    trace = trace_layers(model.apply_fn, model.params, (IDS, MASK), {})
    torch_modules = dict(peft_model.named_modules())
    checked = 0
    for path, layer in trace.layers.items():
        for index, name in layer.virtual_paths.items():
            module = torch_modules.get("base_model.model." + name)
            params = _get(variables["params"], path)
            if module is None or not hasattr(module, "lora_A"):
                if "lora_A" in params:
                    np.testing.assert_array_equal(params["lora_scaling"]["default"][index], 0)
                    original = _get(model.params["params"], path)["kernel"][index]
                    np.testing.assert_array_equal(params["kernel"][index], original)
                continue
            a, b = params["lora_A"]["default"][index], params["lora_B"]["default"][index]
            torch_a = module.lora_A["default"].weight.detach().numpy()
            torch_b = module.lora_B["default"].weight.detach().numpy()
            np.testing.assert_allclose(a @ b, (torch_b @ torch_a).T, atol=1e-5)
            torch_residual = module.base_layer.weight.detach().numpy().T
            np.testing.assert_allclose(params["kernel"][index], torch_residual, atol=1e-5)
            checked += 1
    assert checked == 2 * len(targets)


def test_pissa_niter_keeps_the_output_and_finds_the_principal_subspace():
    model = Transformer(scan=True)
    ids = sample_ids()
    base = model.init(jax.random.key(0), ids)
    outputs = {}
    expected = jax.jit(model.apply)(base, ids)
    for init in ("pissa", "pissa_niter_8"):
        config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=init)
        variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids)
        np.testing.assert_allclose(jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids), expected, atol=1e-5)
        outputs[init] = variables["params"]["layer"]["block"]["mlp_out"]
    for init, params in outputs.items():
        kernel = np.asarray(base["params"]["layer"]["block"]["mlp_out"]["kernel"])
        delta = 2.0 * np.einsum("lir,lro->lio", params["lora_A"]["default"], params["lora_B"]["default"])
        np.testing.assert_allclose(np.asarray(params["kernel"]) + delta, kernel, atol=1e-5)
        singular = np.linalg.svd(kernel, compute_uv=False)
        captured = np.linalg.norm(delta, axis=(1, 2)) / np.linalg.norm(singular[:, :4], axis=1)
        assert captured.min() > (0.999 if init == "pissa" else 0.9), init


def test_pissa_with_dora_starts_equal_to_base():
    model, ids, base, config, variables = _scanned_dora(init_lora_weights="pissa")
    np.testing.assert_allclose(jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids),
                               jax.jit(model.apply)(base, ids), atol=1e-5)


def test_pissa_options_are_checked():
    with pytest.raises(jaxpeft.ConfigError, match="init_lora_weights='pissa_niter_x'"):
        jaxpeft.LoraConfig(init_lora_weights="pissa_niter_x")
    model = nn.Embed(10, 4)
    ids = jnp.array([[1, 2]])
    config = jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights="pissa")
    with pytest.raises(jaxpeft.AdapterError, match="init_lora_weights=.pissa. cannot initialise .*Embed"):
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, model.init(jax.random.key(1), ids), ids)
