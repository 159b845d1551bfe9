"""``add_weighted_adapter`` against torch PEFT: the same two LoRA adapters, combined on both sides, same logits."""

import doctest

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxpeft
import jaxpeft.weighted_adapter
from jaxpeft.models import AutoModelForCausalLM

IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 7, 1]])
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99),
              (["q_proj", "v_proj"], ["v_proj", "o_proj"])),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=32),
             (["c_attn"], ["c_attn", "c_fc"])),  # Conv1D layers: torch transposes the update for the SVD
}


def test_docstring_examples():
    result = doctest.testmod(jaxpeft.weighted_adapter)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(torch PeftModel, jaxpeft PeftModel) holding the same adapters "x" and "y" with random weights."""
    make_config, (targets_x, targets_y) = FAMILIES[request.param]
    torch.manual_seed(0)
    config = make_config()
    folder = tmp_path_factory.mktemp(f"{request.param}-weighted")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "base")
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(folder / "base", attn_implementation="eager")
    torch_model = peft.get_peft_model(torch_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_x),
                                      adapter_name="x")
    torch_model.add_adapter("y", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets_y))
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    torch_model.save_pretrained(folder / "adapters", selected_adapters=["x", "y"])
    jax_model = jaxpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"),
                                                  folder / "adapters" / "x", adapter_name="x")
    jax_model.load_adapter(folder / "adapters" / "y", "y")
    return torch_model.eval(), jax_model


def _torch_logits(model, adapter_name):
    model.set_adapter(adapter_name)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _jax_logits(model, adapter_name):
    model.set_adapter(adapter_name)
    return np.asarray(model(IDS).logits)


@pytest.mark.parametrize("combination", [
    ("cat", {}), ("linear", {}), ("svd", {}), ("svd", {"svd_rank": 3}),
])
def test_combination_matches_torch_peft(pair, combination):
    torch_model, jax_model = pair
    combination_type, options = combination
    name = f"{combination_type}-{len(jax_model.peft_config)}"
    weights = [0.7, -0.4]
    torch_model.add_weighted_adapter(["x", "y"], weights, name, combination_type=combination_type, **options)
    jax_model.add_weighted_adapter(["x", "y"], weights, name, combination_type=combination_type, **options)
    expected = _torch_logits(torch_model, name)
    np.testing.assert_allclose(_jax_logits(jax_model, name), expected, atol=1e-4)
    assert np.abs(expected - _torch_logits(torch_model, "x")).max() > 1e-3  # the combination is not adapter x
    assert jax_model.peft_config[name].r == torch_model.peft_config[name].r


def test_cat_is_the_exact_weighted_sum(pair):
    _, jax_model = pair
    jax_model.add_weighted_adapter(["x", "y"], [1.0, 2.0], "sum", combination_type="cat")
    base = jax.tree_util.tree_leaves(jaxpeft.strip_adapters(jax_model.params)["params"])

    def update(name):  # merged weights minus base weights, leaf by leaf
        merged = jax.tree_util.tree_leaves(jaxpeft.merge(jax_model.params, jax_model.peft_config[name], name)["params"])
        return [np.asarray(m, np.float64) - np.asarray(b, np.float64) for m, b in zip(merged, base, strict=True)]

    changed = 0
    for got, x, y in zip(update("sum"), update("x"), update("y"), strict=True):
        np.testing.assert_allclose(got, x + 2 * y, atol=1e-5)
        changed += np.abs(got).max() > 1e-3
    assert changed >= 2


def test_svd_clamp_bounds_the_factors(pair):
    # Clamping at a quantile of the signed factor entries depends on the SVD's sign choice, which differs between
    # torch and JAX; so this checks the clamp against the unclamped factors of the same SVD instead.
    _, jax_model = pair
    jax_model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "plain", combination_type="svd", svd_rank=5)
    jax_model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "clamped", combination_type="svd", svd_rank=5,
                                   svd_clamp=0.8)
    flat = jaxpeft.tree.flatten(jax_model.params["params"])
    layers = {path[:-2] for path in flat if path[-2:] == ("lora_A", "plain")}
    assert layers
    for layer in layers:
        a, b = (np.asarray(flat[layer + (key, "plain")]) for key in ("lora_A", "lora_B"))
        high = np.quantile(np.concatenate([b.T.ravel(), a.T.ravel()]), 0.8)
        for key, plain in (("lora_A", a), ("lora_B", b)):
            np.testing.assert_allclose(np.asarray(flat[layer + (key, "clamped")]), np.clip(plain, -high, high),
                                       atol=1e-6)
    assert np.abs(_jax_logits(jax_model, "clamped") - _jax_logits(jax_model, "plain")).max() > 1e-5


def test_bad_requests(pair):
    _, jax_model = pair
    with pytest.raises(jaxpeft.AdapterError, match="no adapter named 'nope'"):
        jax_model.add_weighted_adapter(["x", "nope"], [1.0, 1.0], "bad")
    with pytest.raises(ValueError, match="one weight per adapter"):
        jax_model.add_weighted_adapter(["x", "y"], [1.0], "bad")
    with pytest.raises(ValueError, match="combination_type='mean' is unknown"):
        jax_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "bad", combination_type="mean")
    with pytest.raises(ValueError, match="already exists"):
        jax_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "x")
    assert "bad" not in jax_model.peft_config
