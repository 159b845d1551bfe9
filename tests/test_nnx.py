"""jaxpeft.nnx: adapters on Flax NNX models, against torch PEFT, linen, and models written in the NNX style."""

import copy
import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from nnx_models import EinsumMoE, Llama, MoEConfig, load_torch

import jaxpeft
from jaxpeft import nnx as peft_nnx
from jaxpeft.models import AutoModelForCausalLM

torch.set_num_threads(2)
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, tie_word_embeddings=False)
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 7))
MOE_TARGETS = dict(target_modules=["q_einsum", "kv_einsum", "attn_vec_einsum", "router"],
                   target_parameters=["moe.gate_up", "moe.down"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A transformers Llama (saved to a folder), the NNX Llama holding its weights, and torch's logits."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    folder = str(tmp_path_factory.mktemp("llama"))
    torch_model.save_pretrained(folder)
    model = Llama(config, nnx.Rngs(0))
    load_torch(model, torch_model.state_dict())
    return torch_model, model, folder


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def torch_adapter(llama, tmp_path_factory):
    """A torch PEFT LoRA adapter (random B, on attention, MLP and the embedding) saved to a folder, and its
    logits."""
    torch_model, _, _ = llama
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                             init_lora_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
    folder = str(tmp_path_factory.mktemp("torch_adapter"))
    adapted.save_pretrained(folder)
    return folder, torch_logits(adapted)


forward = nnx.jit(lambda model, x: model(x))


@functools.cache
def _moe_template(stacked: bool) -> EinsumMoE:
    return nnx.jit(lambda: EinsumMoE(MoEConfig(stacked=stacked), nnx.Rngs(0)))()  # one compile, not one per op


def moe_model(stacked: bool) -> tuple[EinsumMoE, jax.Array]:
    """A fresh copy of the einsum/MoE model (the same weights every time) and tokens for it."""
    return nnx.clone(_moe_template(stacked)), jnp.arange(12).reshape(2, 6) % MoEConfig().vocab


def test_nnx_llama_matches_torch(llama):
    torch_model, model, _ = llama
    assert np.abs(np.asarray(model(jnp.asarray(TOKENS))) - torch_logits(torch_model)).max() < 1e-4


def test_torch_peft_adapter_gives_torch_peft_logits(llama, torch_adapter):
    torch_model, model, _ = llama
    folder, reference = torch_adapter
    adapted = peft_nnx.PeftModel.from_pretrained(model, folder, jnp.asarray(TOKENS))
    assert np.abs(reference - torch_logits(torch_model)).max() > 0.1  # the adapter changes the logits
    assert np.abs(np.asarray(adapted(jnp.asarray(TOKENS))) - reference).max() < 1e-4
    wrapper = adapted.base_model.model.layers[1].self_attn.q_proj
    assert isinstance(wrapper, peft_nnx.AdaptedModule) and isinstance(wrapper.lora_A["default"], nnx.LoRAParam)


def test_files_saved_from_nnx_load_in_torch_peft(llama, torch_adapter, tmp_path):
    torch_model, model, _ = llama
    folder, reference = torch_adapter
    adapted = peft_nnx.PeftModel.from_pretrained(model, folder, jnp.asarray(TOKENS))
    adapted.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path)).eval()
    assert np.abs(torch_logits(reloaded) - reference).max() < 1e-4


class RenamedLlama(nnx.Module):
    """A Llama whose module names are not transformers' (as many NNX codebases name them), sharing the weights of
    ``llama``."""

    def __init__(self, llama: Llama):
        self.tok_embed, self.blocks = llama.model.embed_tokens, llama.model.layers
        self.final_norm, self.head = llama.model.norm, llama.lm_head

    def __call__(self, tokens):
        x = self.tok_embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


TO_HF = {r"^tok_embed": "model.embed_tokens", r"^blocks\.": "model.layers.", r"^final_norm": "model.norm",
         r"^head": "lm_head"}


