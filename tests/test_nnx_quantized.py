"""QLoRA on Flax NNX models (jaxpeft.nnx.quantize): against the same NNX model holding the dequantized weights as
float arrays (put there by hand), and against jaxpeft's linen QLoRA on the same weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from nnx_models import EinsumMoE, Llama, MoEConfig

import jaxpeft
from jaxpeft import nnx as peft_nnx
from jaxpeft import quantization
from jaxpeft.models import AutoModelForCausalLM

LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, tie_word_embeddings=False)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)))
NF4 = jaxpeft.QuantizationConfig("nf4", double_quant=True)
LINEAR = [f"model.layers.{i}.{name}.kernel" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]
MOE_QUANTIZED = ["q_einsum", "kv_einsum", "attn_vec_einsum", "moe"]  # moe: its experts and its router
MOE_TARGETS = dict(target_modules=["kv_einsum", "router"], target_parameters=["moe.gate_up"])  # einsum, experts

forward = nnx.jit(lambda model, x: model(x))


def rbg(seed: int) -> jax.Array:
    """A key of the RBG generator: random values compile much faster than with threefry's."""
    return jax.random.key(seed, impl="rbg")


build = nnx.jit(lambda make: make(nnx.Rngs(rbg(0))), static_argnums=0)  # a model built in one compiled call
dequantize = jax.jit(quantization.dequantize)  # as the model's own jitted call dequantizes (one compile per layout)


def quantized_leaves(model: nnx.Module) -> dict[str, quantization.QuantizedArray]:
    """``{dotted path of the weight in the unwrapped model: its QuantizedArray}``."""
    return {".".join(str(s) for s in path if s != "base_layer"): variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if quantization.is_quantized(variable.get_value())}


def dequantized_reference(quantized: nnx.Module, model: nnx.Module) -> nnx.Module:
    """A float copy of ``model`` (the unquantized original) in which each weight that ``quantized`` holds
    quantized is replaced by ``quantization.dequantize`` of it."""
    reference = nnx.clone(model)
    variables = {".".join(map(str, path)): variable
                 for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param))}
    for path, leaf in quantized_leaves(quantized).items():
        assert isinstance(variables[path].get_value(), jax.Array)
        variables[path].set_value(dequantize(leaf))
    return reference


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def llama():
    """The NNX Llama in float, quantized to nf4 (double quant), and its dequantized float reference."""
    model = build(functools.partial(Llama, transformers.LlamaConfig(**LLAMA)))
    quantized = peft_nnx.quantize(model, NF4)
    return model, quantized, dequantized_reference(quantized, model)


def test_quantized_llama_runs_its_dequantized_weights(llama):
    model, quantized, reference = llama
    leaves = quantized_leaves(quantized)
    assert sorted(leaves) == sorted(LINEAR)  # embeddings, norms and the head stay float
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, peft_nnx.AdaptedModule) and isinstance(q_proj.base_layer, nnx.Linear)
    assert type(q_proj.kernel) is nnx.Param and q_proj.kernel.get_value().codes.dtype == jnp.uint8
    assert isinstance(model.model.layers[0].self_attn.q_proj.kernel.get_value(), jax.Array)  # the input is unchanged
    expected = forward(reference, TOKENS)
    assert max_diff(forward(model, TOKENS), expected) > 1e-2  # nf4 rounding changes the logits
    assert max_diff(forward(quantized, TOKENS), expected) < 1e-5
    graphdef, state = nnx.split(quantized)
    pure = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    assert max_diff(pure(state, TOKENS), expected) < 1e-5
    again = peft_nnx.quantize(quantized, NF4)  # idempotent: the same codes, no second wrapper
    assert sorted(quantized_leaves(again)) == sorted(leaves)
    assert all(np.array_equal(leaf.codes, leaves[path].codes) for path, leaf in quantized_leaves(again).items())
    assert isinstance(again.model.layers[0].self_attn.q_proj.base_layer, nnx.Linear)
    assert peft_nnx.PeftModel(again, ((), {})).trainable_parameters().total == sum(
        int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def test_quantized_nnx_llama_equals_jaxpeft_linen_qlora(llama):
    model, quantized, _ = llama
    linen = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA))
    nnx_values = {".".join(map(str, path)).replace(".weight", ".scale"): variable.get_value()
                  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: nnx_values[".".join(key.key for key in path[1:])], linen.params)  # the NNX model's weights
    apply = jax.jit(lambda variables, ids: linen.module.apply(variables, input_ids=ids).logits)
    assert max_diff(apply(params, TOKENS), forward(model, TOKENS)) < 1e-5
    linen_quantized = jaxpeft.quantize(params, NF4)
    linen_leaves = {".".join(path): leaf for path, leaf in
                    jaxpeft.tree.flatten(linen_quantized["params"]).items() if quantization.is_quantized(leaf)}
    nnx_leaves = quantized_leaves(quantized)
    assert sorted(linen_leaves) == sorted(nnx_leaves)
    for path, leaf in nnx_leaves.items():
        assert np.array_equal(leaf.codes, linen_leaves[path].codes) and np.array_equal(
            leaf.scales, linen_leaves[path].scales)
    assert max_diff(apply(linen_quantized, TOKENS), forward(quantized, TOKENS)) < 1e-5


