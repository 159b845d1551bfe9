"""LoHa and LoKr: hand computations, HF PEFT's shapes and inits, torch PEFT parity both ways, merge, training."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from peft.tuners.lokr.layer import factorization as hf_factorization
from toy_models import MLP, Transformer, sample_ids

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.hf_format import load_adapter, save_adapter
from jaxpeft.methods import loha, lokr
from jaxpeft.methods.loha import LoHaConfig
from jaxpeft.methods.lokr import LoKrConfig
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.tree import flatten

IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
KEEP = MASK.astype(bool)
TARGETS = ["q_proj", "v_proj", "down_proj"]
# q_proj [32, 32], v_proj [16, 32], down_proj [32, 64]: LoKr gets full and low-rank w1 and w2 among them
OPTIONS = {
    # the dropouts act only in training (torch's and ours): the adapter loads and runs
    "loha": (LoHaConfig, peft.LoHaConfig, {"r": 4, "alpha": 8, "rank_pattern": {"v_proj": 2},
                                           "alpha_pattern": {"down_proj": 3}, "module_dropout": 0.1}),
    # r=1 with decompose_both: w1 and w2 both low rank; down_proj's r=8: both full
    "lokr": (LoKrConfig, peft.LoKrConfig, {"r": 1, "alpha": 6, "decompose_both": True, "decompose_factor": 4,
                                           "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"q_proj": 5},
                                           "rank_dropout": 0.2, "rank_dropout_scale": True}),
}
LEAVES = {"LOHA": loha.FACTORS, "LOKR": lokr.FACTORS}


def _llama_config():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=99, pad_token_id=0)
    config._attn_implementation = "eager"
    return config


def _logits(output):
    return np.asarray(output.logits if hasattr(output, "logits") else output["logits"])


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(_llama_config()).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def jax_models(base_folder):
    return {scan: AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan) for scan in (False, True)}


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def torch_adapter(request, base_folder, tmp_path_factory):
    """A torch PEFT adapter with every factor random (``init_weights=False``), saved, and its logits."""
    _, torch_class, options = OPTIONS[request.param]
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()
    model = peft.get_peft_model(base, torch_class(target_modules=TARGETS, init_weights=False,
                                                  layers_to_transform=[0, 2], **options)).eval()
    folder = tmp_path_factory.mktemp(request.param + "_adapter")
    model.save_pretrained(folder)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if ".default" in name}
    return request.param, folder, shapes, _torch_logits(model)


@pytest.fixture(scope="module")
def torch_base_logits(base_folder):
    return _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval())


def _jax_config(name, **extra):
    jax_class, _, options = OPTIONS[name]
    return jax_class(target_modules=TARGETS, layers_to_transform=[0, 2], **{**options, **extra})


def _hf_names(model):
    """``{layer path: HF module name}`` of an unscanned model's layers."""
    trace = trace_layers(model.apply_fn, model.params, (IDS, MASK), {})
    return {path: layer.virtual_paths[()] for path, layer in trace.layers.items()}


_APPLIED: dict = {}


def _apply(model, config):
    """The jitted adapted apply, made once per model and config (compiling is the slow part)."""
    key = (id(model), config.to_json())
    if key not in _APPLIED:
        _APPLIED[key] = jax.jit(jaxpeft.rewrite(model.apply_fn, config))
    return _APPLIED[key]


# ----- the maths, against numpy and HF PEFT's own helpers -----