def test_key_mapping_writes_files_torch_peft_loads(llama, tmp_path):
    torch_model, model, _ = llama
    renamed = RenamedLlama(model)
    config = jaxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], modules_to_save=["head"],
                                init_lora_weights=False, layers_to_transform=[1])
    adapted = peft_nnx.get_peft_model(renamed, config, jnp.asarray(TOKENS), key=3)
    head = adapted.base_model.head
    nnx.update(head, jax.tree_util.tree_map(lambda leaf: leaf * 1.5, nnx.state(head, nnx.LoRAParam)))
    adapted.save_pretrained(tmp_path, key_mapping=TO_HF)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert saved["modules_to_save"] == ["lm_head"]
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path)).eval()
    ours = np.asarray(adapted(jnp.asarray(TOKENS)))
    assert np.abs(ours - torch_logits(torch_model)).max() > 1e-3
    assert np.abs(torch_logits(reloaded) - ours).max() < 1e-4
    back = peft_nnx.PeftModel.from_pretrained(renamed, tmp_path, jnp.asarray(TOKENS), key_mapping=TO_HF)
    assert np.array_equal(np.asarray(back(jnp.asarray(TOKENS))), ours)


def test_linen_and_nnx_give_the_same_logits_and_gradients(llama, torch_adapter):
    _, model, folder = llama
    adapter_folder, _ = torch_adapter
    tokens = jnp.asarray(TOKENS)
    linen = AutoModelForCausalLM.from_pretrained(folder)
    apply_fn = lambda variables, ids: linen.module.apply(variables, input_ids=ids).logits  # noqa: E731
    variables, config = jaxpeft.load_adapter(adapter_folder, apply_fn, linen.params, tokens)
    rewritten = jaxpeft.rewrite(apply_fn, config)
    adapted = peft_nnx.PeftModel.from_pretrained(model, adapter_folder, tokens)
    assert np.abs(np.asarray(rewritten(variables, tokens)) - np.asarray(adapted(tokens))).max() < 1e-5

    def linen_loss(lora, rest):
        return jnp.mean(rewritten(jaxpeft.combine(lora, rest), tokens) ** 2)

    lora, rest = jaxpeft.partition(variables, jaxpeft.trainable_mask(variables, config))
    linen_grads = jaxpeft.tree.flatten(jax.grad(linen_loss)(lora, rest)["params"])
    linen_grads = {path: leaf for path, leaf in linen_grads.items() if leaf is not None}
    nnx_grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
    nnx_grads = {tuple(map(str, path[1:])): leaf.get_value() for path, leaf in nnx.to_flat_state(nnx_grads)}
    assert sorted(linen_grads) == sorted(nnx_grads) and len(nnx_grads) == 2 * (2 * 3 + 1)
    for path, grad in nnx_grads.items():
        assert np.abs(np.asarray(grad) - np.asarray(linen_grads[path])).max() < 1e-5 * (1 + np.abs(grad).max())


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "vmap_scan"])
def test_einsum_moe_model_identity_training_and_merge(stacked):
    model, tokens = moe_model(stacked)
    base_out = forward(model, tokens)
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, **MOE_TARGETS), tokens)
    assert np.array_equal(np.asarray(forward(adapted, tokens)), np.asarray(base_out))  # B starts at zero

    def snapshot(kind):  # nnx.state holds the variables themselves: copy them
        return jax.tree_util.tree_map(lambda leaf: leaf, nnx.state(adapted, kind))

    frozen_before, lora_before = snapshot(nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), snapshot(nnx.LoRAParam)
    optimizer = nnx.Optimizer(adapted, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(tokens) - 1.0) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(adapted, optimizer)) for _ in range(4)]
    assert losses[-1] < losses[0]
    frozen_after = nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                         frozen_before, frozen_after))
    changed = jax.tree_util.tree_map(lambda a, b: not bool(jnp.array_equal(a, b)), lora_before,
                                     nnx.state(adapted, nnx.LoRAParam))
    assert all(jax.tree_util.tree_leaves(changed))
    assert np.array_equal(np.asarray(forward(model, tokens)), np.asarray(base_out))  # the original is untouched
    merged = adapted.merge_and_unload()
    assert type(merged) is EinsumMoE and not nnx.state(merged, nnx.LoRAParam)
    assert np.abs(np.asarray(forward(merged, tokens)) - np.asarray(forward(adapted, tokens))).max() < 1e-5


