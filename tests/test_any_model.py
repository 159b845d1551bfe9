"""Layer methods on models jaxpeft did not write: a library's own einsum module (equation at call time, multi-axis
kernels), raw ``self.param`` kernels in ``jnp.einsum`` and ``@``, experts sliced per expert, under ``nn.scan`` and
``nn.remat``. LoRA through ``target_modules`` (A and B follow each contraction) and ``target_parameters`` (the
parameter itself changes), DoRA, IA3 on outputs and on feed-forward inputs. Each case: identity at init, a real
change, gradients to every adapter leaf, a frozen base that stays bit-identical, merge equal to the rewritten apply,
unmerge restoring the base. BitFit trains the raw ``bias`` of a feed-forward block, bottleneck adapters add to the
outputs of the einsum module and the feed-forward block."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from third_party_models import Transformer

import jaxpeft
from jaxpeft.tree import flatten

TOKENS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], jnp.int32)
MODELS = {
    "plain": Transformer(),
    "scanned": Transformer(scan=True),
    "moe_scanned_remat": Transformer(moe=True, scan=True, remat=True),
}
TARGETS = {
    "plain": {"modules": ["q_einsum", "kv_einsum", "attn_vec_einsum", "mlp"],
              "parameters": ["mlp.gating_einsum", "mlp.linear", "embedding"]},
    "scanned": {"modules": ["q_einsum", "kv_einsum", "attn_vec_einsum", "mlp"],
                "parameters": ["attn.kv_einsum.w", "mlp.linear"]},
    "moe_scanned_remat": {"modules": ["attn_vec_einsum", "mlp"], "parameters": ["mlp.w_in", "mlp.w_out"]},
}
_BASES: dict = {}


def base_variables(model, tokens) -> dict:
    """``model.init`` on ``tokens``, jitted, once per model and input shape (the tests never change it)."""
    key = (id(model), tokens.shape)
    if key not in _BASES:
        _BASES[key] = jax.jit(model.init)(jax.random.key(0), tokens)
    return _BASES[key]


METHODS = ("lora", "lora_parameters", "dora", "ia3", "ia3_feedforward", "bitfit", "bottleneck")
CASES = [("plain", "lora"), ("plain", "lora_parameters"), *[("scanned", method) for method in METHODS],
         ("moe_scanned_remat", "lora"), ("moe_scanned_remat", "lora_parameters"), ("moe_scanned_remat", "dora")]


def lora_config(model: str, kind: str, **options) -> jaxpeft.LoraConfig:
    return jaxpeft.LoraConfig(r=2, lora_alpha=4, **{f"target_{kind}": TARGETS[model][kind]}, **options)


def method_config(model: str, method: str, trained: bool):
    """The config of ``method`` on ``model``; ``trained``: random leaves where a fresh adapter would be the
    identity."""
    if method == "bitfit":
        return jaxpeft.BitFitConfig()  # every module with its own bias: the feed-forward blocks
    if method == "bottleneck":
        return jaxpeft.AdapterConfig(target_modules=["attn_vec_einsum", "mlp"], reduction_factor=4,
                                     init_weights=not trained)
    if method.startswith("ia3"):
        feedforward = ["mlp"] if method == "ia3_feedforward" else []
        return jaxpeft.IA3Config(target_modules=TARGETS[model]["modules"], feedforward_modules=feedforward,
                                 init_ia3_weights=not trained)
    kind = "parameters" if method == "lora_parameters" else "modules"
    return lora_config(model, kind, use_dora=method == "dora", init_lora_weights=not trained)


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request):
    """The model, its base variables, an adapter with random leaves, the rewritten apply (jitted), the config and
    the method's name."""
    name, method = request.param
    model = MODELS[name]
    base = base_variables(model, TOKENS)
    config = method_config(name, method, trained=True)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, TOKENS)
    if method == "bitfit":  # BitFit always starts at 0: a trained delta
        params = variables["params"]["layers"]["mlp"]
        params["bitfit_bias"]["default"] = jax.random.normal(jax.random.key(3), params["bitfit_bias"]["default"].shape)
    return model, base, variables, jax.jit(jaxpeft.rewrite(model.apply, config)), config, method