@pytest.mark.parametrize("module", [loha, lokr])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_factorization_matches_hf_peft():
    for dimension in range(1, 200):
        for factor in (-1, 0, 1, 2, 3, 4, 8, 16, 50):
            assert lokr.factorization(dimension, factor) == hf_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("config", [
    LoHaConfig(r=3, alpha=5, target_modules=".*", init_weights=False),
    LoKrConfig(r=1, alpha=5, target_modules=".*", init_weights=False, decompose_both=True),
    LoKrConfig(r=4, alpha=2, target_modules=".*", init_weights=False, decompose_factor=3),
], ids=["loha", "lokr_low_rank", "lokr_full"])
def test_one_dense_layer_matches_a_numpy_computation(config):
    model = nn.Dense(12)
    x = jax.random.normal(jax.random.key(0), (3, 18))
    base = model.init(jax.random.key(1), x)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    p = {k: np.asarray(v["default"], np.float64) for k, v in variables["params"].items() if isinstance(v, dict)}
    scale = config.alpha / config.r
    if config.peft_type == "LOHA":
        change = scale * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        change = scale * np.kron(w1, w2)
    kernel, bias = np.asarray(base["params"]["kernel"], np.float64), np.asarray(base["params"]["bias"], np.float64)
    expected = np.asarray(x, np.float64) @ (kernel + change.T) + bias
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, rtol=1e-5, atol=1e-5)
    assert np.float32(scale) == p["hada_scaling" if config.peft_type == "LOHA" else "lokr_scaling"]