def test_stacked_adapters_carry_the_layer_axis_and_load_unstacked(tmp_path):
    model, tokens = moe_model(stacked=True)
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, init_lora_weights=False, **MOE_TARGETS),
                                      tokens)
    blocks = adapted.base_model.blocks
    assert blocks.attn.q_einsum.own_params["w"]["lora_A"]["default"].shape == (2, 16, 1, 1, 2)
    assert blocks.moe.target_parameters["gate_up"]["lora_B"]["default"].shape == (2, 4, 1, 48, 2)
    adapted.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.blocks.1.moe.router.lora_A.weight",
            "base_model.model.blocks.0.moe.lora_A.weight"} <= names  # per layer, HF PEFT's ParamWrapper names
    unstacked, _ = moe_model(stacked=False)
    for i, block in enumerate(unstacked.blocks):  # the stacked model's weights, layer by layer
        nnx.update(block, jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], nnx.state(model.blocks)))
    nnx.update(unstacked, nnx.state(model, nnx.PathContains("embedder")))
    nnx.update(unstacked.final_norm, nnx.state(model.final_norm))
    assert np.abs(np.asarray(forward(unstacked, tokens)) - np.asarray(forward(model, tokens))).max() < 1e-5
    loaded = peft_nnx.PeftModel.from_pretrained(unstacked, tmp_path, tokens)
    assert np.abs(np.asarray(forward(loaded, tokens)) - np.asarray(forward(adapted, tokens))).max() < 1e-5


@pytest.mark.parametrize("config", [
    jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"], use_dora=True, init_lora_weights=False),
    jaxpeft.LoraConfig(r=2, target_modules=["v_proj", "up_proj"], init_lora_weights="pissa"),
    jaxpeft.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"], use_rslora=True, init_lora_weights=False,
                       rank_pattern={"lm_head": 3}),
    jaxpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                      init_ia3_weights=False),
], ids=["dora", "pissa", "embed_rslora_pattern", "ia3"])
def test_methods_merge_into_the_nnx_model(llama, config):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    adapted = peft_nnx.get_peft_model(model, config, tokens, key=1)
    out = np.asarray(adapted(tokens))
    change = np.abs(out - np.asarray(model(tokens))).max()
    if isinstance(config, jaxpeft.LoraConfig) and config.init_lora_weights == "pissa":
        assert change < 1e-4  # PiSSA starts at the base model (the residual plus the principal part)
        residual = adapted.base_model.model.layers[0].self_attn.v_proj.base_layer.kernel[...]
        assert not np.allclose(residual, model.model.layers[0].self_attn.v_proj.kernel[...])
    else:
        assert change > 1e-3  # the adapter (random, not the identity) changes the output
    merged = adapted.merge_and_unload()
    assert type(merged) is Llama and not nnx.state(merged, nnx.LoRAParam)
    assert np.abs(np.asarray(merged(tokens)) - out).max() < 2e-5


