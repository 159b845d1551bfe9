"""LoRA's ``trainable_token_indices`` against torch PEFT on jaxpeft's GPT-2 and tied Llama: files both ways, merge,
training, mixed batches, bad input."""

import json

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
from jaxpeft.models import AutoModelForCausalLM

FAMILIES = {  # jaxpeft's GPT-2 and tied Llama attend the adapted table for their output head
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
             ["c_attn"], "wte"),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               tie_word_embeddings=True), ["q_proj", "v_proj"], "embed_tokens"),
}
TOKENS = [1, 5, 7]
IDS = np.array([[1, 5, 7, 8, 9, 10], [3, 4, 5, 6, 7, 1]])
ROWS_KEY = "trainable_tokens_delta"


def _logits(model, params=None):
    return np.asarray(model(input_ids=IDS, params=params).logits)


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def _config(family, **options):
    return jaxpeft.LoraConfig(**{"r": 4, "target_modules": FAMILIES[family][1], "init_lora_weights": False, **options})


def _with_random_rows(model, adapter_name="default", seed=0):
    """The PeftModel's params with its trainable rows set to random values (they start as copies of the table)."""
    flat = tree.flatten(model.params)
    for i, path in enumerate(p for p in flat if p[-2:] == (ROWS_KEY, adapter_name)):
        flat[path] = jax.random.normal(jax.random.key(seed + i), flat[path].shape, flat[path].dtype)
    return tree.unflatten_like(flat, model.params)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def torch_lora(request, tmp_path_factory):
    """A torch base saved to a folder, and torch PEFT's LoRA with trainable tokens on it (random rows), saved too."""
    torch.manual_seed(0)
    make_config, targets, _ = FAMILIES[request.param]
    config = make_config()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(base_folder)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                            trainable_token_indices=TOKENS))
    with torch.no_grad():
        for name, value in peft_model.named_parameters():
            if ROWS_KEY in name:
                value.copy_(torch.randn_like(value))
    adapter_folder = tmp_path_factory.mktemp(request.param + "_adapter")
    peft_model.save_pretrained(adapter_folder)
    return request.param, base_folder, adapter_folder, peft_model.eval()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_folder_gives_torch_peft_logits(torch_lora, scan_layers):
    family, base_folder, adapter_folder, peft_model = torch_lora
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan_layers)
    model = jaxpeft.PeftModel.from_pretrained(base, adapter_folder)
    assert model.peft_config["default"].trainable_token_indices == TOKENS
    expected = _torch_logits(peft_model)
    error = np.abs(_logits(model) - expected).max()
    print(f"{family} torch -> jaxpeft ({'scanned' if scan_layers else 'unscanned'}): max |diff| = {error:.2e}, "
          f"max |logit| = {np.abs(expected).max():.1f}")
    np.testing.assert_allclose(_logits(model), expected, atol=1e-4, rtol=1e-5)
    flat = tree.flatten(model.params)  # the same LoRA with the original rows is far off: the rows count
    table = next(v for p, v in flat.items() if p[-1] == "embedding" and p[-2] == FAMILIES[family][2])
    for path in [p for p in flat if p[-2:] == (ROWS_KEY, "default")]:
        flat[path] = jnp.take(table, jnp.asarray(TOKENS), axis=0)
    assert np.abs(_logits(model, tree.unflatten_like(flat, model.params)) - expected).max() > 0.1


def test_jaxpeft_folder_has_torch_names_and_gives_the_same_logits_in_torch_peft(torch_lora, tmp_path):
    family, base_folder, adapter_folder, _ = torch_lora
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    model = jaxpeft.get_peft_model(base, _config(family, trainable_token_indices=TOKENS))
    model.params = _with_random_rows(model)
    model.save_pretrained(str(tmp_path))
    ours = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    theirs = {k: v.shape for k, v in load_file(adapter_folder / "adapter_model.safetensors").items()}
    assert ours == theirs and any(k.endswith("token_adapter.trainable_tokens_delta") for k in ours)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == TOKENS
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager")
    torch_model = peft.PeftModel.from_pretrained(torch_base.eval(), tmp_path).eval()
    error = np.abs(_logits(model) - _torch_logits(torch_model)).max()
    print(f"{family} jaxpeft -> torch: max |diff| = {error:.2e}")
    np.testing.assert_allclose(_logits(model), _torch_logits(torch_model), atol=1e-4, rtol=1e-5)


