"""Bottleneck adapters: hand computations, torch models with hand-written adapter hooks, training, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from toy_models import HIDDEN, LAYERS, Transformer, sample_ids, unscanned_params

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.config import ConfigError
from jaxpeft.methods import bottleneck
from jaxpeft.methods.bottleneck import AdapterConfig
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification
from jaxpeft.tree import flatten

IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
KEYS = bottleneck.TRAINABLE_KEYS

FAMILIES = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), transformers.GPT2LMHeadModel, AutoModelForCausalLM),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3),
             transformers.BertForSequenceClassification, AutoModelForSequenceClassification),
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
                   transformers.DistilBertForSequenceClassification, AutoModelForSequenceClassification),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), transformers.LlamaForCausalLM, AutoModelForCausalLM),
}
# The torch modules whose input a parallel adapter reads, as (output projection ending, input module ending).
TORCH_PARALLEL_INPUTS = {"attn.c_proj": "attn", "mlp.c_proj": "mlp", "self_attn.o_proj": "self_attn",
                         "mlp.down_proj": "mlp", "attention.output.dense": "attention",
                         "output.dense": "intermediate", "attention.out_lin": "attention", "ffn.lin2": "ffn"}
TORCH_ACTIVATIONS = {"relu": torch.relu, "swish": torch.nn.functional.silu}


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """``{family: (torch model in eval mode, folder of its checkpoint)}``, built once."""
    built = {}
    for family, (make_config, torch_class, _) in FAMILIES.items():
        torch.manual_seed(0)
        config = make_config()
        config._attn_implementation = "eager"
        folder = tmp_path_factory.mktemp(family)
        torch_class(config).save_pretrained(folder)
        built[family] = (torch_class.from_pretrained(folder, attn_implementation="eager").eval(), folder)
    return built


def _leaf(params, path, key, adapter="default"):
    node = params["params"]
    for part in path:
        node = node[part]
    return np.asarray(node[key][adapter])


def _torch_logits_with_hooks(torch_model, adapters, config):
    """The torch model's logits with adapters added by forward hooks: an independent hand-written reference.

    ``adapters`` is ``{torch module name: (down kernel, down bias, up kernel, up bias, scaling)}``.
    """
    modules = dict(torch_model.named_modules())
    act = TORCH_ACTIVATIONS[config.non_linearity]
    handles, sub_layer_inputs = [], {}

    def adapter(x, weights):
        down_kernel, down_bias, up_kernel, up_bias, scaling = (torch.from_numpy(np.array(w)) for w in weights)
        return scaling * (act(x @ down_kernel + down_bias) @ up_kernel + up_bias)

    for name, weights in adapters.items():
        if config.is_parallel:
            ending = max((e for e in TORCH_PARALLEL_INPUTS if name.endswith("." + e)), key=len)
            source = name[:-len(ending)] + TORCH_PARALLEL_INPUTS[ending]

            def capture(module, args, kwargs, source=source):
                sub_layer_inputs[source] = args[0] if args else kwargs["hidden_states"]

            handles.append(modules[source].register_forward_pre_hook(capture, with_kwargs=True))

            def add(module, args, output, weights=weights, source=source):
                return output + adapter(sub_layer_inputs[source], weights)
        else:
            def add(module, args, output, weights=weights):
                return output + adapter(output, weights)
        handles.append(modules[name].register_forward_hook(add))
    try:
        with torch.no_grad():
            return torch_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    finally:
        for handle in handles:
            handle.remove()


def _adapters_by_hf_name(model):
    """The PeftModel's adapter weights per adapted layer, under the Hugging Face module name."""
    trace = trace_layers(model.base_model.apply_fn, model.params, (IDS, MASK), {})
    found = {}
    for path, layer in trace.layers.items():
        node = model.params["params"]
        for part in path:
            node = node[part]
        if bottleneck.SCALING_KEY not in node:
            continue
        for index, name in layer.virtual_paths.items():
            weights = tuple(np.asarray(node[key]["default"])[index] for key in KEYS + (bottleneck.SCALING_KEY,))
            if weights[-1] != 0:
                found[name] = weights
    return found