def test_trainer_trains_an_nnx_model(llama, tmp_path):
    _, model, _ = llama
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    adapted = peft_nnx.get_peft_model(model, config)
    rows = np.random.RandomState(1).randint(3, 64, (16, 6))
    train = [{"input_ids": list(row) * 2} for row in rows]  # each row repeats: learnable
    frozen_before = jax.tree_util.tree_map(lambda leaf: leaf, nnx.state(adapted, nnx.Not(nnx.LoRAParam)))
    args = jaxpeft.TrainingArguments(tmp_path / "run", max_steps=12, per_device_train_batch_size=8, learning_rate=3e-2,
                                     logging_steps=4, save_strategy="no", disable_tqdm=True)
    trainer = jaxpeft.Trainer(adapted, args, train_dataset=train, eval_dataset=train[:8])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05
    frozen_after = nnx.state(adapted, nnx.Not(nnx.LoRAParam))
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), frozen_before, frozen_after)))
    trainer.save_model(tmp_path / "adapter")
    reloaded = peft_nnx.PeftModel.from_pretrained(model, tmp_path / "adapter")
    tokens = jnp.asarray(rows[:2])
    adapted.eval()
    assert np.abs(np.asarray(forward(reloaded, tokens)) - np.asarray(forward(adapted, tokens))).max() < 1e-5


def test_bitfit_trains_only_the_biases_and_merges():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (3, 4))
    adapted = peft_nnx.get_peft_model(model, jaxpeft.BitFitConfig(), x)
    deltas = nnx.state(adapted, nnx.LoRAParam)
    assert sorted(jax.tree_util.tree_map(jnp.shape, deltas.to_pure_dict())["base_model"]["layers"].items()) == [
        (0, {"bitfit_bias": {"default": (8,)}}), (2, {"bitfit_bias": {"default": (2,)}})]
    nnx.update(adapted, jax.tree_util.tree_map(lambda leaf: leaf + 0.5, deltas))
    out = np.asarray(adapted(x))
    assert np.abs(out - np.asarray(model(x))).max() > 0.1
    merged = adapted.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged.layers[0].bias[...]), np.asarray(model.layers[0].bias[...]) + 0.5)
    assert np.abs(np.asarray(merged(x)) - out).max() < 1e-6


def test_modules_to_save_and_adapter_dropout(llama):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    config = jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False,
                                modules_to_save=["lm_head"])
    adapted = peft_nnx.get_peft_model(model, config, key=7)
    assert np.abs(np.asarray(forward(adapted, tokens)) - np.asarray(forward(adapted, tokens))).max() > 1e-3
    adapted.eval()  # no dropout: the same output twice, A and B applied in full
    quiet = np.asarray(forward(adapted, tokens))
    assert np.array_equal(np.asarray(forward(adapted, tokens)), quiet)
    head = adapted.base_model.lm_head
    assert jax.tree_util.tree_map(jnp.shape, nnx.state(head, nnx.LoRAParam).to_pure_dict()) == {
        "modules_to_save": {"default": {"kernel": (32, 64)}}}
    nnx.update(head, jax.tree_util.tree_map(lambda leaf: leaf + 0.1, nnx.state(head, nnx.LoRAParam)))
    changed = np.asarray(forward(adapted, tokens))  # the adapter's copy of the head runs, not the original
    assert np.abs(changed - quiet).max() > 0.1
    merged = adapted.merge_and_unload()
    assert type(merged.lm_head) is nnx.Linear
    assert np.abs(np.asarray(forward(merged, tokens)) - changed).max() < 1e-5
    unloaded = adapted.unload()
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), np.asarray(unloaded.lm_head.kernel[...]))