def test_rows_start_as_the_table_and_merge_unmerge_are_exact(torch_lora):
    family, base_folder, _, _ = torch_lora
    base = AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=True)
    fresh = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, target_modules=FAMILIES[family][1],
                                                            trainable_token_indices={FAMILIES[family][2]: TOKENS}))
    np.testing.assert_array_equal(_logits(fresh), _logits(base))
    model = jaxpeft.get_peft_model(base, _config(family, trainable_token_indices=TOKENS))
    model.params = _with_random_rows(model)
    config = model.peft_config["default"]
    merged = jaxpeft.merge(model.params, config)
    table = next(v for p, v in tree.flatten(merged).items() if p[-2:] == (FAMILIES[family][2], "embedding"))
    rows = next(v for p, v in tree.flatten(model.params).items() if p[-2:] == (ROWS_KEY, "default"))
    np.testing.assert_array_equal(np.asarray(table)[TOKENS], np.asarray(rows))
    np.testing.assert_allclose(_logits(base, merged), _logits(model), atol=1e-5, rtol=1e-5)
    unmerged = jaxpeft.unmerge(merged, model.params, config)
    flat = tree.flatten(unmerged)
    for path, leaf in tree.flatten(base.params).items():
        np.testing.assert_allclose(flat[path], leaf, atol=1e-6, err_msg=str(path))


def test_only_the_rows_and_lora_train_and_other_rows_keep_their_values():
    base = AutoModelForCausalLM.from_config(FAMILIES["llama"][0](), seed=0)
    model = jaxpeft.get_peft_model(base, _config("llama", trainable_token_indices=TOKENS))
    config = model.peft_config["default"]
    mask = jaxpeft.trainable_mask(model.params, config)
    trained = sorted(path[-2] for path, on in tree.flatten(mask).items() if on)
    assert set(trained) == {"lora_A", "lora_B", ROWS_KEY} and trained.count(ROWS_KEY) == 1
    apply = jaxpeft.rewrite(base.module.apply, config)
    ids = jnp.asarray(IDS)

    trainable, frozen = jaxpeft.partition(model.params, mask)  # the token ids stay out of the gradient

    def loss(trainable):
        logits = apply(jaxpeft.combine(trainable, frozen), ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, trainable, jax.grad(loss)(trainable))
    params = model.params["params"]
    new = tree.flatten(jaxpeft.combine(stepped, frozen)["params"])
    old = tree.flatten(params)
    changed = {path[-2] for path in old if not np.array_equal(old[path], new[path])}
    assert changed == {"lora_A", "lora_B", ROWS_KEY}
    merged_table = next(v for p, v in tree.flatten(jaxpeft.merge({"params": tree.unflatten_like(new, params)},
                                                                 config)).items() if p[-1] == "embedding")
    others = np.setdiff1d(np.arange(99), TOKENS)
    np.testing.assert_array_equal(np.asarray(merged_table)[others], np.asarray(old[("model", "embed_tokens",
                                                                                    "embedding")])[others])


def test_a_mixed_batch_runs_each_row_with_its_own_rows():
    base = AutoModelForCausalLM.from_config(FAMILIES["llama"][0](), seed=0)
    model = jaxpeft.get_peft_model(base, _config("llama", trainable_token_indices=TOKENS))
    model.add_adapter("other", _config("llama", trainable_token_indices=[2, 5]))
    model.params = _with_random_rows(model, "default", 10)
    model.params = _with_random_rows(model, "other", 20)
    singles = []
    for name in ("default", "other"):
        model.set_adapter(name)
        singles.append(_logits(model))
    mixed = np.asarray(model(input_ids=IDS, adapter_names=["default", "other"]).logits)
    np.testing.assert_allclose(mixed[0], singles[0][0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], singles[1][1], atol=1e-5)
    assert np.abs(singles[0] - singles[1]).max() > 0.1