def adapter_leaves(variables, config) -> dict:
    mask = flatten(jaxpeft.trainable_mask(variables, config)["params"])
    return {path: leaf for path, leaf in flatten(variables["params"]).items() if mask[path]}


def test_the_adapters_follow_the_models_own_parameters(case):
    model, _, variables, _, config, method = case
    leaves = adapter_leaves(variables, config)
    if method in ("bitfit", "bottleneck"):  # leaves of the module, beside its own parameters
        modules = {("mlp",)} if method == "bitfit" else {("mlp",), ("attn", "attn_vec_einsum")}
        assert leaves and {path[1:-2] for path in leaves} == modules
        return
    slot = "target_parameters" if method == "lora_parameters" else "own_params"
    assert leaves and all(slot in path for path in leaves)
    if model.moe and method == "lora_parameters":  # one A and B per expert: the experts axis is kept
        a = variables["params"]["layers"]["mlp"][slot]["w_in"]["lora_A"]["default"]
        assert a.shape == (2, 4, 16, 1, 2)  # (layers, experts, d_in, 1: output axis, rank)


def test_identity_at_init_and_a_change_once_trained(case):
    model, base, variables, apply, config, method = case
    name = next(key for key, value in MODELS.items() if value is model)
    fresh = jaxpeft.init_adapters(jax.random.key(1), method_config(name, method, trained=False), model.apply, base,
                                  TOKENS)
    expected = model.apply(base, TOKENS)
    np.testing.assert_allclose(apply(fresh, TOKENS), expected, atol=1e-5)  # B = 0: the base model
    assert float(jnp.abs(apply(variables, TOKENS) - expected).max()) > 1e-2