def test_bottleneck_adapters_on_nnx_modules_that_return_one_array():
    model, tokens = moe_model(stacked=True)
    config = jaxpeft.AdapterConfig(target_modules=["moe"], reduction_factor=4, non_linearity="relu", scaling=2.0,
                                   init_weights=False)
    adapted = peft_nnx.get_peft_model(model, config, tokens, key=3)
    leaves = {key: value["default"] for key, value in nnx.state(adapted.base_model.blocks.moe, nnx.LoRAParam)
              .to_pure_dict().items()}
    assert leaves["adapter_down_kernel"].shape == (2, 16, 4)  # one adapter per layer of the nnx.vmap stack
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    layer = jax.tree_util.tree_map(lambda leaf: leaf[1], leaves)  # the second block's adapter, by hand
    moe_out = nnx.merge(*nnx.split(model.blocks))  # the stacked MoE, called on one layer's slice
    base = nnx.jit(nnx.vmap(lambda block, x: block.moe(x), in_axes=(0, None)))(moe_out, x)[1]
    hidden = jax.nn.relu(base @ layer["adapter_down_kernel"] + layer["adapter_down_bias"])
    expected = base + 2.0 * (hidden @ layer["adapter_up_kernel"] + layer["adapter_up_bias"])
    adapted_moe = nnx.jit(nnx.vmap(lambda block, x: block.moe(x), in_axes=(0, None)))(adapted.base_model.blocks, x)[1]
    assert np.abs(np.asarray(adapted_moe) - np.asarray(expected)).max() < 1e-5
    assert np.abs(np.asarray(forward(adapted, tokens)) - np.asarray(forward(model, tokens))).max() > 1e-3


def test_several_adapters_switch_disable_and_mix_in_one_batch(llama):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                init_lora_weights=False), tokens)
    adapted.add_adapter("other", jaxpeft.IA3Config(target_modules=["v_proj", "o_proj"], init_ia3_weights=False),
                        key=5)
    base = np.asarray(model(tokens))
    first = np.asarray(adapted(tokens))
    adapted.set_adapter("other")
    second = np.asarray(adapted(tokens))
    with adapted.disable_adapter():
        assert np.array_equal(np.asarray(adapted(tokens)), base)
    assert np.abs(first - base).max() > 1e-3 and np.abs(second - base).max() > 1e-3
    mixed = nnx.jit(lambda m, x, mix: m(x, adapter_names=mix))(
        adapted, tokens, jaxpeft.AdapterMix.of(["default", "other"]))
    np.testing.assert_allclose(np.asarray(mixed), np.stack([first[0], second[1]]), atol=1e-5)
    mixed = adapted(tokens, adapter_names=["__base__", "default"])
    np.testing.assert_allclose(np.asarray(mixed), np.stack([base[0], first[1]]), atol=1e-5)


def test_pure_function_over_split_state_and_remat(llama):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules="all-linear",
                                                                init_lora_weights=False), tokens)
    graphdef, lora, frozen = nnx.split(adapted, nnx.LoRAParam, ...)

    @jax.jit
    def loss(lora, frozen):
        return jnp.mean(nnx.merge(graphdef, lora, frozen)(tokens) ** 2)

    grads = jax.grad(loss)(lora, frozen)
    assert len(jax.tree_util.tree_leaves(grads)) == 2 * 7 * 2  # A and B of 7 linear layers per block, 2 blocks
    assert float(loss(lora, frozen)) == pytest.approx(float(jnp.mean(adapted(tokens) ** 2)), rel=1e-5)
    rematted = nnx.remat(lambda m, x: m(x))(adapted, tokens)
    assert np.abs(np.asarray(rematted) - np.asarray(adapted(tokens))).max() < 1e-6


def test_stock_layers_need_no_example_inputs(llama, torch_adapter):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    config = jaxpeft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False, exclude_modules=["k_proj"])
    without, with_inputs = (peft_nnx.get_peft_model(model, config, *inputs, key=2) for inputs in [(), (tokens,)])
    assert (jax.tree_util.tree_map(jnp.shape, nnx.state(without, nnx.LoRAParam).to_pure_dict())
            == jax.tree_util.tree_map(jnp.shape, nnx.state(with_inputs, nnx.LoRAParam).to_pure_dict()))
    assert "lm_head" not in str(nnx.state(without, nnx.LoRAParam).to_pure_dict())  # all-linear spares the head
    assert np.array_equal(np.asarray(forward(without, tokens)), np.asarray(forward(with_inputs, tokens)))
    folder, reference = torch_adapter
    loaded = peft_nnx.PeftModel.from_pretrained(model, folder)
    assert np.abs(np.asarray(forward(loaded, tokens)) - reference).max() < 1e-4


