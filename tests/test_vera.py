"""VeRA: hand computations, merge, training, stacking, and torch PEFT's VeRA on jaxpeft's Llama and GPT-2."""

import doctest
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxpeft
from jaxpeft.hf_format import load_adapter
from jaxpeft.methods import vera
from jaxpeft.methods.vera import VeraConfig
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.tree import flatten, unflatten_like

FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), ["c_attn", "mlp.c_proj"]),
}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
KEEP = MASK.astype(bool)
R = 8


def _torch_config(targets, **options):
    return peft.VeraConfig(r=R, target_modules=targets, init_weights=False, layers_to_transform=[0, 2], **options)


def _config(targets, **options):
    return VeraConfig(r=R, target_modules=targets, init_weights=False, layers_to_transform=[0, 2], **options)


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


_CACHE: dict = {}
_LOADED: dict = {}  # (family, scanned) -> jaxpeft PeftModel loaded from torch PEFT's folder, its logits


def _made(family, tmp_path_factory):
    """A tiny transformers model saved, torch PEFT's VeRA on it (λ_b and λ_d random) saved and run, and jaxpeft's
    model of it, scanned and not (built once per family)."""
    if family in _CACHE:
        return _CACHE[family]
    make_config, targets = FAMILIES[family]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    peft_model = peft.get_peft_model(model, _torch_config(targets, fan_in_fan_out=family == "gpt2")).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(0.5 + torch.rand_like(param))
    adapter_folder = tmp_path_factory.mktemp(family + "_adapter")
    peft_model.save_pretrained(adapter_folder)
    with peft_model.disable_adapter():
        base_logits = _torch_logits(peft_model)
    models = {scan: AutoModelForCausalLM.from_pretrained(folder, scan_layers=scan) for scan in (False, True)}  # cheap
    _CACHE[family] = family, folder, adapter_folder, targets, _torch_logits(peft_model), base_logits, models
    return _CACHE[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def torch_vera(request, tmp_path_factory):
    return _made(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _made("llama", tmp_path_factory)


def _logits(model, variables, config):
    output = jax.jit(jaxpeft.rewrite(model.apply_fn, config))(variables, IDS, MASK)
    return np.asarray(output.logits if hasattr(output, "logits") else output["logits"])


def _get(tree, *path):
    for part in path:
        tree = tree[part]
    return tree


def test_docstring_example():
    result = doctest.testmod(vera, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----- one layer, by hand -----

def test_hand_computation_merge_and_unmerge_for_one_dense_layer():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    base = model.init(jax.random.key(1), x)
    config = VeraConfig(r=3, target_modules=".*", init_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    leaves = {key: np.asarray(value["default"], np.float64) for key, value in variables["params"].items()
              if key.startswith("vera")}
    w, b = np.asarray(base["params"]["kernel"], np.float64), np.asarray(base["params"]["bias"], np.float64)
    a, bb, lambda_b, lambda_d = leaves["vera_A"], leaves["vera_B"], leaves["vera_lambda_b"], leaves["vera_lambda_d"]
    assert a.shape == (3, 4) and bb.shape == (5, 3) and lambda_b.shape == (5,) and lambda_d.shape == (3,)
    # kaiming-uniform projections: bound sqrt(6 / fan_in), fan_in the number of columns
    assert np.abs(a).max() <= np.sqrt(6 / 4) and np.abs(bb).max() <= np.sqrt(6 / 3) and np.abs(a).max() > 0.3
    xn = np.asarray(x, np.float64)
    expected = xn @ w + b + ((xn @ a.T) * lambda_d) @ bb.T * lambda_b
    got = jaxpeft.rewrite(model.apply, config)(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(model.apply(merged, x), got, rtol=1e-5, atol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    np.testing.assert_allclose(restored["params"]["kernel"], base["params"]["kernel"], atol=1e-6)


def test_default_init_leaves_the_model_unchanged_and_dropout_acts_on_the_update_only():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    base = model.init(jax.random.key(1), x)
    config = VeraConfig(r=4, target_modules=".*", d_initial=0.3, vera_dropout=0.5)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    np.testing.assert_array_equal(variables["params"]["vera_lambda_b"]["default"], np.zeros(6))
    np.testing.assert_array_equal(variables["params"]["vera_lambda_d"]["default"], np.full(4, 0.3, np.float32))
    apply = jax.jit(jaxpeft.rewrite(model.apply, config))
    rngs = {"dropout": jax.random.key(3)}
    base_out = np.asarray(model.apply(base, x), np.float64)
    np.testing.assert_array_equal(apply(variables, x, rngs=rngs), model.apply(base, x))
    # With λ_b nonzero, the update sees the input with dropout: half its entries zeroed, the rest doubled.
    flat = flatten(variables["params"])
    flat[("vera_lambda_b", "default")] = jnp.ones(6)
    variables = {"params": unflatten_like(flat, variables["params"])}
    p = {k: np.asarray(v["default"], np.float64) for k, v in variables["params"].items() if k.startswith("vera")}
    update = np.asarray(apply(variables, x, rngs=rngs), np.float64) - base_out
    # update = x' @ M with M = (diag(λ_d) A)^T B^T [5, 6]; recover x' by least squares (M has rank 4 < 5: compare
    # through M instead): every row of x' is 0 or 2x entry-wise, so check x' @ M for some such mask.
    m = (p["vera_lambda_d"][:, None] * p["vera_A"]).T @ (p["vera_B"] * p["vera_lambda_b"][:, None]).T
    no_dropout = np.asarray(apply(variables, x), np.float64) - base_out
    np.testing.assert_allclose(no_dropout, np.asarray(x, np.float64) @ m, rtol=1e-4, atol=1e-5)
    assert np.abs(update - no_dropout).max() > 1e-3
    masks = np.array(np.meshgrid(*[[0.0, 2.0]] * 5)).reshape(5, -1).T  # all 32 keep-patterns of a row
    for row, want in zip(np.asarray(x, np.float64), update, strict=True):
        assert np.abs((masks * row) @ m - want).max(axis=1).min() < 1e-4


# ----- torch PEFT, both ways -----

@pytest.mark.parametrize("family,scan_layers", [("llama", False), ("llama", True), ("gpt2", True)],
                         ids=["llama-unscanned", "llama-scanned", "gpt2-scanned"])
def test_torch_peft_folder_loads_and_reproduces_torch_logits(tmp_path_factory, family, scan_layers):
    family, _, adapter_folder, targets, expected, torch_base, models = _made(family, tmp_path_factory)
    model = models[scan_layers]
    peft_model = jaxpeft.PeftModel.from_pretrained(model, str(adapter_folder))
    config = peft_model.peft_config["default"]
    assert isinstance(config, VeraConfig) and config.r == R and config.layers_to_transform == [0, 2]
    got = np.asarray(peft_model(input_ids=IDS, attention_mask=MASK).logits)
    _LOADED[family, scan_layers] = peft_model, got
    error = np.abs(got[KEEP] - expected[KEEP]).max()
    print(f"{family} {'scanned' if scan_layers else 'unscanned'}: max |jaxpeft - torch PEFT| = {error:.2e}")
    np.testing.assert_allclose(got[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    assert np.abs(torch_base[KEEP] - expected[KEEP]).max() > 100 * max(error, 1e-7)  # the adapter matters
    # the file's projections are used as they are: the layers hold slices of them
    shared = load_file(str(adapter_folder / "adapter_model.safetensors"))
    flat = flatten(peft_model.params["params"])
    slices = [leaf for path, leaf in flat.items() if path[-2] == "vera_A"]
    assert slices and all(np.array_equal(np.asarray(s).reshape((-1,) + s.shape[-2:])[0],
                                         shared["base_model.vera_A"][:, :s.shape[-1]]) for s in slices)


def test_jaxpeft_folder_loads_in_torch_peft_with_the_same_logits(torch_vera, tmp_path):
    family, folder, _, targets, _, _, models = torch_vera
    model = models[True]
    peft_model = jaxpeft.get_peft_model(model, _config(targets, projection_prng_key=7), seed=3)
    flat = flatten(peft_model.params["params"])
    for i, path in enumerate(sorted(p for p in flat if p[-2] == "vera_lambda_b")):
        flat[path] = flat[path] * (0.5 + jax.random.uniform(jax.random.key(i), flat[path].shape))
    peft_model.params = {**peft_model.params, "params": unflatten_like(flat, peft_model.params["params"])}
    got = np.asarray(peft_model(input_ids=IDS, attention_mask=MASK).logits)
    peft_model.save_pretrained(str(tmp_path))

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    inner = {"llama": 64, "gpt2": 128}[family]
    widest_out = {"llama": 32, "gpt2": 96}[family]  # q_proj / down_proj, GPT-2's c_attn
    assert tensors["base_model.vera_A"].shape == (R, inner) and tensors["base_model.vera_B"].shape == (widest_out, R)
    layer_names = {name.rsplit(".", 1)[0] for name in tensors if name.startswith("base_model.model.")}
    assert len(layer_names) == 2 * len(targets)  # layers 0 and 2
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is True

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = peft.PeftModel.from_pretrained(torch_model, tmp_path).eval()
    expected = _torch_logits(loaded)
    error = np.abs(got[KEEP] - expected[KEEP]).max()
    print(f"{family}: max |jaxpeft - torch PEFT (loaded from jaxpeft)| = {error:.2e}")
    np.testing.assert_allclose(got[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(loaded.base_model.vera_A["default"].numpy(), tensors["base_model.vera_A"])


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_torch_peft_trained_biases_load_and_save_back_unchanged(tmp_path, bias):
    """bias="all"/"vera_only" on GPT-2: torch PEFT saves the trained biases (``...c_attn.base_layer.bias`` for
    adapted layers)."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, pad_token_id=0)
    config._attn_implementation = "eager"
    torch_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    torch_model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(torch_model, peft.VeraConfig(r=4, target_modules=["c_attn"], init_weights=False,
                                                                  bias=bias, fan_in_fan_out=True)).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.3)
    peft_model.save_pretrained(tmp_path / "torch")
    saved = load_file(str(tmp_path / "torch" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in saved

    model = jaxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                              str(tmp_path / "torch"))
    got = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    np.testing.assert_allclose(got[KEEP], _torch_logits(peft_model)[KEEP], atol=1e-4, rtol=1e-4)
    model.save_pretrained(str(tmp_path / "jax"))
    again = load_file(str(tmp_path / "jax" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_merge_equals_the_rewritten_apply_and_unmerge_restores(llama, tmp_path_factory):
    _, _, adapter_folder, _, _, _, models = llama
    model = models[True]
    if ("llama", True) not in _LOADED:
        test_torch_peft_folder_loads_and_reproduces_torch_logits(tmp_path_factory, "llama", True)
    peft_model, adapted = _LOADED["llama", True]
    variables, config = peft_model.params, peft_model.peft_config["default"]
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    output = jax.jit(model.apply_fn)(merged, IDS, MASK)
    np.testing.assert_allclose(np.asarray(output.logits)[KEEP], adapted[KEEP], atol=1e-5, rtol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    for path, leaf in flatten(variables).items():
        np.testing.assert_allclose(flatten(restored)[path], leaf, atol=1e-6, err_msg=str(path))


def test_scanned_and_unscanned_models_make_the_same_adapter(llama):
    _, _, _, targets, _, _, jax_models = llama
    config = _config(targets)
    made = {scan: flatten(jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS,
                                                MASK)["params"])
            for scan, model in jax_models.items()}
    stacked = {path: np.asarray(leaf) for path, leaf in made[True].items() if path[-2] in ("vera_A", "vera_B")}
    assert len(stacked) == 2 * len(targets)
    for path, leaf in stacked.items():  # ('model', 'layers', <module>..., key, 'default'), one entry per layer
        for index in (0, 2):
            np.testing.assert_array_equal(made[False][path[:2] + (str(index),) + path[2:]], leaf[index])
        assert path[:2] + ("1",) + path[2:] not in made[False]
    active = [np.asarray(leaf) for path, leaf in made[True].items() if path[-2] == "vera_active"]
    assert len(active) == len(targets) and all(np.array_equal(a, [1, 0, 1]) for a in active)


def test_only_the_lambdas_train(llama):
    _, _, _, targets, _, _, models = llama
    model = models[True]
    config = _config(targets)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    trained = {path[-2] for path, on in flatten(jaxpeft.trainable_mask(variables, config)).items() if on}
    assert trained == {"vera_lambda_b", "vera_lambda_d"}
    # a few optax steps through the core's freeze (on a small MLP: compiling the gradient of a model is slow)
    mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 5))
    config = VeraConfig(r=4, target_modules=["layers_0", "layers_2"], bias="none")
    variables = jaxpeft.init_adapters(jax.random.key(1), config, mlp.apply, mlp.init(jax.random.key(2), x), x)
    mask = jaxpeft.trainable_mask(variables, config)
    apply = jaxpeft.rewrite(mlp.apply, config)
    tx = jaxpeft.freeze(optax.adam(1e-2), mask)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((apply(p, x) - 1.0) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = variables, tx.init(variables)
    for _ in range(3):
        params, state = step(params, state)
    before, after = flatten(variables), flatten(params)
    for path, on in flatten(mask).items():
        assert on == (path[-2] in ("vera_lambda_b", "vera_lambda_d")), path
        if on:
            assert not np.array_equal(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


# ----- refusals -----

def test_a_folder_saved_without_projections_is_refused_in_one_line(llama, tmp_path):
    _, folder, _, targets, _, _, jax_models = llama
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with pytest.warns(UserWarning):
        peft_model = peft.get_peft_model(torch_model, _torch_config(targets, save_projection=False))
    peft_model.save_pretrained(tmp_path)
    assert not any("vera_A" in name for name in load_file(str(tmp_path / "adapter_model.safetensors")))
    model = jax_models[False]
    with pytest.raises(jaxpeft.ConfigError, match="save_projection=False is not supported") as error:
        load_adapter(tmp_path, model.apply_fn, model.params, IDS, MASK)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options,expected", [
    ({"r": 0}, "r must be a positive integer"),
    ({"save_projection": False}, "save_projection=False is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is unknown"),
    ({"vera_dropout": 1.0}, r"vera_dropout must be in \[0, 1\)"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"rank": 4}, "did you mean 'r'"),
])
def test_bad_config_values(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected) as error:
        VeraConfig(**options)
    assert "\n" not in str(error.value)
