"""partition / combine / count_parameters / adapter bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, freeze

import jaxpeft


def test_partition_and_combine_round_trip():
    tree = {"params": {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, "b": jnp.arange(3.0)}}
    mask = {"params": {"a": {"kernel": False, "bias": True}, "b": True}}
    trainable, frozen = jaxpeft.partition(tree, mask)
    assert trainable["params"]["a"]["kernel"] is None and frozen["params"]["b"] is None
    assert len(jax.tree_util.tree_leaves(trainable)) == 2 and len(jax.tree_util.tree_leaves(frozen)) == 1
    back = jaxpeft.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        np.testing.assert_array_equal(x, y)


def test_frozen_dicts_stay_frozen():
    import flax.linen as nn
    model = nn.Dense(3)
    x = jnp.ones((1, 2))
    variables = freeze(model.init(jax.random.key(0), x))
    config = jaxpeft.LoraConfig(r=1, target_modules=".*")
    adapted = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, variables, x)
    assert isinstance(adapted, FrozenDict)
    assert isinstance(jaxpeft.trainable_mask(adapted, config), FrozenDict)
    assert isinstance(jaxpeft.merge(adapted, config), FrozenDict)
    assert jaxpeft.adapter_names(variables) == [] and jaxpeft.adapter_names(adapted) == ["default"]
    assert "lora_A" not in jaxpeft.strip_adapters(adapted)["params"]


def test_init_adapters_leaves_its_input_unchanged():
    import flax.linen as nn
    model = nn.Dense(3)
    x = jnp.ones((1, 2))
    variables = model.init(jax.random.key(0), x)
    before = jax.tree_util.tree_structure(variables)
    jaxpeft.init_adapters(jax.random.key(1), jaxpeft.LoraConfig(r=1, target_modules=".*"), model.apply, variables, x)
    assert jax.tree_util.tree_structure(variables) == before