def test_gradients_reach_every_adapter_leaf_and_a_frozen_base_stays_bit_identical(case):
    model, _, variables, apply, config, _ = case
    mask = jaxpeft.trainable_mask(variables, config)
    trainable, frozen = jaxpeft.partition(variables, mask)

    def loss(trainable):
        return jnp.mean(apply(jaxpeft.combine(trainable, frozen), TOKENS) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    trained = adapter_leaves(variables, config)
    adapter_grads = {path: g for path, g in flatten(grads["params"]).items() if path in trained}
    assert adapter_grads and all(float(jnp.abs(g).max()) > 0 for g in adapter_grads.values())
    assert not [path for path, g in flatten(grads["params"]).items() if g is not None and path not in adapter_grads]

    optimizer = jaxpeft.freeze(optax.adam(0.1), mask)
    state = optimizer.init(variables)
    every_leaf_pushed = jax.tree_util.tree_map(jnp.ones_like, variables)  # a gradient for the whole tree
    updates, _ = optimizer.update(every_leaf_pushed, state, variables)
    stepped = optax.apply_updates(variables, updates)
    for path, leaf in flatten(variables["params"]).items():
        changed = not np.array_equal(np.asarray(stepped_leaf := flatten(stepped["params"])[path]), np.asarray(leaf))
        assert changed == (path in adapter_grads), (path, stepped_leaf.shape)


def test_merge_equals_the_rewritten_apply_and_unmerge_restores_the_base(case):
    model, base, variables, apply, config, method = case
    if method == "bottleneck":  # non-linear: nothing to merge into
        with pytest.raises(jaxpeft.AdapterError, match="cannot be merged"):
            jaxpeft.merge(variables, config)
        return
    merged = jaxpeft.merge(variables, config)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    np.testing.assert_allclose(model.apply(merged, TOKENS), apply(variables, TOKENS), atol=1e-5)
    restored = jaxpeft.unmerge(merged, variables, config)
    for path, leaf in flatten(variables["params"]).items():
        np.testing.assert_allclose(flatten(restored["params"])[path], leaf, atol=2e-6)


def test_a_mixed_batch_runs_each_row_with_its_own_adapter():
    """Row 0 runs adapter "b" (target_parameters, the embedding among them: held by the model's top module, around
    every other adapter), row 1 "a" (LoRA following the einsum modules' and MLP's parameters), row 2 the base."""
    model = MODELS["plain"]
    tokens = jnp.concatenate([TOKENS, TOKENS[:1] + 20])
    base = base_variables(model, tokens)
    configs = {"a": jaxpeft.LoraConfig(r=2, target_modules=["q_einsum", "attn_vec_einsum", "mlp"],
                                       init_lora_weights=False),
               "b": lora_config("plain", "parameters", init_lora_weights=False)}
    variables = base
    for i, (name, config) in enumerate(configs.items()):
        variables = jaxpeft.init_adapters(jax.random.key(i + 1), config, model.apply, variables, tokens,
                                          adapter_name=name)
    apply = jaxpeft.rewrite(model.apply, configs)
    names = ["b", "a", "__base__"]
    mixed = jax.jit(apply)(variables, tokens, adapter_name=jaxpeft.AdapterMix.of(names))
    for row, name in enumerate(names):
        expected = model.apply(base, tokens) if name == "__base__" else apply(variables, tokens, adapter_name=name)
        np.testing.assert_allclose(mixed[row], expected[row], atol=1e-5)


def test_a_mixed_batch_of_ia3_bitfit_and_bottleneck_adapters_on_custom_modules():
    model = MODELS["plain"]
    tokens = jnp.concatenate([TOKENS, TOKENS + 20])
    base = base_variables(model, tokens)
    configs = {"ia3": jaxpeft.IA3Config(target_modules=["q_einsum", "mlp"], feedforward_modules=["mlp"],
                                        init_ia3_weights=False),
               "bitfit": jaxpeft.BitFitConfig(),
               "bottleneck": jaxpeft.AdapterConfig(target_modules=["attn_vec_einsum", "mlp"], reduction_factor=4,
                                                   init_weights=False)}
    variables = base
    for i, (name, config) in enumerate(configs.items()):
        variables = jaxpeft.init_adapters(jax.random.key(i + 1), config, model.apply, variables, tokens,
                                          adapter_name=name)
    variables["params"]["layers_0"]["mlp"]["bitfit_bias"]["bitfit"] = jnp.ones(16)  # a trained bias
    apply = jaxpeft.rewrite(model.apply, configs)
    names = ["bottleneck", "__base__", "ia3", "bitfit"]
    mixed = jax.jit(apply)(variables, tokens, adapter_name=jaxpeft.AdapterMix.of(names))
    plain = model.apply(base, tokens)
    for row, name in enumerate(names):
        expected = plain if name == "__base__" else apply(variables, tokens, adapter_name=name)
        np.testing.assert_allclose(mixed[row], expected[row], atol=1e-5)
        assert name == "__base__" or float(jnp.abs(expected[row] - plain[row]).max()) > 1e-2


def test_a_mixed_batch_refuses_a_module_whose_output_does_not_lead_with_the_batch():
    model = MODELS["plain"]  # kv_einsum returns (k/v, batch, ...)
    tokens = jnp.concatenate([TOKENS, TOKENS[:1]])
    base = base_variables(model, tokens)
    config = jaxpeft.LoraConfig(r=2, target_modules=["kv_einsum"])
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, tokens)
    with pytest.raises(jaxpeft.AdapterError, match=r"the batch on axis 0 of every adapted module's output; got an "
                                                   r"output shaped \(2, 3, 6, 2, 8\) for a batch of 3"):
        jaxpeft.rewrite(model.apply, config)(variables, tokens, adapter_name=jaxpeft.AdapterMix.of(
            ["default", "__base__", "default"]))


# ----- errors name what exists and what to do


class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones, (x.shape[-1], x.shape[-1]))[0]


class AddedToo(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (x.shape[-1], x.shape[-1]))
        return x @ w + w[0]