def test_bad_input_is_one_line():
    base = AutoModelForCausalLM.from_config(FAMILIES["llama"][0](), seed=0)
    with pytest.raises(jaxpeft.AdapterError, match="both a LoRA target and in trainable_token_indices"):
        jaxpeft.get_peft_model(base, _config("llama", target_modules=["q_proj", "embed_tokens"],
                                             trainable_token_indices=TOKENS))
    with pytest.raises(jaxpeft.AdapterError, match="matched no module; modules that exist: .*embed_tokens"):
        jaxpeft.get_peft_model(base, _config("llama", trainable_token_indices={"wte": TOKENS}))
    with pytest.raises(jaxpeft.AdapterError, match="go up to 120 but .* has 99 rows"):
        jaxpeft.get_peft_model(base, _config("llama", trainable_token_indices=[3, 120]))
    with pytest.raises(ValueError, match="modules_to_save .* and trainable_token_indices"):
        jaxpeft.LoraConfig(modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]})
    with pytest.raises(ValueError, match="each token id once"):
        jaxpeft.LoraConfig(trainable_token_indices=[1, 1])
    with pytest.raises(ValueError, match="non-negative token ids"):
        jaxpeft.LoraConfig(trainable_token_indices={"embed_tokens": [-1]})


def test_weighted_combination_refuses_trainable_rows():
    from jaxpeft.weighted_adapter import combined_config

    with pytest.raises(jaxpeft.AdapterError, match="cannot combine adapters with trainable_token_indices"):
        combined_config([jaxpeft.LoraConfig(trainable_token_indices=[1]), jaxpeft.LoraConfig()], "cat", None)


def test_flax_nnx_model_trains_its_rows_with_lora_params():
    from flax import nnx

    import jaxpeft.nnx

    class TiedLM(nnx.Module):  # an NNX model as NNX code writes one: its own modules, a tied head via attend
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.linear = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.linear(self.embed(ids)))

    ids = jnp.array([[1, 2, 3, 9]])
    model = TiedLM(nnx.Rngs(0))
    table = np.asarray(model.embed.embedding[...]).copy()
    before = model(ids)
    peft_model = jaxpeft.nnx.get_peft_model(
        model, jaxpeft.LoraConfig(r=2, target_modules=["linear"], trainable_token_indices=[1, 2]), ids)
    np.testing.assert_array_equal(peft_model(ids), before)
    trained = nnx.state(peft_model, nnx.LoRAParam)
    assert sorted(tree.flatten(trained.to_pure_dict())) == [
        ("base_model", "embed", ROWS_KEY, "default"), ("base_model", "linear", "lora_A", "default"),
        ("base_model", "linear", "lora_B", "default")]
    optimizer = nnx.Optimizer(peft_model, optax.sgd(0.5), wrt=nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(peft_model)
    optimizer.update(peft_model, grads)
    rows = np.asarray(peft_model.base_model.embed.trainable_tokens_delta["default"][...])
    assert np.abs(rows - table[[1, 2]]).max() > 1e-3  # the rows moved; the table itself is frozen
    np.testing.assert_array_equal(np.asarray(peft_model.base_model.embed.embedding[...]), table)
    by_hand = np.asarray(table).copy()
    by_hand[[1, 2]] = rows
    x = by_hand[np.asarray(ids)]
    linear = peft_model.base_model.linear
    a, b = (np.asarray(getattr(linear, k)["default"][...]) for k in ("lora_A", "lora_B"))
    hidden = x @ np.asarray(linear.kernel[...]) + np.asarray(linear.bias[...]) + (x @ a @ b) * (8 / 2)
    np.testing.assert_allclose(np.asarray(peft_model(ids)), hidden @ by_hand.T, atol=1e-4, rtol=1e-4)
