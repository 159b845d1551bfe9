"""BitFit through the functional core: bias deltas checked against the plain model with its biases changed by hand."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from toy_models import LAYERS, Transformer, sample_ids, unscanned_params

import jaxpeft
from jaxpeft.methods import bitfit

_CACHE: dict = {}


def _scanned(**options):
    """The scanned toy transformer with a BitFit adapter (built once per set of options)."""
    key = repr(sorted(options.items()))
    if key not in _CACHE:
        model = Transformer(scan=True)
        ids = sample_ids()
        if "base" not in _CACHE:
            _CACHE["base"] = model.init(jax.random.key(0), ids)
        base = _CACHE["base"]
        config = jaxpeft.BitFitConfig(**options)
        _CACHE[key] = model, ids, base, config, jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base,
                                                                     ids)
    return _CACHE[key]


def _random_deltas(variables, config, seed=3):
    mask = jaxpeft.trainable_mask(variables, config)
    trainable, frozen = jaxpeft.partition(variables, mask)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    return jaxpeft.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def _biases_moved_by_hand(variables):
    """The plain base variables with each selected layer's bias increased by its delta, written out leaf by leaf."""
    flat = jaxpeft.tree.flatten(variables["params"])
    by_hand = {}
    for path, leaf in flat.items():
        if "bitfit_bias" in path or "bitfit_active" in path:
            continue
        if path[-1] == "bias" and path[:-1] + ("bitfit_bias", "default") in flat:
            delta = np.array(flat[path[:-1] + ("bitfit_bias", "default")])
            active = np.asarray(flat[path[:-1] + ("bitfit_active", "default")])
            delta[active == 0] = 0
            leaf = np.asarray(leaf) + delta
        by_hand[path] = leaf
    return {"params": jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(by_hand))}


def test_docstring_example():
    result = doctest.testmod(bitfit, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_starts_exactly_equal_to_base_and_leaves_base_variables_alone():
    model, ids, base, config, variables = _scanned()
    assert jaxpeft.strip_adapters(variables) == base
    np.testing.assert_array_equal(jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids),
                                  model.apply(base, ids))


def test_every_biased_layer_is_selected_by_default_and_stacked():
    _, _, base, _, variables = _scanned()
    selected = {path[:-2] for path in jaxpeft.tree.flatten(variables["params"]) if path[-2] == "bitfit_bias"}
    biased = {path[:-1] for path in jaxpeft.tree.flatten(base["params"]) if path[-1] == "bias"}
    assert selected == biased  # Dense, DenseGeneral and LayerNorm
    block = variables["params"]["layer"]["block"]
    assert block["attention"]["query"]["bitfit_bias"]["default"].shape == (LAYERS, 2, 8)
    assert block["ln1"]["bitfit_bias"]["default"].shape == (LAYERS, 16)
    assert block["ln1"]["bitfit_bias"]["default"].dtype == jnp.float32


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_output_equals_the_base_model_with_biases_moved_by_hand(scan):
    model, ids, base, config, variables = _scanned()
    variables = _random_deltas(variables, config)
    if not scan:
        model, variables = Transformer(scan=False), unscanned_params(variables)
    expected = model.apply(_biases_moved_by_hand(variables), ids)
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, ids), expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(expected - model.apply(jaxpeft.strip_adapters(variables), ids)).max()) > 1e-2