class Convolved(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.1), (3, x.shape[-1], 4))
        return jax.lax.conv_general_dilated(x, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Scaled(name="scaled")(x)
        x = AddedToo(name="added")(x)
        x = Convolved(name="conv")(x)
        return x + self.param("bias", nn.initializers.zeros, (4,))


@pytest.mark.parametrize("options, message", [
    ({"target_modules": ["scaled"]}, "target_modules matched 'scaled', which multiplies none of its own parameters "
                                     "with an input (it uses scale (in mul)); adapt a parameter with "
                                     "target_parameters=['scaled.<parameter>'] instead"),
    ({"target_modules": ["added"]}, "LoRA cannot follow parameter 'w' of 'added': the module also uses it in add; "
                                    "adapt it as a whole with target_parameters=['added.w'] or exclude the module"),
    ({"target_modules": ["conv"]}, "LoRA cannot follow parameter 'kernel' of 'conv', which meets the input in "
                                   "conv_general_dilated; adapt it as a whole with target_parameters=['conv.kernel'] "
                                   "instead"),
    ({"target_modules": ["nothing"]}, "target_modules=['nothing'] matched no layer; modules that exist: scaled, "
                                      "added, conv"),
    ({"target_parameters": ["bias"]}, "target_parameters=['bias'] matched no parameter of two or more axes; "
                                      "parameters that exist: scaled.scale, added.w, conv.kernel"),
])
def test_what_lora_cannot_follow_is_a_one_line_error_that_points_to_target_parameters(options, message):
    model, x = Odd(), jnp.ones((1, 5, 4))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(jaxpeft.AdapterError) as raised:
        jaxpeft.init_adapters(jax.random.key(1), jaxpeft.LoraConfig(r=2, **options), model.apply, variables, x)
    assert str(raised.value) == message


@pytest.mark.parametrize("parameters", [["scaled.scale"], ["added.w"], ["conv.kernel"]])
def test_target_parameters_adapt_any_use_of_a_parameter(parameters):
    model, x = Odd(), jax.random.normal(jax.random.key(2), (1, 5, 4))
    base = model.init(jax.random.key(0), x)
    config = jaxpeft.LoraConfig(r=2, target_parameters=parameters, init_lora_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, x)
    out = jaxpeft.rewrite(model.apply, config)(variables, x)
    assert float(jnp.abs(out - model.apply(base, x)).max()) > 1e-3
    np.testing.assert_allclose(model.apply(jaxpeft.merge(variables, config), x), out, atol=1e-5)


@pytest.mark.parametrize("model_name, options, slot, parameter", [
    ("moe_scanned_remat", {"target_parameters": ["mlp.w_in"]}, "target_parameters", ("mlp", "w_in")),
    ("scanned", {"target_modules": ["kv_einsum"]}, "own_params", ("attn", "kv_einsum", "w")),
])
def test_pissa_moves_each_matrix_top_singular_directions_into_the_adapter(model_name, options, slot, parameter):
    """PiSSA on a parameter: one SVD per layer and per batch entry (expert), over its input axes by its output axes,
    checked against numpy's SVD; the model's output is unchanged at init."""
    model = MODELS[model_name]
    base = base_variables(model, TOKENS)
    config = jaxpeft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", **options)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, TOKENS)
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, TOKENS), model.apply(base, TOKENS),
                               atol=1e-4)
    module = variables["params"]["layers"]
    for key in parameter[:-1]:
        module = module[key]
    leaves = module[slot][parameter[-1]]
    a, b = np.asarray(leaves["lora_A"]["default"]), np.asarray(leaves["lora_B"]["default"])
    original = np.asarray(flatten(base["params"])[("layers",) + parameter])
    if model_name == "scanned":  # (layers, k/v, kv_heads, d, head_dim): d is contracted, the rest kept
        assert a.shape == (2, 1, 1, 16, 1, 2) and b.shape == (2, 2, 2, 1, 8, 2)
        entries = [(w, fa, fb) for w, fa, fb in zip(*(np.moveaxis(t, 3, 1) for t in (original, a, b)), strict=True)]
    else:  # (layers, experts, d, hidden): one matrix per layer and expert
        entries = [(original[i, e], a[i, e], b[i, e]) for i in range(2) for e in range(4)]
    for weight, fa, fb in entries:
        matrix = weight.reshape(weight.shape[0], -1)
        update = 2.0 * fa.reshape(matrix.shape[0], 2) @ fb.reshape(-1, 2).T  # scaling alpha / r = 2
        u, s, vt = np.linalg.svd(matrix)
        np.testing.assert_allclose(update, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


def test_all_linear_takes_every_multiplied_parameter_but_not_the_gathered_and_tied_embedding():
    model = MODELS["moe_scanned_remat"]
    base = base_variables(model, TOKENS)
    config = jaxpeft.LoraConfig(r=2, target_modules="all-linear")
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, base, TOKENS)
    adapted = {path[1:-2] for path in adapter_leaves(variables, config)}
    assert adapted == {("attn", name, "own_params", "w") for name in ("q_einsum", "kv_einsum", "attn_vec_einsum")} | {
        ("mlp", "own_params", name) for name in ("router", "w_in", "w_out")}