EXPECTED_POINTS = {
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    "distilbert": ("distilbert.transformer.layer.{}.attention.out_lin", "distilbert.transformer.layer.{}.ffn.lin2"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
}


def _zero_up_projections(params):
    flat = flatten(params)
    return jaxpeft.tree.unflatten_like({path: np.zeros_like(leaf) if path[-2] in KEYS[2:] else leaf
                                       for path, leaf in flat.items()}, params)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_matches_the_torch_model_with_hand_written_adapter_hooks(torch_models, family):
    torch_model, folder = torch_models[family]
    attention, feedforward = EXPECTED_POINTS[family]
    for scan_layers, presets in ((True, ("houlsby", "pfeiffer", "parallel")), (False, ("houlsby",))):
        base = FAMILIES[family][2].from_pretrained(folder, scan_layers=scan_layers)
        if scan_layers:
            base_logits = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
            np.testing.assert_allclose(base_logits, _torch_logits_with_hooks(torch_model, {}, AdapterConfig()),
                                       atol=1e-5)
        for preset in presets:
            config = AdapterConfig(preset=preset, reduction_factor=4, init_weights=False)
            model = jaxpeft.get_peft_model(base, config)
            adapters = _adapters_by_hf_name(model)
            expected = {feedforward.format(i) for i in range(2)}
            if preset == "houlsby":
                expected |= {attention.format(i) for i in range(2)}
            assert set(adapters) == expected, preset
            logits = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
            reference = _torch_logits_with_hooks(torch_model, adapters, config)
            assert np.abs(reference - base_logits).max() > 1e-3, preset  # the adapters do change the output
            np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=2e-5, err_msg=f"{preset} {scan_layers}")
            if scan_layers:
                model.params = _zero_up_projections(model.params)  # what init makes: the base model's outputs
                np.testing.assert_allclose(model(input_ids=IDS, attention_mask=MASK).logits, base_logits, rtol=0,
                                           atol=1e-6, err_msg=preset)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_tutorial_config_works_on_every_family_and_starts_with_zero_up_projections(torch_models, family):
    base = FAMILIES[family][2].from_pretrained(torch_models[family][1], scan_layers=True)
    model = jaxpeft.get_peft_model(base, AdapterConfig(reduction_factor=2, non_linearity="relu"))
    leaves = [(path[-2], np.asarray(leaf)) for path, leaf in flatten(model.params).items() if path[-2] in KEYS]
    assert len(leaves) == 2 * len(KEYS)  # attention and ffn points, stacked over the layers
    assert all(not np.any(leaf) for key, leaf in leaves if key in ("adapter_up_kernel", "adapter_up_bias"))
    assert all(np.all(leaf[:, 0] != leaf[:, 1]) for key, leaf in leaves if key == "adapter_down_kernel")
    count = jaxpeft.count_parameters(model.params, model.trainable_mask)
    # a classifier trains its head too (task SEQ_CLS, from the model): pre_classifier and classifier, or classifier
    heads = sum(np.size(leaf) for path, leaf in flatten(base.params).items()
                if path[1] in ("pre_classifier", "classifier", "score"))
    assert count.trainable == 2 * 2 * (32 * 16 + 16 + 16 * 32 + 32) + heads  # layers x (attention, ffn) x adapter