@pytest.mark.parametrize("method, options", [
    ("loha", {"r": 3}), ("loha", {"r": 2, "init_weights": False, "rank_pattern": {"k_proj": 1}}),
    ("lokr", {"r": 2, "decompose_factor": 8}),
    ("lokr", {"r": 16, "decompose_factor": 2, "init_weights": False}),
    ("lokr", {"r": 3, "decompose_both": True, "decompose_factor": 4, "rank_pattern": {"k_proj": 1},
              "init_weights": "lycoris"}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_leaf_shapes_and_init_match_hf_peft(method, options):
    """Per layer of a torch Llama: HF PEFT's tensor names and shapes (LoKr's factorisation), the same factors at
    zero, torch's kaiming-uniform bounds, and a zero change exactly when HF PEFT's is."""
    module = loha if method == "loha" else lokr
    targets = ["q_proj", "k_proj", "up_proj", "down_proj"]
    torch_class, jax_class = (peft.LoHaConfig, LoHaConfig) if method == "loha" else (peft.LoKrConfig, LoKrConfig)
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(_llama_config()),
                                      torch_class(target_modules=targets, **options))
    config = jax_class(target_modules=targets, **options)
    layers = {name.removeprefix("base_model.model."): layer for name, layer in torch_model.named_modules()
              if hasattr(layer, "get_delta_weight")}
    assert len(layers) == 3 * len(targets)
    for i, (name, layer) in enumerate(sorted(layers.items())):
        n_out, n_in = layer.get_base_layer().weight.shape
        ours = module.layer_leaves(jax.random.key(i), config, name, n_out, n_in, jnp.float32)
        theirs = {key: getattr(layer, key)["default"].detach().numpy() for key in module.FACTORS
                  if "default" in getattr(layer, key)}
        assert {k: v.shape for k, v in ours.items() if k in module.FACTORS} == {
            k: v.shape for k, v in theirs.items()}, name
        assert {k for k in theirs if not np.asarray(ours[k]).any()} == {k for k, v in theirs.items() if not v.any()}
        for key in theirs:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert np.abs(ours[key]).max() <= 1 / np.sqrt(ours[key].shape[1]) + 1e-7, (name, key)
        change = np.asarray(module.delta(config, ours, None))
        assert change.shape == (n_out, n_in) == module.sizes(config, ours)
        assert float(ours[f"{'hada' if method == 'loha' else 'lokr'}_scaling"]) == np.float32(layer.scaling["default"])
        assert change.any() == bool(layer.get_delta_weight("default").any()) == (options.get("init_weights") is False)


# ----- torch PEFT parity, both ways -----

def test_torch_peft_adapter_loads_and_reproduces_torch_logits(torch_adapter, jax_models, torch_base_logits):
    """Scanned and unscanned: the same logits as torch PEFT, and as each other."""
    name, folder, _, expected = torch_adapter
    jax_class, _, options = OPTIONS[name]
    outputs = {}
    for scan_layers, model in jax_models.items():
        variables, config = load_adapter(folder, model.apply_fn, model.params, IDS, MASK)
        assert isinstance(config, jax_class) and (config.r, config.alpha) == (options["r"], options["alpha"])
        assert config.rank_pattern == options["rank_pattern"] and config.alpha_pattern == options["alpha_pattern"]
        got = outputs[scan_layers] = _logits(_apply(model, config)(variables, IDS, MASK))
        error = float(np.abs(got[KEEP] - expected[KEEP]).max())
        print(f"\n{name} {'scanned' if scan_layers else 'unscanned'}: max |jaxpeft - torch PEFT| logits = {error:.2e}")
        np.testing.assert_allclose(got[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
        assert np.abs(expected[KEEP] - torch_base_logits[KEEP]).max() > 100 * max(error, 1e-7)
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-5, rtol=1e-5)  # scanned = unscanned


def test_jaxpeft_saved_adapter_loads_in_torch_peft(torch_adapter, jax_models, base_folder, tmp_path):
    name, _, torch_shapes, _ = torch_adapter
    model = jax_models[True]
    config = _jax_config(name, init_weights=False)
    variables = jaxpeft.init_adapters(jax.random.key(3), config, model.apply_fn, model.params, IDS, MASK)
    ours = _logits(_apply(model, config)(variables, IDS, MASK))
    save_adapter(tmp_path, variables, config, model.apply_fn, IDS, MASK)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()
    torch_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert {k: tuple(p.shape) for k, p in torch_model.named_parameters() if ".default" in k} == torch_shapes
    expected = _torch_logits(torch_model)
    error = float(np.abs(ours[KEEP] - expected[KEEP]).max())
    print(f"\n{name} jaxpeft -> torch PEFT: max |jaxpeft - torch PEFT| logits = {error:.2e}")
    np.testing.assert_allclose(ours[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    torch_model.merge_adapter()  # HF PEFT merges LoHa and LoKr too: its merged model is the same one
    np.testing.assert_allclose(ours[KEEP], _torch_logits(torch_model)[KEEP], atol=1e-4, rtol=1e-4)


# ----- merge and training, on the toy scanned transformer (DenseGeneral layers, remat, layers_to_transform) -----

TOY_CONFIGS = {
    "loha": LoHaConfig(r=2, alpha=3, target_modules=["query", "output", "mlp_out"], layers_to_transform=[0, 2],
                       rank_pattern={"mlp_out": 3}, init_weights=False),
    "lokr": LoKrConfig(r=1, alpha=3, target_modules=["query", "output", "mlp_out"], layers_to_transform=[0, 2],
                       decompose_both=True, alpha_pattern={"output": 2}, init_weights=False),
}


@pytest.fixture(scope="module")
def toy():
    model, ids = Transformer(scan=True), sample_ids()
    return model, ids, model.init(jax.random.key(0), ids)


@pytest.mark.parametrize("name", sorted(TOY_CONFIGS))
def test_merge_equals_rewritten_apply_and_unmerge_restores(toy, name):
    model, ids, base = toy
    config = TOY_CONFIGS[name]
    variables = jaxpeft.init_adapters(jax.random.key(4), config, model.apply, base, ids)
    adapted = jax.jit(jaxpeft.rewrite(model.apply, config))(variables, ids)
    apply = jax.jit(model.apply)
    assert float(jnp.abs(adapted - apply(base, ids)).max()) > 1e-3
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(apply(merged, ids), adapted, atol=1e-5, rtol=1e-5)
    restored = flatten(jaxpeft.unmerge(merged, variables, config))
    for path, leaf in flatten(variables).items():
        np.testing.assert_allclose(restored[path], leaf, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, target_modules=["fc1", "out"]),
    LoKrConfig(r=1, target_modules=["fc1", "fc2"], decompose_both=True, init_weights="lycoris"),
], ids=["loha", "lokr"])
def test_only_adapter_leaves_train(config):
    """A few optax steps from the default init (one factor at zero, which must still train): every adapter factor
    changes, the base and the constants stay bit-identical."""
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    variables = jaxpeft.init_adapters(jax.random.key(5), config, model.apply, model.init(jax.random.key(1), x), x)
    mask = jaxpeft.trainable_mask(variables, config)
    trained_keys = {path[-2] for path, trains in flatten(mask).items() if trains}
    assert trained_keys and trained_keys <= set(LEAVES[config.peft_type])
    apply = jaxpeft.rewrite(model.apply, config)
    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)

    def loss(params):
        return jnp.mean(apply(params, x) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = variables, optimizer.init(variables)
    for _ in range(3):
        params, state = step(params, state)
    before, after = flatten(variables), flatten(params)
    for path, trains in flatten(mask).items():
        if trains:
            assert not np.array_equal(before[path], after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    assert float(loss(params)) < float(loss(variables))


# ----- what is refused -----

@pytest.mark.parametrize("config_class", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("options, expected", [
    ({"rank_dropout": 1.0}, r"rank_dropout must be in \[0, 1\)"),
    ({"module_dropout": -0.1}, r"module_dropout must be in \[0, 1\)"),
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": float("nan")}, "alpha must be positive"),
    ({"init_weights": "gaussian"}, "init_weights must be"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"lora_alpha": 8}, "did you mean 'alpha'"),
])
def test_bad_options_are_one_line_errors(config_class, options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected):
        config_class(target_modules=["q_proj"], **options)


@pytest.mark.parametrize("config_class, option", [(LoHaConfig, "rank_dropout"), (LoKrConfig, "module_dropout")])
def test_rank_and_module_dropout_run_for_inference_and_refuse_training(config_class, option):
    model = nn.Dense(4)
    x = jnp.ones((2, 6))
    base = model.init(jax.random.key(1), x)
    plain, dropped = (config_class(target_modules=".*", init_weights=False, **{option: rate}) for rate in (0.0, 0.3))
    variables = jaxpeft.init_adapters(jax.random.key(0), plain, model.apply, base, x)
    inference = jaxpeft.rewrite(model.apply, dropped)(variables, x)  # HF PEFT ignores both outside training too
    np.testing.assert_array_equal(inference, jaxpeft.rewrite(model.apply, plain)(variables, x))
    with pytest.raises(jaxpeft.ConfigError, match=f"{option}=0.3 is not supported in training"):
        jaxpeft.rewrite(model.apply, dropped)(variables, x, rngs={"dropout": jax.random.key(2)})


def test_lokr_option_checks():
    assert LoKrConfig(init_weights="lycoris").init_weights == "lycoris"
    with pytest.raises(jaxpeft.ConfigError, match="decompose_factor must be an integer"):
        LoKrConfig(decompose_factor=2.5)


@pytest.mark.parametrize("config", [LoHaConfig(target_modules=".*"), LoKrConfig(target_modules=".*")])
def test_convolutions_are_refused(config):
    model = nn.Conv(4, (3, 3))
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(jaxpeft.AdapterError, match="Conv"):
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, model.init(jax.random.key(1), x), x)


def test_ranks_that_differ_within_a_scanned_stack_are_refused(jax_models):
    model = jax_models[True]
    config = LoHaConfig(target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    with pytest.raises(jaxpeft.AdapterError, match="different shapes; a scanned stack needs one rank"):
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    unscanned = jax_models[False]
    variables = jaxpeft.init_adapters(jax.random.key(0), config, unscanned.apply_fn, unscanned.params, IDS, MASK)
    names = _hf_names(unscanned)
    shapes = {names[path[:-2]]: leaf.shape for path, leaf in flatten(variables["params"]).items()
              if path[-2] == "hada_w1_a"}
    assert shapes == {f"model.layers.{i}.self_attn.q_proj": (32, 2 if i == 1 else 8) for i in range(3)}