def test_bad_input_is_a_one_line_error(llama):
    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    with pytest.raises(jaxpeft.AdapterError, match=r"matched no layer; modules that exist: model\.embed_tokens"):
        peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(target_modules=["query"]), tokens)
    moe, _ = moe_model(stacked=False)
    with pytest.raises(jaxpeft.AdapterError, match=r"pass inputs after the config.* such as blocks\.0\.attn"):
        peft_nnx.get_peft_model(moe, jaxpeft.LoraConfig(target_modules=["q_einsum"]))
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(target_modules=["q_proj"]), tokens)
    with pytest.raises(jaxpeft.AdapterError, match="no adapter named 'nope'"):
        adapted.set_adapter("nope")
    with pytest.raises(jaxpeft.AdapterError, match="already exists"):
        adapted.add_adapter("default", jaxpeft.LoraConfig(target_modules=["k_proj"]))


def test_adapter_state_round_trips_through_orbax(llama, tmp_path):
    import orbax.checkpoint as ocp

    _, model, _ = llama
    tokens = jnp.asarray(TOKENS)
    config = jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trained = peft_nnx.get_peft_model(model, config, key=4)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "adapter", nnx.state(trained, nnx.LoRAParam))
    checkpointer.wait_until_finished()
    fresh = peft_nnx.get_peft_model(model, config, key=5)
    assert not np.allclose(np.asarray(forward(fresh, tokens)), np.asarray(forward(trained, tokens)))
    nnx.update(fresh, checkpointer.restore(tmp_path / "adapter", nnx.state(fresh, nnx.LoRAParam)))
    assert np.array_equal(np.asarray(forward(fresh, tokens)), np.asarray(forward(trained, tokens)))


SHARDING_SCRIPT = """
import jax, jax.numpy as jnp, jaxpeft
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P
from jaxpeft import nnx as peft_nnx
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
init = nnx.initializers.lecun_normal()
with jax.set_mesh(mesh):
    model = nnx.Sequential(
        nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=nnx.Rngs(0)),
        nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=nnx.Rngs(1)))
    x = jnp.ones((8, 8))
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=4, target_modules=".*"), x)
    specs = nnx.get_partition_spec(nnx.state(adapted, nnx.LoRAParam))
    layers = specs["base_model"]["layers"]
    assert layers[0]["lora_A"]["default"].get_value() == P(), layers
    assert layers[0]["lora_B"]["default"].get_value() == P(None, "model"), layers
    assert layers[1]["lora_A"]["default"].get_value() == P("model", None), layers
    assert layers[1]["lora_B"]["default"].get_value() == P(), layers
    b = adapted.base_model.layers[0].lora_B["default"].get_value()
    assert b.sharding.spec == P(None, "model") and len(b.sharding.device_set) == 8, b.sharding
    out = nnx.jit(lambda m, x: m(x))(adapted, x)
    assert jnp.allclose(out, model(x), atol=1e-6)
print("ok")
"""


def test_adapters_follow_the_sharding_of_their_weights_on_eight_devices():
    eight_devices = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": eight_devices}
    done = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=pathlib.Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


STOCK_LAYERS = {  # NNX layer, its linen counterpart, an input
    "linear": (lambda r: nnx.Linear(6, 5, rngs=r), lambda: flax_nn.Dense(5), (2, 3, 6)),
    "linear_general": (lambda r: nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=r),
                       lambda: flax_nn.DenseGeneral((2, 5), axis=(-2, -1)), (2, 3, 4)),
    "einsum": (lambda r: nnx.Einsum("btd,dnh->btnh", (6, 2, 3), rngs=r),
               lambda: flax_nn.Einsum((6, 2, 3), "btd,dnh->btnh", use_bias=False), (2, 3, 6)),
    "conv": (lambda r: nnx.Conv(3, 4, (3, 3), rngs=r), lambda: flax_nn.Conv(4, (3, 3)), (2, 5, 5, 3)),
    "embed": (lambda r: nnx.Embed(10, 4, rngs=r), lambda: flax_nn.Embed(10, 4), None),
}


