"""Layer discovery: paths, stacking under nn.scan / nn.vmap / nn.remat, per-layer Hugging Face style paths."""

import gc
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft._tracing import trace_layers


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name="fc")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.remat(Inner)(name="mlp")(x), None


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return stack(name="inner")(x, None)[0], None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(
            x, None)
        x, _ = nn.scan(Outer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="groups")(
            x, None)
        ensemble = nn.vmap(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                           out_axes=0, axis_size=2)
        x = ensemble(name="ens")(x).sum(0)
        return nn.Dense(2, name="head")(x)


def test_stacks_and_virtual_paths():
    model, x = Model(), jnp.ones((2, 4))
    trace = trace_layers(model.apply, model.init(jax.random.key(0), x), (x,), {})
    layers = trace.layers
    scanned = layers[("layers", "mlp", "fc")]
    assert scanned.stack_shape == (3,) and scanned.kernel_shape == (4, 4)
    assert scanned.virtual_paths == {(0,): "layers.0.mlp.fc", (1,): "layers.1.mlp.fc", (2,): "layers.2.mlp.fc"}
    nested = layers[("groups", "inner", "mlp", "fc")]
    assert nested.stack_shape == (2, 2)
    assert nested.virtual_paths[(1, 0)] == "groups.1.inner.0.mlp.fc"
    assert layers[("ens", "fc")].virtual_paths == {(0,): "ens.0.fc", (1,): "ens.1.fc"}
    head = layers[("head",)]
    assert head.stack_shape == () and head.is_output and not scanned.is_output
    assert trace.module_types[("layers", "mlp")] == "Inner"


def _mlp():
    module = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    x = jnp.ones((1, 4))
    return module, module.init(jax.random.key(0), x), x


def test_a_trace_is_kept_per_apply_function_shapes_and_sample_values():
    module, variables, x = _mlp()
    apply_fn = module.apply
    first = trace_layers(apply_fn, variables, (x,), {})
    assert sorted(first.layers) == [("layers_0",), ("layers_2",)]
    assert trace_layers(apply_fn, variables, (x,), {}) is first
    assert trace_layers(module.apply, jax.tree_util.tree_map(lambda v: v + 1, variables), (x,), {}) is first
    assert trace_layers(apply_fn, variables, (jnp.ones((2, 4)),), {}) is not first  # another input shape
    assert trace_layers(apply_fn, variables, (2 * x,), {}) is not first  # the model may branch on input values
    with_a_leaf = {"params": {**variables["params"], "extra": jnp.zeros(3)}}  # e.g. another adapter's leaves
    assert ("extra",) in trace_layers(apply_fn, with_a_leaf, (x,), {}).param_shapes
    assert trace_layers(lambda v, x: module.apply(v, x), variables, (x,), {}) is not first  # another function


def _apply_holding_an_array(module):
    """An apply function closing over an array, as an NNX view's closes over the model's weights."""
    held = jnp.zeros((64, 64))

    def apply_fn(variables, x):
        return module.apply(variables, x) + held[0, 0]

    return apply_fn, weakref.ref(held)


def test_a_kept_trace_lets_its_apply_function_and_what_it_holds_go():
    module, variables, x = _mlp()
    apply_fn, array = _apply_holding_an_array(module)
    trace_layers(apply_fn, variables, (x,), {})
    function = weakref.ref(apply_fn)
    del apply_fn
    gc.collect()
    assert function() is None and array() is None