def test_merge_equals_rewritten_apply_and_unmerge_restores():
    model, ids, base, config, variables = _scanned()
    variables = _random_deltas(variables, config)
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(model.apply(merged, ids), jaxpeft.rewrite(model.apply, config)(variables, ids),
                               rtol=1e-5, atol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    for path, leaf in jaxpeft.tree.flatten(variables).items():
        np.testing.assert_allclose(jaxpeft.tree.flatten(restored)[path], leaf, atol=1e-6, err_msg=str(path))


def test_training_changes_only_the_deltas_and_reduces_the_loss():
    model, ids, base, config, variables = _scanned()
    adapted = jaxpeft.rewrite(model.apply, config)
    mask = jaxpeft.trainable_mask(variables, config)
    bias_sizes = sum(int(np.prod(leaf.shape)) for path, leaf in jaxpeft.tree.flatten(base["params"]).items()
                     if path[-1] == "bias")
    assert jaxpeft.count_parameters(variables, mask).trainable == bias_sizes
    labels = jnp.array([0, 2])
    optimizer = jaxpeft.freeze(optax.adam(0.05), mask)

    def loss_fn(v):
        return optax.softmax_cross_entropy_with_integer_labels(adapted(v, ids), labels).mean()

    @jax.jit
    def step(v, state):
        loss, grads = jax.value_and_grad(loss_fn)(v)
        updates, state = optimizer.update(grads, state, v)
        return optax.apply_updates(v, updates), state, loss

    state, trained, losses = optimizer.init(variables), variables, []
    for _ in range(5):
        trained, state, loss = step(trained, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for path, old in jaxpeft.tree.flatten(variables).items():
        new = jaxpeft.tree.flatten(trained)[path]
        if path[-2] == "bitfit_bias":
            assert not np.array_equal(old, new), path
        else:
            np.testing.assert_array_equal(old, new, err_msg=str(path))


def test_a_pattern_selects_a_subset_and_part_of_a_stack():
    model, ids, base, config, variables = _scanned(target_modules=r".*layer\.[02]\.block\.(intermediate|ln2)")
    selected = {path[:-2] for path in jaxpeft.tree.flatten(variables["params"]) if path[-2] == "bitfit_bias"}
    assert selected == {("layer", "block", "intermediate"), ("layer", "block", "ln2")}
    np.testing.assert_array_equal(variables["params"]["layer"]["block"]["ln2"]["bitfit_active"]["default"], [1, 0, 1])
    variables = _random_deltas(variables, config)
    adapted = jaxpeft.rewrite(model.apply, config)
    np.testing.assert_allclose(adapted(variables, ids), model.apply(_biases_moved_by_hand(variables), ids),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda v: jnp.sum(adapted(v, ids) ** 2))(variables)
    grad = grads["params"]["layer"]["block"]["intermediate"]["bitfit_bias"]["default"]
    assert float(jnp.abs(grad[1]).max()) == 0 and float(jnp.abs(grad[0]).max()) > 0
    listed = _scanned(target_modules=["classifier", "ln1"])[4]
    assert {path[:-2] for path in jaxpeft.tree.flatten(listed["params"]) if path[-2] == "bitfit_bias"} == {
        ("classifier",), ("layer", "block", "ln1")}


def test_two_adapters_coexist():
    model, ids, base, config, variables = _scanned(target_modules=["classifier"])
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, variables, ids, adapter_name="other")
    variables = _random_deltas(variables, config)
    deltas = variables["params"]["classifier"]["bitfit_bias"]
    assert not np.array_equal(deltas["default"], deltas["other"])
    apply = jaxpeft.rewrite(model.apply, {"default": config, "other": config})
    plain = np.asarray(model.apply(base, ids))
    for name in ("default", "other"):
        np.testing.assert_allclose(apply(variables, ids, adapter_name=name), plain + np.asarray(deltas[name]),
                                   rtol=1e-5, atol=1e-5)


class _EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 2, 3), "btd,dnh->btnh", name="proj")(x)


@pytest.mark.parametrize("kind", ["dense_general", "conv", "einsum", "layer_norm"])
def test_other_layer_kinds_match_a_hand_computation(kind):
    key = jax.random.key(0)
    if kind == "dense_general":
        model, x = nn.DenseGeneral((2, 3), axis=(-2, -1), name="proj"), jax.random.normal(key, (2, 5, 4, 6))
    elif kind == "conv":
        model, x = nn.Conv(5, (3, 3), strides=2, name="proj"), jax.random.normal(key, (2, 8, 8, 3))
    elif kind == "einsum":
        model, x = _EinsumModel(), jax.random.normal(key, (2, 5, 4))
    else:
        model, x = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1)), jax.random.normal(key, (2, 4, 6))
    base = model.init(jax.random.key(1), x)
    config = jaxpeft.BitFitConfig()
    variables = _random_deltas(jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x), config)
    expected = model.apply(_biases_moved_by_hand(variables), x)
    np.testing.assert_allclose(jax.jit(jaxpeft.rewrite(model.apply, config))(variables, x), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(jaxpeft.merge(variables, config), x), expected, rtol=1e-5, atol=1e-5)


# ----- bad inputs -----

def test_unknown_option():
    with pytest.raises(jaxpeft.ConfigError, match="did you mean 'target_modules'"):
        jaxpeft.BitFitConfig(target_module=["q"])


NO_BIAS = "matched no module with its own 'bias' parameter; "


@pytest.mark.parametrize("targets,expected", [
    (["q_proj"], r"\['q_proj'\] " + NO_BIAS + "modules that exist: embed, layer.0.block"),
    (["embed"], r"\['embed'\] " + NO_BIAS + r"it matched 'embed' \(a Embed\)"),
    (["classifier", "attention"], r"\['attention'\] " + NO_BIAS),
    (r"nothing\..*", NO_BIAS),
])
def test_bad_targets(targets, expected):
    model = Transformer(scan=True)
    ids = sample_ids()
    base = _scanned()[2]
    with pytest.raises(jaxpeft.AdapterError, match=expected) as error:
        jaxpeft.init_adapters(jax.random.key(0), jaxpeft.BitFitConfig(target_modules=targets), model.apply, base, ids)
    assert "\n" not in str(error.value)


def test_layer_without_bias_is_refused():
    model = nn.Dense(3, use_bias=False)
    x = jnp.ones((1, 2))
    with pytest.raises(jaxpeft.AdapterError, match="this model has no biases for BitFit to train"):
        jaxpeft.init_adapters(jax.random.key(0), jaxpeft.BitFitConfig(), model.apply,
                              model.init(jax.random.key(1), x), x)