@pytest.mark.parametrize("config", [
    jaxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"], use_dora=True, init_lora_weights=False),
], ids=["lora", "dora"])
def test_adapters_on_the_quantized_model_equal_them_on_the_dequantized_model(llama, config):
    _, quantized, reference = llama
    adapted = peft_nnx.get_peft_model(quantized, config, key=rbg(1))
    on_float = peft_nnx.get_peft_model(reference, config, key=rbg(1))  # the same A, B (and DoRA magnitudes)
    out = forward(adapted, TOKENS)
    assert max_diff(out, forward(quantized, TOKENS)) > 1e-3
    assert max_diff(out, forward(on_float, TOKENS)) < 2e-5
    merged = adapted.merge_and_unload()  # a float model: every weight dequantized
    assert type(merged) is Llama and not quantized_leaves(merged)
    assert type(merged.model.layers[1].self_attn.k_proj) is nnx.Linear
    assert max_diff(forward(merged, TOKENS), out) < 2e-5


def test_qlora_training_keeps_the_codes_lowers_the_loss_saves_and_merges(llama, tmp_path):
    _, quantized, reference = llama
    config = jaxpeft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    adapted = peft_nnx.get_peft_model(quantized, config, key=rbg(2))
    frozen = jax.tree_util.tree_map(np.asarray, nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    optimizer = nnx.Optimizer(adapted, optax.adam(3e-2), wrt=nnx.LoRAParam)
    targets = jnp.roll(TOKENS, -1, axis=1)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(TOKENS), targets).mean()
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    assert len(quantized_leaves(adapted)) == len(LINEAR)
    losses = [float(step(adapted, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, frozen, after))  # codes bit for bit
    adapted.save_pretrained(tmp_path)
    loaded = peft_nnx.PeftModel.from_pretrained(reference, tmp_path)  # the adapter, on the float weights
    out = forward(adapted, TOKENS)
    assert max_diff(forward(loaded, TOKENS), out) < 2e-5
    requantized = adapted.merge_and_unload(requantize=True)  # merged in float, quantized again as it was
    merged = adapted.merge_and_unload()  # a float model
    assert type(merged) is Llama and not quantized_leaves(merged)
    assert max_diff(forward(merged, TOKENS), out) < 2e-5
    leaves, before = quantized_leaves(requantized), quantized_leaves(quantized)
    assert sorted(leaves) == sorted(before) and type(requantized) is Llama
    floats = {".".join(map(str, path)): variable.get_value()
              for path, variable in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
    for path, leaf in leaves.items():
        adapted_here = any(f".{name}." in path for name in config.target_modules)
        expected = quantization.requantize_like(floats[path], before[path]) if adapted_here else before[path]
        assert np.array_equal(leaf.codes, expected.codes) and np.array_equal(leaf.scales, expected.scales), path
    assert isinstance(requantized.model.layers[0].self_attn.q_proj, peft_nnx.AdaptedModule)
    assert max_diff(forward(requantized, TOKENS), forward(dequantized_reference(requantized, merged), TOKENS)) < 1e-5


def test_einsum_moe_quantized_by_target_modules_and_adapted():
    model = build(functools.partial(EinsumMoE, MoEConfig(experts=2, top_k=1)))  # stacked: nnx.vmap, nnx.scan
    tokens = jnp.arange(12).reshape(2, 6) % MoEConfig().vocab
    int4 = jaxpeft.QuantizationConfig("int4", block_size=None)
    quantized = peft_nnx.quantize(model, int4, target_modules=MOE_QUANTIZED)
    leaves = quantized_leaves(quantized)
    assert sorted(leaves) == ["blocks.attn.attn_vec_einsum.w", "blocks.attn.kv_einsum.w", "blocks.attn.q_einsum.w",
                              "blocks.moe.down", "blocks.moe.gate_up", "blocks.moe.router.kernel"]
    assert leaves["blocks.moe.gate_up"].shape == (2, 2, 16, 48)  # layers and experts quantized slice by slice
    reference = dequantized_reference(quantized, model)
    assert max_diff(forward(model, tokens), forward(reference, tokens)) > 1e-3
    assert max_diff(forward(quantized, tokens), forward(reference, tokens)) < 1e-5
    config = jaxpeft.LoraConfig(r=2, init_lora_weights=False, **MOE_TARGETS)
    adapted = peft_nnx.get_peft_model(quantized, config, tokens, key=rbg(3))
    on_float = peft_nnx.get_peft_model(reference, config, tokens, key=rbg(3))
    out = forward(adapted, tokens)
    assert max_diff(out, forward(quantized, tokens)) > 1e-3
    assert max_diff(out, forward(on_float, tokens)) < 2e-5


def test_bad_input_is_a_one_line_error(llama):
    model, _, _ = llama
    expected = (r"^quantize selected no weight of Llama \(target_modules=\['query'\].* its weights of two or more "
                r"axes: lm_head\.kernel, model\.embed_tokens\.embedding, model\.layers\.0\..*\(16 in all\)$")
    with pytest.raises(ValueError, match=expected) as error:
        peft_nnx.quantize(model, NF4, target_modules=["query"])
    assert "\n" not in str(error.value)
    head_only = jaxpeft.QuantizationConfig("int8", skip_modules=[".*"])
    with pytest.raises(ValueError, match=r"^quantize selected no weight .*by default the kernels"):
        peft_nnx.quantize(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), head_only)
    with pytest.raises(TypeError, match="takes a jaxpeft.QuantizationConfig, not str"):
        peft_nnx.quantize(model, "nf4")