def test_training_changes_only_the_adapter_leaves_and_disable_adapter_gives_the_base(torch_models):
    base = AutoModelForSequenceClassification.from_pretrained(torch_models["distilbert"][1], scan_layers=True)
    model = jaxpeft.get_peft_model(base, AdapterConfig(reduction_factor=2, non_linearity="relu"))
    before = model.params
    tx = jaxpeft.freeze(optax.adam(1e-2), model.trainable_mask)
    apply_fn = model.apply_fn

    def loss(params):
        logits = apply_fn(params, jnp.asarray(IDS), jnp.asarray(MASK)).logits
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 1])

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    base_logits = base(input_ids=IDS, attention_mask=MASK).logits
    np.testing.assert_allclose(model(input_ids=IDS, attention_mask=MASK).logits, base_logits, rtol=0, atol=1e-6)
    params, state = before, tx.init(before)
    for _ in range(2):  # the down projection gets a gradient once the up projection is no longer zero
        params, state = step(params, state)
    changed = {path for path, leaf in flatten(params).items()
               if not np.array_equal(leaf, flatten(before)[path])}
    adapter_changes = {path for path in changed if "modules_to_save" not in path}  # the head trains too
    assert {path[-2] for path in adapter_changes} == set(KEYS)
    assert len(adapter_changes) == 2 * len(KEYS)  # attention and ffn, stacked over the layers
    model.params = params
    assert float(jnp.abs(model(input_ids=IDS, attention_mask=MASK).logits - base_logits).max()) > 1e-4
    with model.disable_adapter():
        np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, base_logits)
    with pytest.raises(jaxpeft.AdapterError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(jaxpeft.AdapterError, match="cannot be merged"):
        jaxpeft.merge(params, model.peft_config["default"])


def test_modules_to_save_for_a_classifier(torch_models):
    base = AutoModelForSequenceClassification.from_pretrained(torch_models["distilbert"][1])
    model = jaxpeft.get_peft_model(base, AdapterConfig(preset="pfeiffer", reduction_factor=2, task_type="SEQ_CLS"))
    assert model.peft_config["default"].modules_to_save == ["classifier"]
    trained = {path for path, trains in flatten(model.trainable_mask).items() if trains}
    assert ("params", "classifier", "modules_to_save", "default", "kernel") in trained
    count = jaxpeft.count_parameters(model.params, model.trainable_mask)
    # "classifier" selects pre_classifier too (HF PEFT matches name suffixes)
    assert count.trainable == 2 * (32 * 16 + 16 + 16 * 32 + 32) + (32 * 2 + 2) + (32 * 32 + 32)


# ----- a user model: hand computation -----

class UserBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(8, name="attn_out")(x)
        return x + nn.Dense(8, name="ffn_out")(jnp.tanh(nn.Dense(16, name="ffn_in")(x)))


def _np_activation(name):
    erf = np.vectorize(math.erf)
    return {
        "relu": lambda x: np.maximum(x, 0),
        "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
        "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
        "silu": lambda x: x / (1 + np.exp(-x)),
        "swish": lambda x: x / (1 + np.exp(-x)),
        "tanh": np.tanh,
    }[name]


def _user_model_by_hand(variables, x, config):
    """The user block with its adapters, in float64 numpy."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    act = _np_activation(config.non_linearity)

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name]["bias"]

    def adapter(name, h):
        if "adapter_down_kernel" not in p[name]:
            return 0.0
        w = {key: p[name][key]["default"] for key in KEYS + (bottleneck.SCALING_KEY,)}
        return w["adapter_scaling"] * (act(h @ w["adapter_down_kernel"] + w["adapter_down_bias"])
                                       @ w["adapter_up_kernel"] + w["adapter_up_bias"])

    x = np.asarray(x, np.float64)
    attention = dense("attn_out", x)
    x1 = x + attention + adapter("attn_out", x if config.is_parallel else attention)
    ffn = dense("ffn_out", np.tanh(dense("ffn_in", x1)))
    return x1 + ffn + adapter("ffn_out", x1 if config.is_parallel else ffn)


@pytest.mark.parametrize("options", [
    dict(non_linearity="relu"), dict(non_linearity="gelu"), dict(non_linearity="gelu_new"),
    dict(non_linearity="silu"), dict(non_linearity="swish", scaling=0.5), dict(non_linearity="tanh"),
    dict(preset="pfeiffer"), dict(preset="parallel", parallel_inputs={"ffn_out": "ffn_in"}),
    dict(preset="houlsby", is_parallel=True, parallel_inputs={"ffn_out": "ffn_in"}),
], ids=lambda o: "-".join(f"{v}" for v in o.values() if not isinstance(v, dict)))
def test_user_model_matches_a_hand_computation(options):
    model, x = UserBlock(), jax.random.normal(jax.random.key(0), (3, 8))
    config = AdapterConfig(**{"reduction_factor": 2, "attention_modules": ["attn_out"],
                              "feedforward_modules": ["ffn_out"], "init_weights": False, **options})
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, model.init(jax.random.key(2), x), x)
    assert _leaf(variables, ("ffn_out",), "adapter_down_kernel").shape == (8, 4)
    assert _leaf(variables, ("ffn_out",), "adapter_up_kernel").shape == (4, 8)
    assert ("adapter_down_kernel" in variables["params"]["attn_out"]) == config.mh_adapter
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, x)
    expected = _user_model_by_hand(variables, x, config)
    assert np.abs(expected - np.asarray(model.apply(variables, x), np.float64)).max() > 1e-3
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)


def test_target_modules_and_dropout_on_a_user_model():
    model, x = UserBlock(), jax.random.normal(jax.random.key(0), (3, 8))
    config = AdapterConfig(target_modules=["ffn_in"], reduction_factor=4, init_weights=False, dropout=0.5)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, model.apply, model.init(jax.random.key(2), x), x)
    assert set(variables["params"]) == {"attn_out", "ffn_in", "ffn_out"}
    assert _leaf(variables, ("ffn_in",), "adapter_down_kernel").shape == (16, 4)
    assert "adapter_down_kernel" not in variables["params"]["ffn_out"]
    adapted = jaxpeft.rewrite(model.apply, config)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    x1 = np.asarray(x, np.float64) @ p["attn_out"]["kernel"] + p["attn_out"]["bias"] + np.asarray(x, np.float64)
    h = x1 @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"]
    w = {key: p["ffn_in"][key]["default"] for key in KEYS + (bottleneck.SCALING_KEY,)}
    act = _np_activation(config.non_linearity)
    h = h + w["adapter_scaling"] * (act(h @ w["adapter_down_kernel"] + w["adapter_down_bias"])
                                    @ w["adapter_up_kernel"] + w["adapter_up_bias"])
    expected = x1 + np.tanh(h) @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]
    np.testing.assert_allclose(adapted(variables, x), expected, rtol=1e-5, atol=1e-5)  # no rng: no dropout
    dropped = adapted(variables, x, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.abs(dropped - expected).max()) > 1e-3


def test_sequential_adapters_share_a_mixed_batch_and_parallel_ones_say_they_cannot():
    model, x = UserBlock(), jax.random.normal(jax.random.key(0), (2, 8))
    base = model.init(jax.random.key(2), x)
    for preset, options in (("pfeiffer", {}), ("parallel", {"parallel_inputs": {"ffn_out": "ffn_in"}})):
        configs = {name: AdapterConfig(preset=preset, reduction_factor=rf, feedforward_modules=["ffn_out"],
                                       init_weights=False, **options) for name, rf in (("a", 2), ("b", 4))}
        variables = base
        for seed, (name, config) in enumerate(configs.items()):
            variables = jaxpeft.init_adapters(jax.random.key(seed), config, model.apply, variables, x,
                                              adapter_name=name)
        adapted = jaxpeft.rewrite(model.apply, configs)
        mix = jaxpeft.AdapterMix.of(["b", "a"])
        if preset == "parallel":
            with pytest.raises(jaxpeft.AdapterError, match="cannot|does not show them"):
                adapted(variables, x, adapter_name=mix)
            continue
        mixed = adapted(variables, x, adapter_name=mix)
        np.testing.assert_allclose(mixed[0], adapted(variables, x, adapter_name="b")[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mixed[1], adapted(variables, x, adapter_name="a")[1], rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(mixed[0] - adapted(variables, x, adapter_name="a")[0]).max()) > 1e-3


# ----- scanned stacks -----

_TOY_BASE: list = []


def _toy_base():
    """The scanned toy transformer, its sample ids and its base variables (initialised once)."""
    if not _TOY_BASE:
        model, ids = Transformer(scan=True), sample_ids()
        _TOY_BASE.append((model, ids, jax.jit(model.init)(jax.random.key(0), ids)))
    return _TOY_BASE[0]


TOY_OPTIONS = dict(attention_modules=["attention.output"], feedforward_modules=["mlp_out"],
                   parallel_inputs={"mlp_out": "intermediate"}, reduction_factor=4, init_weights=False)


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_scanned_rematerialised_stack_equals_the_unscanned_one(preset):
    scanned, ids, base = _toy_base()
    config = AdapterConfig(preset=preset, **TOY_OPTIONS)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, scanned.apply, base, ids)
    leaf = _leaf(variables, ("layer", "block", "mlp_out"), "adapter_down_kernel")
    assert leaf.shape == (LAYERS, HIDDEN, HIDDEN // 4)
    out = jax.jit(jaxpeft.rewrite(scanned.apply, config))(variables, ids)
    unscanned = Transformer(scan=False)
    unscanned_out = jax.jit(jaxpeft.rewrite(unscanned.apply, config))(unscanned_params(variables), ids)
    np.testing.assert_allclose(out, unscanned_out, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out - jax.jit(scanned.apply)(base, ids)).max()) > 1e-4
    fresh = jaxpeft.init_adapters(jax.random.key(1), config, unscanned.apply, unscanned_params(base), ids)
    assert _leaf(fresh, ("layer", "1", "block", "mlp_out"), "adapter_down_kernel").shape == (HIDDEN, HIDDEN // 4)


def test_layers_to_transform_leaves_the_other_layers_of_a_stack_alone():
    scanned, ids, base = _toy_base()
    config = AdapterConfig(preset="pfeiffer", layers_to_transform=[0, 2], **TOY_OPTIONS)
    variables = jaxpeft.init_adapters(jax.random.key(1), config, scanned.apply, base, ids)
    np.testing.assert_array_equal(_leaf(variables, ("layer", "block", "mlp_out"), "adapter_scaling"), [1, 0, 1])
    adapted = jax.jit(jaxpeft.rewrite(scanned.apply, config))
    # The same as the unscanned model without layer 1's adapter.
    by_hand = unscanned_params(variables)
    for key in KEYS + (bottleneck.SCALING_KEY,):
        del by_hand["params"]["layer"]["1"]["block"]["mlp_out"][key]
    expected = jax.jit(jaxpeft.rewrite(Transformer(scan=False).apply, config))(by_hand, ids)
    np.testing.assert_allclose(adapted(variables, ids), expected, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(adapted(v, ids) ** 2)))(variables)
    grad = _leaf(grads, ("layer", "block", "mlp_out"), "adapter_up_kernel")
    assert float(np.abs(grad[1]).max()) == 0 and float(np.abs(grad[0]).max()) > 0


def test_leave_out_and_exclude_modules_on_a_scanned_model(torch_models):
    base = AutoModelForCausalLM.from_pretrained(torch_models["gpt2"][1], scan_layers=True)
    config = AdapterConfig(leave_out=[0], exclude_modules=["transformer.h.1.attn.c_proj"], scaling=2.0)
    assert config.leave_out == [0]
    model = jaxpeft.get_peft_model(base, config)
    adapted = {path[1:-2] for path in flatten(model.params) if path[-2] == bottleneck.SCALING_KEY}
    assert adapted == {("transformer", "h", "mlp", "c_proj")}  # no attention layer is left to adapt
    np.testing.assert_array_equal(_leaf(model.params, ("transformer", "h", "mlp", "c_proj"), "adapter_scaling"),
                                  [0, 2])


# ----- options and errors -----

def test_presets_fill_the_options_left_at_none_and_round_trip_through_a_dict():
    houlsby = AdapterConfig()
    assert (houlsby.preset, houlsby.mh_adapter, houlsby.output_adapter, houlsby.is_parallel) == (
        "houlsby", True, True, False)
    assert (houlsby.reduction_factor, houlsby.non_linearity, houlsby.scaling) == (16, "swish", 1.0)
    parallel = AdapterConfig(preset="par_bn", non_linearity="GELU")
    assert (parallel.preset, parallel.is_parallel, parallel.mh_adapter, parallel.reduction_factor,
            parallel.scaling, parallel.non_linearity) == ("parallel", True, False, 2, 4.0, "gelu")
    fields = {k: v for k, v in parallel.to_dict().items() if k != "peft_type"}
    assert AdapterConfig(**fields) == parallel
    assert AdapterConfig(preset="seq_bn", mh_adapter=True).mh_adapter is True


@pytest.mark.parametrize("options, message", [
    (dict(non_linearity="sigmoid"), "non_linearity='sigmoid' is unknown; use one of relu, gelu, gelu_new, silu"),
    (dict(reduction_factor=0.5), "reduction_factor must be a number >= 1"),
    (dict(reduction_factor=0), "reduction_factor must be a number >= 1"),
    (dict(preset="lora"), "preset='lora' is unknown; use one of houlsby, pfeiffer, parallel"),
    (dict(config="pfeiffer"), "did you mean 'preset'"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(mh_adapter=False, output_adapter=False), "no adapter would be added"),
    (dict(target_modules=["a"], feedforward_modules=["b"]), "either target_modules"),
    (dict(layers_to_transform=["0"]), "layers_to_transform must be"),
    (dict(leave_out=-1), "leave_out must be"),
    (dict(parallel_inputs=["ffn_in"]), "parallel_inputs must map"),
])
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        AdapterConfig(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(reduction_factor=3, feedforward_modules=["ffn_out"], mh_adapter=False),
     r"reduction_factor=3 does not divide the hidden size 8 of ffn_out; use one of \[1, 2, 4, 8\]"),
    (dict(feedforward_modules=["mlp.nothing"], mh_adapter=False),
     "feedforward_modules entry 'mlp.nothing' matched no module; modules that exist: attn_out, ffn_in"),
    (dict(feedforward_modules=["ffn_out"]),
     "found no attention output projection by name .*attention_modules=.* \\(or mh_adapter=False\\)"),
    (dict(), "found no attention or feedforward output projection by name"),
    (dict(preset="parallel", feedforward_modules=["ffn_out"], parallel_inputs={"ffn_out": "ffn_middle"}),
     "the parallel adapter at ffn_out would read the input of ffn_middle, which the model does not call"),
    (dict(attention_modules=["attn_out"], feedforward_modules=["ffn_out"], layers_to_transform=[1]),
     "layers_to_transform=\\[1\\] names a layer \\[1\\] the model does not have; it has no numbered layers"),
])
def test_mismatches_with_the_model_are_one_line_adapter_errors(options, message):
    model, x = UserBlock(), jnp.ones((1, 8))
    with pytest.raises(jaxpeft.AdapterError, match=message) as error:
        jaxpeft.init_adapters(jax.random.key(0), AdapterConfig(**options), model.apply,
                              model.init(jax.random.key(1), x), x)
    assert "\n" not in str(error.value)


def test_a_module_that_returns_one_array_takes_an_adapter_and_one_that_does_not_is_an_error(torch_models):
    base = AutoModelForCausalLM.from_pretrained(torch_models["gpt2"][1])
    model = jaxpeft.get_peft_model(base, AdapterConfig(feedforward_modules=["mlp"], mh_adapter=False))
    assert model.params["params"]["transformer"]["h"]["0"]["mlp"]["adapter_down_kernel"]["default"].shape == (32, 2)
    message = ("matched 'transformer.h.0' \\(a GPT2Block whose output is not one array\\); bottleneck adapters add "
               "to a module's output")
    with pytest.raises(jaxpeft.AdapterError, match=message):
        jaxpeft.get_peft_model(base, AdapterConfig(feedforward_modules=[r"h.0"], mh_adapter=False))
    with pytest.raises(jaxpeft.AdapterError, match="'transformer.h.0.attn.c_attn' matches both"):
        jaxpeft.get_peft_model(base, AdapterConfig(attention_modules=["c_attn"], feedforward_modules=["attn.c_attn"]))
