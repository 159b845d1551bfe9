"""Layer discovery: paths, stacking under nn.scan / nn.vmap / nn.remat, per-layer Hugging Face style paths."""

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
