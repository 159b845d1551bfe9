"""Mixed-adapter batches: one adapter per example, in one jitted call (HF PEFT's ``adapter_names=``).

The reference for each row is the same model run on the whole batch with that row's adapter alone.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jaxpeft
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 6, 7], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]])
MASK = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def _randomize(model, adapter_name, seed, scale=0.3):
    """Non-trivial values for every trainable leaf of ``adapter_name`` (lora_B starts at zero, ia3_l at one)."""
    model.set_adapter(adapter_name)
    mask = model.trainable_mask
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    flags = jax.tree_util.tree_leaves(mask)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    model.params = jax.tree_util.tree_unflatten(treedef, [
        leaf + scale * jax.random.normal(k, jnp.shape(leaf)) if flag else leaf
        for leaf, flag, k in zip(leaves, flags, keys, strict=True)])


def _gpt2(scan_layers=False):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32)
    return AutoModelForCausalLM.from_config(config, scan_layers=scan_layers, seed=0)


def _three_adapters(base):
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]),
                                   adapter_name="lora")
    model.add_adapter("ia3", jaxpeft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                               feedforward_modules=["mlp.c_proj"]))
    model.add_adapter("bitfit", jaxpeft.BitFitConfig())
    for seed, name in enumerate(("lora", "ia3", "bitfit")):
        _randomize(model, name, seed)
    return model


def _rows_match_single_runs(model, names, **inputs):
    mixed = np.asarray(model(IDS, MASK, adapter_names=names, **inputs).logits)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = np.asarray(model(IDS, MASK, **inputs).logits)[row]
        else:
            model.set_adapter(name)
            expected = np.asarray(model(IDS, MASK, **inputs).logits)[row]
        np.testing.assert_allclose(mixed[row], expected, atol=1e-5, err_msg=f"row {row} ({name})")
    return mixed


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_each_row_gets_its_own_adapter(scan_layers):
    model = _three_adapters(_gpt2(scan_layers))
    mixed = _rows_match_single_runs(model, ["lora", "__base__", "ia3", "bitfit"])
    # the adapters really differ, so the check above could fail
    assert np.abs(mixed[0] - mixed[2]).max() > 1e-3 and np.abs(mixed[2] - mixed[3]).max() > 1e-3


def test_modules_to_save_copies_are_used_per_row():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, num_labels=3)
    base = AutoModelForSequenceClassification.from_config(config, seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, task_type="SEQ_CLS"), adapter_name="a")
    model.add_adapter("b", jaxpeft.IA3Config(task_type="SEQ_CLS"))
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    mixed = _rows_match_single_runs(model, ["b", "a", "__base__", "a"])
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3


def test_one_trace_serves_any_assignment_of_rows():
    model = _three_adapters(_gpt2())
    runner, _ = model._mixed_runner(["lora"] * 4, 4)
    model(IDS, MASK, adapter_names=["lora", "ia3", "lora", "__base__"])
    traces = runner._forward._cache_size()
    model(IDS, MASK, adapter_names=["ia3", "lora", "__base__", "lora"])
    model(IDS, MASK, adapter_names=["__base__", "__base__", "ia3", "lora"])
    assert runner._forward._cache_size() == traces


def test_mixed_generate_matches_single_adapter_generate():
    model = _three_adapters(_gpt2())
    names = ["ia3", "lora", "__base__", "lora"]
    mixed = model.generate(IDS, MASK, adapter_names=names, max_new_tokens=6, eos_token_id=None)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = model.generate(IDS, MASK, max_new_tokens=6, eos_token_id=None)
        else:
            model.set_adapter(name)
            expected = model.generate(IDS, MASK, max_new_tokens=6, eos_token_id=None)
        np.testing.assert_array_equal(mixed[row], expected[row])


def test_functional_mix_on_a_user_model_with_nested_adapted_module():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="inner")(nn.relu(nn.Dense(6, name="outer")(x)))

    model = Block()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    variables = model.init(jax.random.key(1), x)
    configs = {"a": jaxpeft.LoraConfig(r=2, target_modules=["outer", "inner"], init_lora_weights=False),
               "b": jaxpeft.LoraConfig(r=3, target_modules=["inner"], init_lora_weights=False)}
    for i, (name, config) in enumerate(configs.items()):
        variables = jaxpeft.init_adapters(jax.random.key(i + 2), config, model.apply, variables, x, adapter_name=name)
    apply = jaxpeft.rewrite(model.apply, configs)
    out = jax.jit(apply)(variables, x, adapter_name=jaxpeft.AdapterMix.of(["b", "a", "__base__"]))
    np.testing.assert_allclose(out[0], apply(variables, x, adapter_name="b")[0], atol=1e-6)
    np.testing.assert_allclose(out[1], apply(variables, x, adapter_name="a")[1], atol=1e-6)
    np.testing.assert_allclose(out[2], model.apply(variables, x)[2], atol=1e-6)


def test_bad_adapter_names():
    model = _three_adapters(_gpt2())
    with pytest.raises(ValueError, match=r"adapter_names has 3 names for a batch of 4"):
        model(IDS, MASK, adapter_names=["lora", "ia3", "lora"])
    with pytest.raises(ValueError, match=r"mentions \['nope'\].*adapters: \['bitfit', 'ia3', 'lora'\]"):
        model(IDS, MASK, adapter_names=["lora", "nope", "lora", "lora"])
    with pytest.raises(TypeError, match="one adapter name"):
        jaxpeft.AdapterMix.of("lora")


class _EveryKind(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(11, 8, name="embed")(ids)  # (batch, 6, 8)
        x = nn.Conv(8, (3,), name="conv")(x)
        x = nn.DenseGeneral((2, 4), name="general")(x)  # (batch, 6, 2, 4)
        x = nn.Einsum((2, 4, 8), "bsnh,nhd->bsd", name="einsum")(x)
        return nn.Dense(5, name="dense")(nn.relu(x))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_several_lora_adapters_with_different_ranks_and_alphas(scan_layers):
    base = AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50, max_position_embeddings=32), scan_layers=scan_layers, seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, lora_alpha=8, target_modules="all-linear"),
                                   adapter_name="a")
    model.add_adapter("b", jaxpeft.LoraConfig(r=5, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                              layers_to_transform=[0, 2]))
    model.add_adapter("c", jaxpeft.LoraConfig(r=3, use_rslora=True, target_modules=["v_proj", "down_proj"]))
    model.add_adapter("d", jaxpeft.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    for seed, name in enumerate("abcd"):
        _randomize(model, name, seed + 10)
    mixed = _rows_match_single_runs(model, ["c", "a", "__base__", "b"])
    assert np.abs(mixed[0] - mixed[3]).max() > 1e-3
    _rows_match_single_runs(model, ["d", "b", "a", "d"])  # DoRA takes the general path beside the others


def test_several_lora_adapters_on_every_layer_kind():
    model = _EveryKind()
    ids = jax.random.randint(jax.random.key(0), (4, 6), 0, 11)
    variables = model.init(jax.random.key(1), ids)
    configs = {"a": jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights=False),
               "b": jaxpeft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed", "conv", "einsum"],
                                       init_lora_weights=False)}
    for i, (name, config) in enumerate(configs.items()):
        variables = jaxpeft.init_adapters(jax.random.key(i + 2), config, model.apply, variables, ids,
                                          adapter_name=name)
    apply = jaxpeft.rewrite(model.apply, configs)
    names = ["b", "a", "__base__", "b"]
    out = jax.jit(apply)(variables, ids, adapter_name=jaxpeft.AdapterMix.of(names))
    for row, name in enumerate(names):
        expected = model.apply(variables, ids) if name == "__base__" else apply(variables, ids, adapter_name=name)
        np.testing.assert_allclose(out[row], expected[row], atol=1e-5, err_msg=f"row {row} ({name})")
    assert np.abs(out[0] - out[1]).max() > 1e-3
