"""Trainable tokens against torch PEFT's TRAINABLE_TOKENS on jaxpeft's GPT-2 and tied Llama (the output head attends
the adapted table): files both ways, merge, training, scan."""

import doctest

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
from jaxpeft import tree
from jaxpeft.methods import trainable_tokens
from jaxpeft.methods.trainable_tokens import TrainableTokensConfig
from jaxpeft.models import AutoModelForCausalLM

FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                              tie_word_embeddings=True),
}
TOKENS = [1, 5, 7]
IDS = np.array([[1, 5, 7, 8, 9, 10], [3, 4, 5, 6, 7, 1]])


def _logits(model, params=None):
    return np.asarray(model(input_ids=IDS, params=params).logits)


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def torch_tt(request, tmp_path_factory):
    """A torch base model saved to a folder, and torch PEFT's trainable tokens on it with random rows, saved too."""
    torch.manual_seed(0)
    config = FAMILIES[request.param]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(base_folder)
    peft_model = peft.get_peft_model(model, peft.TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    adapter_folder = tmp_path_factory.mktemp(request.param + "_adapter")
    peft_model.save_pretrained(adapter_folder)
    return request.param, base_folder, adapter_folder, peft_model.eval()


def test_docstring_example():
    result = doctest.testmod(trainable_tokens, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_folder_gives_torch_peft_logits(torch_tt, scan_layers):
    family, base_folder, adapter_folder, peft_model = torch_tt
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan_layers)
    model = jaxpeft.PeftModel.from_pretrained(base, adapter_folder)
    expected = _torch_logits(peft_model)
    error = np.abs(_logits(model) - expected).max()
    print(f"{family} torch -> jaxpeft ({'scanned' if scan_layers else 'unscanned'}): max |diff| = {error:.2e}, "
          f"max |logit| = {np.abs(expected).max():.1f}")
    np.testing.assert_allclose(_logits(model), expected, atol=1e-4, rtol=1e-5)
    assert np.abs(_logits(base) - expected).max() > 1.0


def test_jaxpeft_folder_gives_the_same_logits_in_torch_peft(torch_tt, tmp_path):
    family, base_folder, adapter_folder, _ = torch_tt
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    model = jaxpeft.get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    model.save_pretrained(str(tmp_path))
    ours = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    theirs = {k: v.shape for k, v in load_file(adapter_folder / "adapter_model.safetensors").items()}
    assert ours == theirs  # the embedding's rows, and the tied lm_head's copy
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager")
    torch_model = peft.PeftModel.from_pretrained(torch_base.eval(), tmp_path).eval()
    error = np.abs(_logits(model) - _torch_logits(torch_model)).max()
    print(f"{family} jaxpeft -> torch: max |diff| = {error:.2e}")
    np.testing.assert_allclose(_logits(model), _torch_logits(torch_model), atol=1e-4, rtol=1e-5)
    assert np.abs(_logits(base) - _logits(model)).max() > 1.0


def test_starts_equal_to_the_base(torch_tt):
    _, base_folder, _, _ = torch_tt
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    model = jaxpeft.get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS))
    np.testing.assert_array_equal(_logits(model), _logits(base))


def test_merge_equals_the_adapted_model_and_unmerge_gives_the_base_back(torch_tt):
    _, base_folder, _, _ = torch_tt
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=True)
    model = jaxpeft.get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    config = model.peft_config["default"]
    merged = jaxpeft.merge(model.params, config)
    np.testing.assert_allclose(_logits(base, merged), _logits(model), atol=1e-5, rtol=1e-5)
    unmerged = jaxpeft.unmerge(merged, model.params, config)
    flat = tree.flatten(unmerged)
    for path, leaf in tree.flatten(base.params).items():
        np.testing.assert_array_equal(flat[path], leaf)
    np.testing.assert_array_equal(_logits(model, unmerged), _logits(model))


def test_only_the_rows_train(torch_tt):
    _, base_folder, _, _ = torch_tt
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                                   TrainableTokensConfig(token_indices=TOKENS))
    mask = model.trainable_mask
    trained = [path for path, trains in tree.flatten(mask).items() if trains]
    assert len(trained) == 1 and trained[0][-2:] == ("trainable_tokens_delta", "default")
    apply = model.apply_fn
    optimizer = jaxpeft.freeze(optax.adam(1e-1), mask)

    def loss(params):
        logits = apply(params, IDS).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
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


def test_hand_computation_and_bad_indices():
    import flax.linen as nn

    model = nn.Sequential([nn.Embed(10, 4)])
    ids = jnp.array([[1, 2, 7]])
    base = model.init(jax.random.key(1), ids)
    config = TrainableTokensConfig(token_indices=[7, 2], target_modules=".*", init_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, ids)
    rows = np.asarray(variables["params"]["layers_0"]["trainable_tokens_delta"]["default"])
    table = np.array(base["params"]["layers_0"]["embedding"])
    table[[7, 2]] = rows
    np.testing.assert_array_equal(jaxpeft.rewrite(model.apply, config)(variables, ids), table[[[1, 2, 7]]])
    with pytest.raises(jaxpeft.AdapterError, match="resize the embedding") as error:
        jaxpeft.init_adapters(jax.random.key(0), TrainableTokensConfig(token_indices=[10], target_modules=".*"),
                              model.apply, base, ids)
    assert "\n" not in str(error.value)
    with pytest.raises(jaxpeft.ConfigError, match="repeats"):
        TrainableTokensConfig(token_indices=[1, 1])