@pytest.mark.parametrize("kind", sorted(STOCK_LAYERS))
def test_stock_nnx_layers_match_their_linen_counterparts(kind):
    make_nnx, make_linen, shape = STOCK_LAYERS[kind]
    layer = make_nnx(nnx.Rngs(0))
    x = jnp.arange(6).reshape(2, 3) % 10 if shape is None else jax.random.normal(jax.random.key(1), shape)
    config = jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    adapted = peft_nnx.get_peft_model(layer, config, key=2)
    a, b = (np.asarray(adapted.base_model.__dict__[key]["default"][...]) for key in ("lora_A", "lora_B"))
    weight_name = "embedding" if kind == "embed" else "kernel"
    by_hand = nnx.clone(layer)  # the layer with W + (alpha / r) A B, A and B contracted over the rank
    weight = getattr(by_hand, weight_name)
    weight.set_value(weight[...] + (config.lora_alpha / config.r) * np.tensordot(a, b, axes=1))
    reference = np.asarray(by_hand(x))
    assert np.abs(np.asarray(adapted(x)) - np.asarray(layer(x))).max() > 1e-3
    assert np.abs(np.asarray(adapted(x)) - reference).max() < 1e-5
    linen = make_linen()  # and jaxpeft's linen path on the same weights and leaves agrees
    variables = {"params": nnx.state(adapted, nnx.Param).to_pure_dict()["base_model"]}
    variables["params"] = {**variables["params"].pop("base_layer"), **variables["params"]}
    variables["params"].update(nnx.state(adapted, peft_nnx.AdapterConstant).to_pure_dict()["base_model"])
    assert np.abs(np.asarray(jaxpeft.rewrite(linen.apply, config)(variables, x)) - reference).max() < 1e-5
    merged = adapted.merge_and_unload()
    assert type(merged) is type(layer)
    assert np.abs(np.asarray(merged(x)) - reference).max() < 1e-5


def test_command_line_trains_and_evaluates_an_nnx_factory_model(assets, tmp_path, capsys):
    from nnx_models import tiny_llama

    from jaxpeft import cli

    output = tmp_path / "run"
    status = cli.main(["train", "--model", "nnx_models:tiny_llama", "--tokenizer", str(assets / "gpt2"), "--task",
                       "causal_lm", "--method", "lora", "--r", "2", "--target-modules", "q_proj,v_proj",
                       "--train-file", str(assets / "lines.csv"), "--max-steps", "3", "--batch-size", "2",
                       "--learning-rate", "0.05", "--save-steps", "3", "--no-progress", "--output-dir", str(output)])
    assert status == 0, capsys.readouterr().err
    trained = peft_nnx.PeftModel.from_pretrained(tiny_llama(), output / "adapter")
    assert isinstance(trained.base_model.model.layers[0].self_attn.q_proj, peft_nnx.AdaptedModule)
    tokens = jnp.asarray([[101, 1996, 4937, 2938, 102]])
    assert np.abs(np.asarray(forward(trained, tokens)) - np.asarray(forward(tiny_llama(), tokens))).max() > 1e-4
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(output), "--data", str(assets / "lines.csv")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_examples"] == 4 and np.isfinite(metrics["perplexity"])
    assert cli.main(["export", "--run", str(output), "--step", "3", "--output", str(tmp_path / "exported")]) == 0
    exported = peft_nnx.PeftModel.from_pretrained(tiny_llama(), tmp_path / "exported")
    assert np.abs(np.asarray(forward(exported, tokens)) - np.asarray(forward(trained, tokens))).max() < 1e-6
    capsys.readouterr()
    assert cli.main(["generate", "--run", str(output), "--prompt", "the cat"]) == 2
    assert "not yet on Flax NNX models" in capsys.readouterr().err
    assert cli.main(["train", "--model", "nnx_models:no_such_factory", "--tokenizer", str(assets / "gpt2"),
                     "--task", "causal_lm", "--method", "lora", "--train-file", str(assets / "lines.csv"),
                     "--output-dir", str(tmp_path / "bad")]) == 2
    assert "has no attribute 'no_such_factory'" in capsys.readouterr().err


