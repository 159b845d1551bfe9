"""Every bad input gets a one-line error that says what was wrong, raised before JAX computes anything."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from toy_models import MLP, Transformer, sample_ids

import jaxpeft


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jnp.ones((2, 6))
    return model, x, model.init(jax.random.key(0), x)


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("options,expected", [
    ({"r": 0}, "r must be a positive integer, got r=0"),
    ({"r": -3}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"lora_alpha": 0}, "lora_alpha must be positive"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
    ({"bias": "some"}, "bias='some' is unknown; use one of none, all, lora_only"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda' is not supported"),
    ({"rank": 4}, "unknown option.*'rank' \\(did you mean 'r'\\?\\)"),
    ({"target_module": ["q"]}, "did you mean 'target_modules'"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern\\['q'\\]=0 must be a positive integer"),
    ({"task_type": "CHAT"}, "task_type='CHAT' is unknown"),
])
def test_bad_config_values(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected) as error:
        jaxpeft.LoraConfig(**options)
    _one_line(error.value)


def test_target_that_matches_nothing_lists_existing_modules(mlp):
    model, x, variables = mlp
    config = jaxpeft.LoraConfig(target_modules=["q_proj"])
    with pytest.raises(jaxpeft.AdapterError, match="matched no layer; modules that exist: fc1, fc2, out") as error:
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)
    _one_line(error.value)


def test_targeted_unsupported_layer_type_is_named():
    model = Transformer(scan=True)
    ids = sample_ids()
    variables = model.init(jax.random.key(0), ids)
    for target, kind in (["ln1", "LayerNorm"], ["attention", "SelfAttention"]):
        with pytest.raises(jaxpeft.AdapterError, match=f"layer.0.block.{target}' \\(a {kind}\\)") as error:
            jaxpeft.init_adapters(jax.random.key(0), jaxpeft.LoraConfig(target_modules=[target]), model.apply,
                                  variables, ids)
        _one_line(error.value)


def test_unsupported_einsum_layout():
    class Gemma(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 4, 3), "btd,ndh->btnh", name="q")(x)

    model, x = Gemma(), jnp.ones((1, 2, 4))
    with pytest.raises(jaxpeft.AdapterError, match="cannot adapt Einsum 'btd,ndh->btnh'"):
        jaxpeft.init_adapters(jax.random.key(0), jaxpeft.LoraConfig(target_modules=["q"]), model.apply,
                              model.init(jax.random.key(0), x), x)


def test_missing_target_modules(mlp):
    model, x, variables = mlp
    with pytest.raises(jaxpeft.AdapterError, match="needs target_modules .*modules that exist: fc1"):
        jaxpeft.init_adapters(jax.random.key(0), jaxpeft.LoraConfig(), model.apply, variables, x)


def test_rewritten_apply_without_the_adapter(mlp):
    model, x, variables = mlp
    config = jaxpeft.LoraConfig(target_modules=["fc1"])
    with pytest.raises(jaxpeft.AdapterError, match="lack adapter 'default' .*init_adapters first") as error:
        jax.jit(jaxpeft.rewrite(model.apply, config))(variables, x)
    _one_line(error.value)
    adapted = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)
    with pytest.raises(jaxpeft.AdapterError, match="no config for adapter 'other'"):
        jaxpeft.rewrite(model.apply, config)(adapted, x, adapter_name="other")
    with pytest.raises(jaxpeft.AdapterError, match="lack adapter 'other'"):
        jaxpeft.trainable_mask(adapted, config, adapter_name="other")


def test_duplicate_adapter_name(mlp):
    model, x, variables = mlp
    config = jaxpeft.LoraConfig(target_modules=["fc1"])
    adapted = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)
    with pytest.raises(jaxpeft.AdapterError, match="'default' already exists; pass another adapter_name="):
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, adapted, x)


def test_merge_of_a_state_without_the_adapter_and_unmerge_of_an_unmerged_one(mlp):
    model, x, variables = mlp
    config = jaxpeft.LoraConfig(target_modules=["fc1"])
    with pytest.raises(jaxpeft.AdapterError, match="no adapter 'default' to merge"):
        jaxpeft.merge(variables, config)
    adapted = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)
    with pytest.raises(jaxpeft.AdapterError, match="is not merged into these variables"):
        jaxpeft.unmerge(adapted, adapted, config)


def test_adapter_shapes_that_do_not_fit_the_base(mlp):
    model, x, variables = mlp
    config = jaxpeft.LoraConfig(r=2, target_modules=["fc1"])
    adapted = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)
    wrong = jax.tree_util.tree_map(lambda v: v, adapted)
    wrong["params"]["fc1"]["lora_A"]["default"] = jnp.zeros((5, 2))
    with pytest.raises(jaxpeft.AdapterError, match="do not fit the layer's weight") as error:
        jax.jit(jaxpeft.rewrite(model.apply, config))(wrong, x)
    _one_line(error.value)
    with pytest.raises(jaxpeft.AdapterError, match="does not fit the layer's kernel"):
        jaxpeft.merge(wrong, config)


def test_rewrite_rejects_jitted_apply_and_foreign_configs(mlp):
    model, _, _ = mlp
    with pytest.raises(TypeError, match="un-jitted apply function"):
        jaxpeft.rewrite(jax.jit(model.apply), jaxpeft.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(TypeError, match="expected a jaxpeft config"):
        jaxpeft.rewrite(model.apply, {"r": 8})


@pytest.mark.parametrize("spelling,expected", [("text-generation", "CAUSAL_LM"), ("classification", "SEQ_CLS"),
                                               ("CAUSAL_LM", "CAUSAL_LM"), ("seq_cls", "SEQ_CLS")])
def test_task_type_spellings(spelling, expected):
    assert jaxpeft.LoRAConfig(task_type=spelling).task_type == expected
