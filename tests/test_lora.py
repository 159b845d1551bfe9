"""LoRA through the functional core, on an MLP and on a scanned + rematerialised DenseGeneral transformer."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from toy_models import LAYERS, MLP, Transformer, sample_ids, unscanned_params

import jaxpeft

ATTENTION = ["query", "key", "value", "output"]


def _scanned(target_modules=None, **options):
    model = Transformer(scan=True)
    ids = sample_ids()
    base = model.init(jax.random.key(0), ids)
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules or ATTENTION, **options)
    return model, ids, base, config, jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids)


def _mlp(**options):
    model = MLP()
    x = jax.random.normal(jax.random.key(2), (4, 6))
    base = model.init(jax.random.key(0), x)
    config = jaxpeft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"], **options)
    return model, x, base, config, jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, x)


class InitEqualsBaseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_transformer_starts_equal_to_base(self):
        model, ids, base, config, variables = _scanned()
        adapted = self.variant(jaxpeft.rewrite(model.apply, config))
        np.testing.assert_array_equal(adapted(variables, ids), model.apply(base, ids))

    @chex.variants(with_jit=True, without_jit=True)
    def test_mlp_starts_equal_to_base(self):
        model, x, base, config, variables = _mlp()
        adapted = self.variant(jaxpeft.rewrite(model.apply, config))
        np.testing.assert_array_equal(adapted(variables, x), model.apply(base, x))

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_b_changes_the_output(self):
        model, ids, base, config, variables = _scanned(init_lora_weights=False)
        adapted = self.variant(jaxpeft.rewrite(model.apply, config))
        assert float(jnp.abs(adapted(variables, ids) - model.apply(base, ids)).max()) > 1e-3

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_adapter_gives_exactly_the_base(self):
        model, ids, base, config, variables = _scanned(init_lora_weights=False)
        adapted = self.variant(jaxpeft.rewrite(model.apply, config))
        np.testing.assert_array_equal(adapted(variables, ids, adapter_name=None), model.apply(base, ids))


def test_hand_computation_for_one_dense_layer():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    base = model.init(jax.random.key(1), x)
    config = jaxpeft.LoraConfig(r=2, lora_alpha=3, target_modules=".*", init_lora_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    w, b = p["kernel"], p["bias"]
    a, bb = p["lora_A"]["default"], p["lora_B"]["default"]
    expected = x @ w + b + (3 / 2) * (np.asarray(x) @ a) @ bb
    got = jaxpeft.rewrite(model.apply, config)(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _hand_einsum_model():
    class EinsumModel(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((4, 2, 3), "btd,dnh->btnh", name="proj")(x)

    return EinsumModel()


@pytest.mark.parametrize("kind", ["dense_general", "embed", "conv", "einsum"])
def test_other_layer_kinds_match_a_hand_computation_and_merge(kind):
    key = jax.random.key(0)
    if kind == "dense_general":
        model, x = nn.DenseGeneral((2, 3), axis=(-2, -1), name="proj"), jax.random.normal(key, (2, 5, 4, 6))
    elif kind == "embed":
        model, x = nn.Embed(11, 6, name="proj"), jnp.array([[1, 3, 10], [0, 2, 2]])
    elif kind == "conv":
        model, x = nn.Conv(5, (3, 3), strides=2, name="proj"), jax.random.normal(key, (2, 8, 8, 3))
    else:
        model, x = _hand_einsum_model(), jax.random.normal(key, (2, 5, 4))
    base = model.init(jax.random.key(1), x)
    config = jaxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=".*", init_lora_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, x)
    params = variables["params"]["proj"] if "proj" in variables["params"] else variables["params"]
    a, b = np.asarray(params["lora_A"]["default"]), np.asarray(params["lora_B"]["default"])
    base_out = np.asarray(model.apply(base, x))
    xn = np.asarray(x)
    if kind == "dense_general":
        update = np.einsum("bsij,ijr,rpq->bspq", xn, a, b)
    elif kind == "embed":
        update = a[xn] @ b
    elif kind == "conv":
        window = nn.Conv(2, (3, 3), strides=2, use_bias=False)
        update = np.asarray(window.apply({"params": {"kernel": a}}, x)) @ b
    else:
        update = np.einsum("btd,dr,rnh->btnh", xn, a, b)
    np.testing.assert_allclose(adapted, base_out + 2.0 * update, rtol=1e-5, atol=1e-5)
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(model.apply(merged, x), adapted, rtol=1e-5, atol=1e-5)


class GradientAndFreezeTest(chex.TestCase):
    def test_gradients_exist_only_for_adapter_leaves(self):
        model, ids, base, config, variables = _scanned(init_lora_weights=False)
        adapted = jaxpeft.rewrite(model.apply, config)
        mask = jaxpeft.trainable_mask(variables, config)
        trainable, frozen = jaxpeft.partition(variables, mask)

        def loss(trainable):
            return jnp.mean(adapted(jaxpeft.combine(trainable, frozen), ids) ** 2)

        grads = jax.grad(loss)(trainable)
        flat = jaxpeft.tree.flatten(grads)
        trained = {path for path, g in flat.items() if g is not None}
        assert trained and all(("lora_A" in p or "lora_B" in p) for p in trained)
        assert all(float(jnp.abs(g).max()) > 0 for g in flat.values() if g is not None)
        full_grads = jax.grad(lambda v: jnp.mean(adapted(v, ids) ** 2))(variables)
        scaling_grad = full_grads["params"]["layer"]["block"]["attention"]["query"]["lora_scaling"]["default"]
        assert scaling_grad.shape == (LAYERS,)

    def test_freeze_keeps_frozen_leaves_bit_identical_given_the_full_tree(self):
        model, ids, base, config, variables = _scanned(init_lora_weights=False)
        adapted = jaxpeft.rewrite(model.apply, config)
        mask = jaxpeft.trainable_mask(variables, config)
        optimizer = jaxpeft.freeze(optax.adamw(1e-2, weight_decay=0.1), mask)
        state = optimizer.init(variables)

        @jax.jit
        def step(variables, state):
            grads = jax.grad(lambda v: jnp.mean(adapted(v, ids) ** 2))(variables)
            updates, state = optimizer.update(grads, state, variables)
            return optax.apply_updates(variables, updates), state

        new, _ = step(variables, state)
        flat_old, flat_new, flat_mask = (jaxpeft.tree.flatten(t) for t in (variables, new, mask))
        changed = 0
        for path, old in flat_old.items():
            if flat_mask[path]:
                changed += int(not np.array_equal(old, flat_new[path]))
            else:
                np.testing.assert_array_equal(old, flat_new[path], err_msg=str(path))
        assert changed == sum(flat_mask.values())

    def test_optax_masked_alone_would_not_freeze(self):
        params = {"w": jnp.ones(3)}
        masked = optax.masked(optax.sgd(1.0), {"w": False})
        updates, _ = masked.update({"w": jnp.ones(3)}, masked.init(params), params)
        assert float(jnp.abs(updates["w"]).sum()) > 0  # the footgun freeze() exists for
        tx = jaxpeft.freeze(optax.sgd(1.0), {"w": False})
        updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        np.testing.assert_array_equal(updates["w"], 0)


def test_merge_equals_rewritten_apply_and_unmerge_restores():
    model, ids, base, config, variables = _scanned(init_lora_weights=False, target_modules="all-linear")
    adapted = jaxpeft.rewrite(model.apply, config)(variables, ids)
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(model.apply(merged, ids), adapted, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(model.apply(merged, ids) - model.apply(base, ids)).max()) > 1e-3
    restored = jaxpeft.unmerge(merged, variables, config)
    chex.assert_trees_all_close(restored, variables, atol=1e-6)
    trainable, _ = jaxpeft.partition(variables, jaxpeft.trainable_mask(variables, config))
    with pytest.raises(jaxpeft.AdapterError, match="lacks lora_scaling"):
        jaxpeft.unmerge(merged, trainable, config)
    with pytest.raises(jaxpeft.AdapterError, match="not merged"):
        jaxpeft.unmerge(variables, variables, config)


def test_bf16_base_merges_in_float32():
    model = nn.Dense(64, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    x = jnp.ones((1, 64), jnp.bfloat16)
    base = model.init(jax.random.key(0), x)
    config = jaxpeft.LoraConfig(r=4, target_modules=".*", init_lora_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, x)
    assert variables["params"]["lora_A"]["default"].dtype == jnp.float32
    assert jaxpeft.rewrite(model.apply, config)(variables, x).dtype == jnp.bfloat16
    merged = jaxpeft.merge(variables, config)["params"]["kernel"]
    p = variables["params"]
    exact = np.asarray(p["kernel"], np.float32) + (8 / 4) * np.asarray(p["lora_A"]["default"]) @ np.asarray(
        p["lora_B"]["default"])
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(jnp.asarray(exact, jnp.bfloat16),
                                                                             np.float32))


@pytest.mark.parametrize("order", ["original_first", "rewritten_first"])
def test_original_apply_is_unaffected_by_the_rewritten_one(order):
    model, ids, base, config, variables = _scanned(init_lora_weights=False)
    original = jax.jit(model.apply)
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config))
    expected_base = Transformer(scan=True).apply(base, ids)
    if order == "original_first":
        first = original(variables, ids)
        second = adapted(variables, ids)
        np.testing.assert_array_equal(first, expected_base)
        assert float(jnp.abs(second - expected_base).max()) > 1e-3
    else:
        first = adapted(variables, ids)
        second = original(variables, ids)
        np.testing.assert_array_equal(second, expected_base)
        np.testing.assert_array_equal(model.apply(variables, ids), expected_base)
        assert float(jnp.abs(first - expected_base).max()) > 1e-3


def test_rewrite_refuses_a_jitted_apply():
    with pytest.raises(TypeError, match="un-jitted apply"):
        jaxpeft.rewrite(jax.jit(MLP().apply), jaxpeft.LoraConfig(target_modules=["fc1"]))


def test_scaling_rslora_rank_and_alpha_patterns():
    model, x, base, _, _ = _mlp()
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True,
                                rank_pattern={"fc2": 16}, alpha_pattern={"fc1": 2})
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, base, x)
    p = variables["params"]
    assert p["fc1"]["lora_A"]["default"].shape == (6, 4)
    assert p["fc2"]["lora_A"]["default"].shape == (12, 16)
    assert float(p["fc1"]["lora_scaling"]["default"]) == pytest.approx(2 / math.sqrt(4))
    assert float(p["fc2"]["lora_scaling"]["default"]) == pytest.approx(8 / math.sqrt(16))
    plain = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"])
    p = jaxpeft.init_adapters(jax.random.key(0), plain, model.apply, base, x)["params"]
    assert float(p["fc1"]["lora_scaling"]["default"]) == pytest.approx(8 / 4)


def test_init_distributions():
    model = nn.Dense(300)
    x = jnp.ones((1, 400))
    base = model.init(jax.random.key(0), x)

    def leaves(init):
        config = jaxpeft.LoraConfig(r=64, target_modules=".*", init_lora_weights=init)
        p = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, x)["params"]
        return np.asarray(p["lora_A"]["default"]), np.asarray(p["lora_B"]["default"])

    a, b = leaves(True)
    bound = 1 / math.sqrt(400)
    assert np.all(b == 0)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    a, b = leaves("gaussian")
    assert np.all(b == 0) and a.std() == pytest.approx(1 / 64, rel=0.05)
    a, b = leaves(False)
    assert np.abs(b).max() <= 1 / math.sqrt(64) and b.std() > 0.5 / math.sqrt(3 * 64)


def test_embedding_lora_starts_at_zero_update():
    model = nn.Embed(10, 4)
    ids = jnp.array([[1, 2]])
    base = model.init(jax.random.key(0), ids)
    config = jaxpeft.LoraConfig(r=2, target_modules=".*")
    p = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids)["params"]
    assert np.all(np.asarray(p["lora_A"]["default"]) == 0)
    assert np.asarray(p["lora_B"]["default"]).std() == pytest.approx(1.0, rel=0.6)


def test_scanned_adapters_are_stacked_and_layers_to_transform_selects_layers():
    model, ids, base, config, variables = _scanned(layers_to_transform=[0, 2], init_lora_weights=False)
    query = variables["params"]["layer"]["block"]["attention"]["query"]
    chex.assert_shape(query["lora_A"]["default"], (LAYERS, 16, 4))
    chex.assert_shape(query["lora_B"]["default"], (LAYERS, 4, 2, 8))
    np.testing.assert_array_equal(query["lora_scaling"]["default"], [2.0, 0.0, 2.0])
    assert np.all(np.asarray(query["lora_A"]["default"][1]) == 0)
    assert np.all(np.asarray(query["lora_B"]["default"][1]) == 0)
    assert np.abs(np.asarray(query["lora_B"]["default"][0])).max() > 0
    # The same adapter on the unscanned model (layers named layer.0, layer.1, ...) gives the same output,
    # and initialising it there puts adapters on layers 0 and 2 only.
    unscanned = Transformer(scan=False)
    np.testing.assert_allclose(jaxpeft.rewrite(unscanned.apply, config)(unscanned_params(variables), ids),
                               jaxpeft.rewrite(model.apply, config)(variables, ids), atol=1e-5, rtol=1e-5)
    fresh = jaxpeft.init_adapters(jax.random.key(1), config, unscanned.apply, unscanned.init(jax.random.key(0), ids),
                                  ids)
    adapted_layers = {i for i in range(LAYERS)
                      if "lora_A" in fresh["params"]["layer"][str(i)]["block"]["attention"]["query"]}
    assert adapted_layers == {0, 2}


def test_regex_targets_use_per_layer_paths_in_scanned_stacks():
    model, ids, base, config, variables = _scanned(target_modules=r"layer\.1\.block\.attention\.(query|value)")
    query = variables["params"]["layer"]["block"]["attention"]["query"]
    np.testing.assert_array_equal(query["lora_scaling"]["default"], [0.0, 2.0, 0.0])
    assert "lora_A" not in variables["params"]["layer"]["block"]["attention"]["key"]


def test_all_linear_skips_the_output_head_and_embeddings():
    model, ids, base, config, variables = _scanned(target_modules="all-linear")
    p = variables["params"]
    assert "lora_A" not in p["classifier"] and "lora_A" not in p["embed"]
    assert "lora_A" in p["layer"]["block"]["intermediate"] and "lora_A" in p["layer"]["block"]["attention"]["output"]


def test_exclude_modules():
    model, ids, base, config, variables = _scanned(target_modules="all-linear", exclude_modules=["intermediate"])
    assert "lora_A" not in variables["params"]["layer"]["block"]["intermediate"]
    assert "lora_A" in variables["params"]["layer"]["block"]["mlp_out"]


class DropoutTest(chex.TestCase):
    def test_dropout_uses_the_dropout_rng_and_is_off_when_deterministic(self):
        model, x, base, config, variables = _mlp(lora_dropout=0.5, init_lora_weights=False)
        adapted = jax.jit(jaxpeft.rewrite(model.apply, config))
        no_dropout = adapted(variables, x)
        one = adapted(variables, x, rngs={"dropout": jax.random.key(0)})
        again = adapted(variables, x, rngs={"dropout": jax.random.key(0)})
        other = adapted(variables, x, rngs={"dropout": jax.random.key(1)})
        np.testing.assert_array_equal(one, again)
        assert float(jnp.abs(one - other).max()) > 0
        assert float(jnp.abs(one - no_dropout).max()) > 0
        model_t, ids, _, config_t, variables_t = _scanned(lora_dropout=0.5, init_lora_weights=False)
        adapted_t = jaxpeft.rewrite(model_t.apply, config_t)
        np.testing.assert_array_equal(
            adapted_t(variables_t, ids, deterministic=True, rngs={"dropout": jax.random.key(0)}),
            adapted_t(variables_t, ids, deterministic=True))


def test_several_named_adapters_in_one_tree():
    model, x, base, config, variables = _mlp(init_lora_weights=False)
    other = jaxpeft.LoraConfig(r=2, target_modules=["out"], init_lora_weights=False)
    both = jaxpeft.init_adapters(jax.random.key(5), other, model.apply, variables, x, adapter_name="other")
    assert jaxpeft.adapter_names(both) == ["default", "other"]
    adapted = jax.jit(jaxpeft.rewrite(model.apply, {"default": config, "other": other}),
                      static_argnames="adapter_name")
    np.testing.assert_array_equal(adapted(both, x, adapter_name="default"),
                                  jaxpeft.rewrite(model.apply, config)(variables, x))
    only_other = jaxpeft.init_adapters(jax.random.key(5), other, model.apply, base, x, adapter_name="other")
    np.testing.assert_allclose(adapted(both, x, adapter_name="other"),
                               jaxpeft.rewrite(model.apply, {"other": other})(only_other, x), atol=1e-6)
    np.testing.assert_array_equal(adapted(both, x, adapter_name=None), model.apply(base, x))
    mask = jaxpeft.trainable_mask(both, other, adapter_name="other")
    trained = [p for p, m in jaxpeft.tree.flatten(mask).items() if m]
    assert trained and all("other" in p for p in trained)


def test_modules_to_save_trains_a_copy_and_merges_it():
    model, ids, base, _, _ = _scanned()
    config = jaxpeft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, ids)
    mask = jaxpeft.trainable_mask(variables, config)
    assert mask["params"]["classifier"]["modules_to_save"]["default"]["kernel"]
    assert not mask["params"]["classifier"]["kernel"]
    adapted = jaxpeft.rewrite(model.apply, config)
    grads = jax.grad(lambda v: adapted(v, ids).sum())(variables)
    assert float(jnp.abs(grads["params"]["classifier"]["modules_to_save"]["default"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["params"]["classifier"]["kernel"]).max()) == 0
    changed = jax.tree_util.tree_map(lambda x: x, variables)
    changed["params"]["classifier"]["modules_to_save"]["default"]["bias"] = jnp.ones(3)
    np.testing.assert_allclose(adapted(changed, ids), model.apply(base, ids) + 1, atol=1e-5)
    merged = jaxpeft.merge(changed, config)
    np.testing.assert_allclose(model.apply(merged, ids), adapted(changed, ids), atol=1e-5)
    np.testing.assert_array_equal(merged["params"]["classifier"]["bias"], np.ones(3))
    chex.assert_trees_all_close(jaxpeft.unmerge(merged, changed, config), changed, atol=1e-6)
    np.testing.assert_array_equal(adapted(changed, ids, adapter_name=None), model.apply(base, ids))


@pytest.mark.parametrize("bias,expected", [("none", set()), ("all", {"fc1", "fc2", "out"}),
                                           ("lora_only", {"fc1", "fc2"})])
def test_bias_options(bias, expected):
    _, _, _, config, variables = _mlp(bias=bias)
    mask = jaxpeft.trainable_mask(variables, config)
    assert {name for name in ("fc1", "fc2", "out") if mask["params"][name]["bias"]} == expected


def test_count_parameters():
    _, _, base, config, variables = _mlp()
    count = jaxpeft.count_parameters(variables, jaxpeft.trainable_mask(variables, config))
    lora = (6 * 3 + 3 * 12) + (12 * 3 + 3 * 12)
    base_total = (6 * 12 + 12) + (12 * 12 + 12) + (12 * 3 + 3)
    assert count == (lora, base_total + lora)
    assert str(count) == (f"trainable params: {lora:,d} || all params: {base_total + lora:,d} || "
                          f"trainable%: {100 * lora / (base_total + lora):.4f}")


def test_rewritten_apply_vmaps():
    model, x, base, config, variables = _mlp(init_lora_weights=False)
    adapted = jaxpeft.rewrite(model.apply, config)
    per_example = jax.vmap(lambda row: adapted(variables, row[None])[0])(x)
    np.testing.assert_allclose(per_example, adapted(variables, x), atol=1e-6)


class TrainingTest(parameterized.TestCase):
    def test_a_lora_step_on_the_trainable_half_reduces_the_loss(self):
        model, ids, base, config, variables = _scanned(target_modules="all-linear")
        adapted = jaxpeft.rewrite(model.apply, config)
        mask = jaxpeft.trainable_mask(variables, config)
        trainable, frozen = jaxpeft.partition(variables, mask)
        labels = jnp.array([0, 2])
        optimizer = optax.adam(1e-2)
        state = optimizer.init(trainable)

        @jax.jit
        def step(trainable, state):
            def loss_fn(trainable):
                logits = adapted(jaxpeft.combine(trainable, frozen), ids)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, state = optimizer.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        losses = []
        for _ in range(20):
            trainable, state, loss = step(trainable, state)
            losses.append(float(loss))
        assert losses[-1] < 0.5 * losses[0]