class PooledClassifier(nnx.Module):
    """Token embeddings mean-pooled over the attention mask, then a linear head: a text classifier in NNX."""

    def __init__(self, vocab: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, 16, rngs=rngs)
        self.proj = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
        pooled = (jnp.tanh(self.proj(self.embed(input_ids))) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def test_pipelines_run_nnx_models(assets):
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets / "bert")
    model = PooledClassifier(tokenizer.vocab_size, nnx.Rngs(0))
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["proj"], lora_dropout=0.5,
                                                                init_lora_weights=False))
    texts = ["a good movie", "an awful and dull film today"]
    classifier = jaxpeft.pipeline("text-classification", adapted, tokenizer, batch_size=2)
    results = classifier(texts, top_k=None)
    assert classifier(texts, top_k=None) == results  # inference: no dropout
    adapted.eval()
    encoded = tokenizer(texts, return_tensors="np", padding=True)
    probabilities = jax.nn.softmax(adapted(jnp.asarray(encoded["input_ids"]),
                                           jnp.asarray(encoded["attention_mask"])), axis=-1)
    for result, expected in zip(results, np.asarray(probabilities), strict=True):
        scores = {item["label"]: item["score"] for item in result}
        np.testing.assert_allclose([scores["LABEL_0"], scores["LABEL_1"]], expected, atol=1e-5)
    with pytest.raises(jaxpeft.PipelineError, match="text-generation needs one of jaxpeft's model families"):
        jaxpeft.pipeline("text-generation", adapted, tokenizer)


class DropoutBlock(nnx.Module):
    """A block with NNX state of its own: a dropout with its own RNG stream, called with ``rngs=`` as NNX allows."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x, rngs=None):
        return self.down(self.drop(jax.nn.relu(self.up(x)), rngs=rngs))


class RawDropout(nnx.Module):
    """A module with a raw kernel and a dropout inside its own call."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 8)))
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(x @ self.w[...])


def test_models_with_nnx_state_of_their_own():
    model = DropoutBlock(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    adapted = peft_nnx.get_peft_model(model, jaxpeft.LoraConfig(r=2, target_modules=["up", "down"],
                                                                init_lora_weights=False))
    first, second = adapted(x), adapted(x)
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3  # the block's dropout stream advances
    explicit = adapted(x, rngs=nnx.Rngs(dropout=7))  # a call-time rngs reaches the module, not jaxpeft
    assert np.array_equal(np.asarray(explicit), np.asarray(adapted(x, rngs=nnx.Rngs(dropout=7))))
    functional = adapted.functional()
    outputs = [functional.apply_fn(functional.params, x, rngs={"dropout": jax.random.key(seed)}) for seed in (1, 1, 2)]
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])
    adapted.eval()
    assert np.array_equal(np.asarray(functional.apply_fn(functional.params, x)), np.asarray(adapted(x)))
    holder = nnx.Sequential(RawDropout(nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    traced = peft_nnx.get_peft_model(holder, jaxpeft.LoraConfig(r=2, target_modules=["layers.0"]), x)
    with pytest.raises(jaxpeft.AdapterError, match=r"module layers\.0 \(RawDropout\) changes NNX state"):
        traced(x)
    traced.eval()  # without dropout its call changes no state: it adapts
    by_hand = holder.layers[1](x @ holder.layers[0].w[...])  # B starts at zero; no dropout in eval mode
    assert np.abs(np.asarray(traced(x)) - np.asarray(by_hand)).max() < 1e-6
