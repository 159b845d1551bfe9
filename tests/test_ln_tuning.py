"""LN tuning against torch PEFT's LN_TUNING on jaxpeft's GPT-2 and Llama: files both ways, merge, training, scan."""

import doctest

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
from jaxpeft import tree
from jaxpeft.methods import ln_tuning
from jaxpeft.methods.ln_tuning import LNTuningConfig
from jaxpeft.models import AutoModelForCausalLM

FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=99),
}
IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 8]])
LEAVES = ("ln_tuning_scale", "ln_tuning_bias")


def _logits(model, params=None):
    return np.asarray(model(input_ids=IDS, params=params).logits)


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _randomised(params, seed=0):
    """The adapter copies moved well away from the base values (the base leaves untouched)."""
    flat = tree.flatten(params)
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        if any(key in LEAVES for key in path):
            flat[path] = leaf + 0.5 * jax.random.normal(jax.random.key(seed * 1000 + i), leaf.shape)
    return tree.unflatten_like(flat, params)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def torch_ln(request, tmp_path_factory):
    """A torch base model saved to a folder, and torch PEFT's LN tuning of it with random copies, saved too."""
    torch.manual_seed(0)
    config = FAMILIES[request.param]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(base_folder)
    peft_model = peft.get_peft_model(model, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "ln_tuning_layers" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    adapter_folder = tmp_path_factory.mktemp(request.param + "_adapter")
    peft_model.save_pretrained(adapter_folder)
    return request.param, base_folder, adapter_folder, peft_model.eval()


def test_docstring_example():
    result = doctest.testmod(ln_tuning, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_folder_gives_torch_peft_logits(torch_ln, scan_layers):
    family, base_folder, adapter_folder, peft_model = torch_ln
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan_layers)
    model = jaxpeft.PeftModel.from_pretrained(base, adapter_folder)
    expected = _torch_logits(peft_model)
    error = np.abs(_logits(model) - expected).max()
    print(f"{family} torch -> jaxpeft ({'scanned' if scan_layers else 'unscanned'}): max |diff| = {error:.2e}")
    np.testing.assert_allclose(_logits(model), expected, atol=1e-4, rtol=1e-4)
    assert np.abs(_logits(base) - expected).max() > 100 * max(error, 1e-7)


def test_jaxpeft_folder_gives_the_same_logits_in_torch_peft(torch_ln, tmp_path):
    family, base_folder, _, _ = torch_ln
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), LNTuningConfig())
    assert model.peft_config["default"].target_modules == ln_tuning.DEFAULT_TARGETS[family]
    model.params = _randomised(model.params)
    model.save_pretrained(str(tmp_path))
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager")
    torch_model = peft.PeftModel.from_pretrained(torch_base.eval(), tmp_path).eval()
    error = np.abs(_logits(model) - _torch_logits(torch_model)).max()
    print(f"{family} jaxpeft -> torch: max |diff| = {error:.2e}")
    np.testing.assert_allclose(_logits(model), _torch_logits(torch_model), atol=1e-4, rtol=1e-4)


def test_same_tensor_names_as_torch_peft(torch_ln, tmp_path):
    from safetensors.numpy import load_file

    _, base_folder, adapter_folder, _ = torch_ln
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=True),
                                   LNTuningConfig())
    model.save_pretrained(str(tmp_path))
    ours = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    theirs = {k: v.shape for k, v in load_file(adapter_folder / "adapter_model.safetensors").items()}
    assert ours == theirs


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_merge_equals_the_adapted_model_and_unmerge_gives_the_base_back(torch_ln, scan_layers):
    _, base_folder, _, _ = torch_ln
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan_layers)
    model = jaxpeft.get_peft_model(base, LNTuningConfig())
    model.params = _randomised(model.params)
    config = model.peft_config["default"]
    merged = jaxpeft.merge(model.params, config)
    np.testing.assert_allclose(_logits(base, merged), _logits(model), atol=1e-5, rtol=1e-5)
    assert np.abs(_logits(base) - _logits(model)).max() > 1e-2
    unmerged = jaxpeft.unmerge(merged, model.params, config)
    for path, leaf in tree.flatten(base.params).items():
        np.testing.assert_array_equal(tree.flatten(unmerged)[path], leaf)
    np.testing.assert_array_equal(_logits(model, unmerged), _logits(model))


def test_only_the_copies_train(torch_ln):
    _, base_folder, _, _ = torch_ln
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), LNTuningConfig())
    mask = model.trainable_mask
    trained = {path for path, trains in tree.flatten(mask).items() if trains}
    assert trained and all(path[-2] in LEAVES and path[-1] == "default" for path in trained)
    apply = model.apply_fn
    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)

    def loss(params):
        logits = apply(params, IDS).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = model.params, optimizer.init(model.params)
    for _ in range(3):
        params, state = step(params, state)
    before, after = tree.flatten(model.params), tree.flatten(params)
    for path in before:
        if path in trained:
            assert np.abs(np.asarray(after[path]) - np.asarray(before[path])).max() > 0
        else:
            np.testing.assert_array_equal(after[path], before[path])
    assert float(loss(params)) < float(loss(model.params))


def test_one_layer_of_a_scanned_stack_equals_the_unscanned_model(torch_ln):
    family, base_folder, _, _ = torch_ln
    target = r".*\.1\.(input_layernorm|ln_1)"  # the first norm of the second block only
    runs = []
    for scan_layers in (False, True):
        base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan_layers)
        model = jaxpeft.get_peft_model(base, LNTuningConfig(target_modules=target))
        flat = tree.flatten(model.params)
        selected = [path for path in flat if path[-2] == "ln_tuning_scale"]
        assert len(selected) == 1
        # the same change on the selected layer in both layouts: the base scale times 3 (then shifted)
        flat = {path: (leaf * 3 + 0.25 if path[-2] in LEAVES else leaf) for path, leaf in flat.items()}
        model.params = tree.unflatten_like(flat, model.params)
        runs.append((_logits(model), _logits(base)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    assert np.abs(runs[1][0] - runs[1][1]).max() > 1e-3


def test_hand_computation_on_a_layer_norm():
    model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(2)])
    x = jax.random.normal(jax.random.key(0), (3, 4))
    base = model.init(jax.random.key(1), x)
    config = LNTuningConfig(target_modules=["layers_1"])
    variables = _randomised(jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x))
    norm = variables["params"]["layers_1"]
    scale, bias = (np.asarray(norm[key]["default"], np.float64) for key in LEAVES)
    h = np.asarray(x, np.float64) @ np.asarray(base["params"]["layers_0"]["kernel"], np.float64) + np.asarray(
        base["params"]["layers_0"]["bias"])
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6) * scale + bias
    expected = h @ np.asarray(base["params"]["layers_2"]["kernel"]) + np.asarray(base["params"]["layers_2"]["bias"])
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, atol=1e-5)


def test_a_layer_that_is_not_a_norm_is_refused_in_one_line():
    model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(2)])
    x = jnp.ones((1, 4))
    base = model.init(jax.random.key(1), x)
    with pytest.raises(jaxpeft.AdapterError, match="leave it out of target_modules") as error:
        jaxpeft.init_adapters(jax.random.key(0), LNTuningConfig(target_modules=["layers_0"]), model.apply, base, x)
    assert "\n" not in str(error.value)
    with pytest.raises(jaxpeft.AdapterError, match="needs target_modules"):
        jaxpeft.init_adapters(jax.random.key(0), LNTuningConfig(), model.apply, base, x)
