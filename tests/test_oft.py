"""OFT and BOFT: torch PEFT as the reference (tiny Llama, both file directions), hand computations, merge, training."""

import doctest
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.hf_format import load_adapter, save_adapter
from jaxpeft.methods import boft, oft
from jaxpeft.methods.boft import BOFTConfig
from jaxpeft.methods.oft import OFTConfig
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.tree import flatten, unflatten_like

IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
KEEP = MASK.astype(bool)
TARGETS = ["q_proj", "v_proj", "down_proj"]
# Options of the reverse direction (jaxpeft saves, torch PEFT loads), beyond the defaults (Cayley-Neumann).
VARIANTS = {
    "neumann": {},
    "exact_shared_coft": {"r": 4, "oft_block_size": 0, "block_share": True, "use_cayley_neumann": False,
                          "coft": True, "eps": 0.5},
}

def _logits(output):
    return np.asarray(output.logits if hasattr(output, "logits") else output["logits"])


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny torch Llama's folder, and jaxpeft's unscanned and scanned copies of it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=99, pad_token_id=0)
    config._attn_implementation = "eager"
    folder = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    models = {scan: AutoModelForCausalLM.from_pretrained(folder, scan_layers=scan) for scan in (False, True)}
    return folder, models


@pytest.fixture(scope="module")
def torch_oft(llama, tmp_path_factory):
    """torch PEFT OFT (random skew-symmetric parameters) on layers 0 and 2, saved; its logits."""
    folder, _ = llama
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    base = _torch_logits(model)
    config = peft.OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS, init_weights=False,
                            layers_to_transform=[0, 2])
    peft_model = peft.get_peft_model(model, config).eval()
    adapter_folder = tmp_path_factory.mktemp("torch_oft")
    peft_model.save_pretrained(adapter_folder)
    return adapter_folder, _torch_logits(peft_model), base


@pytest.mark.parametrize("module", [oft, boft], ids=["oft", "boft"])
def test_docstring_example(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_torch_saved_oft_reproduces_torch_outputs_scanned_and_unscanned(llama, torch_oft):
    _, models = llama
    adapter_folder, expected, base = torch_oft
    outputs = {}
    for scan, model in models.items():
        variables, config = load_adapter(adapter_folder, model.apply_fn, model.params, IDS, MASK)
        assert isinstance(config, OFTConfig) and config.oft_block_size == 8 and config.use_cayley_neumann
        outputs[scan] = _logits(jax.jit(jaxpeft.rewrite(model.apply_fn, config))(variables, IDS, MASK))
        error = np.abs(outputs[scan][KEEP] - expected[KEEP]).max()
        print(f"scan_layers={scan}: max |jaxpeft - torch PEFT| = {error:.2e}")
        np.testing.assert_allclose(outputs[scan][KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-5, rtol=1e-5)
    assert np.abs(base[KEEP] - expected[KEEP]).max() > 1e-2  # the adapter matters
    scanned = variables["params"]["model"]["layers"]["mlp"]["down_proj"]
    assert scanned["oft_R"]["default"].shape == (3, 8, 28)  # 64 inputs: 8 blocks of 8 x 8
    np.testing.assert_array_equal(scanned["oft_active"]["default"], [1, 0, 1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_jaxpeft_saved_oft_loads_in_torch_peft(llama, tmp_path, variant):
    folder, models = llama
    model = models[True]
    config = OFTConfig(**{"oft_block_size": 8, "target_modules": TARGETS, "init_weights": False, **VARIANTS[variant]})
    variables = jaxpeft.init_adapters(jax.random.key(3), config, model.apply_fn, model.params, IDS, MASK)
    ours = _logits(jax.jit(jaxpeft.rewrite(model.apply_fn, config))(variables, IDS, MASK))
    save_adapter(tmp_path, variables, config, model.apply_fn, IDS, MASK)
    torch_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path).eval()
    expected = _torch_logits(torch_model)
    error = np.abs(ours[KEEP] - expected[KEEP]).max()
    print(f"{variant}: max |jaxpeft - torch PEFT| = {error:.2e}")
    np.testing.assert_allclose(ours[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    assert np.abs(_logits(model(input_ids=IDS, attention_mask=MASK))[KEEP] - expected[KEEP]).max() > 1e-3


@pytest.mark.parametrize("block_share", [False, True], ids=["blocks", "shared"])
def test_hand_computation_merge_and_unmerge_for_one_dense_layer(block_share):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    base = model.init(jax.random.key(1), x)
    config = OFTConfig(oft_block_size=4, target_modules=".*", init_weights=False, use_cayley_neumann=False,
                       block_share=block_share)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    packed = np.asarray(variables["params"]["oft_R"]["default"], np.float64)
    assert packed.shape == ((1 if block_share else 2), 6)
    rotation = np.zeros((8, 8))
    for block, vector in enumerate(np.broadcast_to(packed, (2, 6))):
        q = np.zeros((4, 4))
        q[np.triu_indices(4, 1)] = vector
        q -= q.T
        rotation[4 * block:4 * block + 4, 4 * block:4 * block + 4] = (np.eye(4) - q) @ np.linalg.inv(np.eye(4) + q)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(8), atol=1e-12)
    kernel, bias = np.asarray(base["params"]["kernel"]), np.asarray(base["params"]["bias"])
    expected = (np.asarray(x, np.float64) @ rotation) @ kernel + bias  # torch: the input rotated block by block
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, rtol=1e-5, atol=1e-5)
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(model.apply(merged, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jaxpeft.unmerge(merged, variables, config)["params"]["kernel"], kernel, atol=1e-6)


def test_module_dropout_replaces_a_share_of_blocks_by_the_identity():
    model = nn.Dense(3, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 16))
    base = model.init(jax.random.key(1), x)
    config = OFTConfig(oft_block_size=4, target_modules=".*", init_weights=False, module_dropout=0.5)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    adapted = jaxpeft.rewrite(model.apply, config)
    blocks = np.asarray(oft.rotations(config, {"oft_R": variables["params"]["oft_R"]["default"]}, 16))
    kernel = np.asarray(base["params"]["kernel"])
    seen = set()
    for seed in range(4):
        out = np.asarray(adapted(variables, x, rngs={"dropout": jax.random.key(seed)}))
        matches = []
        for dropped in itertools.combinations(range(4), 2):  # int(0.5 * 4) blocks are the identity
            kept = [np.eye(4) if i in dropped else blocks[i] for i in range(4)]
            rotation = jax.scipy.linalg.block_diag(*kept)
            if np.allclose(out, np.asarray(x) @ np.asarray(rotation) @ kernel, atol=1e-5):
                matches.append(dropped)
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 1
    np.testing.assert_allclose(adapted(variables, x), np.asarray(x) @ np.asarray(
        jax.scipy.linalg.block_diag(*blocks)) @ kernel, atol=1e-5)  # no rng: no dropout


def test_merge_equals_rewritten_apply_and_unmerge_restores(llama):
    _, models = llama
    model = models[True]
    config = OFTConfig(oft_block_size=8, target_modules=TARGETS, init_weights=False, layers_to_transform=[0, 2],
                       num_cayley_neumann_terms=3)
    variables = jaxpeft.init_adapters(jax.random.key(4), config, model.apply_fn, model.params, IDS, MASK)
    adapted = _logits(jax.jit(jaxpeft.rewrite(model.apply_fn, config))(variables, IDS, MASK))
    merged = jax.jit(lambda v: jaxpeft.merge(v, config))(variables)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(_logits(jax.jit(model.apply_fn)(merged, IDS, MASK)), adapted, atol=1e-5, rtol=1e-5)
    restored = flatten(jax.jit(lambda m, v: jaxpeft.unmerge(m, v, config))(merged, variables))
    for path, leaf in flatten(variables).items():
        np.testing.assert_allclose(restored[path], leaf, rtol=1e-5, atol=1e-6, err_msg=str(path))
    layer1 = ("params", "model", "layers", "self_attn", "q_proj", "kernel")
    np.testing.assert_array_equal(flatten(merged)[layer1][1], flatten(variables)[layer1][1])  # not selected


@pytest.mark.parametrize("config", [
    OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["layers_0", "layers_2"], coft=True, eps=0.1),
    BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.5, target_modules=["layers_0", "layers_2"]),
], ids=["oft", "boft"])
def test_only_adapter_leaves_train_with_dropout(config):
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (6, 16))
    labels = jnp.arange(6) % 4
    base = model.init(jax.random.key(1), x)
    variables = jaxpeft.init_adapters(jax.random.key(2), config, model.apply, base, x)
    mask = jaxpeft.trainable_mask(variables, config)
    trained = {path for path, keep in flatten(mask).items() if keep}
    leaf_keys = {"oft_R"} if isinstance(config, OFTConfig) else {"boft_R", "boft_s"}
    assert {path[-2] for path in trained} == leaf_keys and len(trained) == 2 * len(leaf_keys)
    trainable, frozen = jaxpeft.partition(variables, mask)
    adapted = jaxpeft.rewrite(model.apply, config)

    def loss(params, key):
        logits = adapted(jaxpeft.combine(params, frozen), x, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state, key):
        value, grads = jax.value_and_grad(loss)(params, key)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state = trainable, optimizer.init(trainable)
    for i in range(3):
        params, state, _ = step(params, state, jax.random.key(i))
    after = flatten(jaxpeft.combine(params, frozen))
    for path, leaf in flatten(variables).items():
        if path in trained:
            assert float(jnp.abs(after[path] - leaf).max()) > 0, path
        else:
            np.testing.assert_array_equal(after[path], leaf, err_msg=str(path))
    final = jaxpeft.combine(params, frozen)  # a dropout rng makes some blocks the identity
    assert float(jnp.abs(adapted(final, x, rngs={"dropout": jax.random.key(9)}) - adapted(final, x)).max()) > 1e-6

def test_block_size_follows_hf_peft_rules():
    assert oft.blocks_for(OFTConfig(oft_block_size=16), 64) == (4, 16)
    assert oft.blocks_for(OFTConfig(r=4, oft_block_size=0), 64) == (4, 16)
    with pytest.warns(UserWarning, match="oft_block_size=7 does not divide"):
        assert oft.blocks_for(OFTConfig(oft_block_size=7), 48) == (8, 6)  # 6 and 8 tie at 1: HF takes the lower
    with pytest.warns(UserWarning, match="using oft_block_size=48"):
        assert oft.blocks_for(OFTConfig(oft_block_size=100), 48) == (1, 48)


@pytest.mark.parametrize("options,expected", [
    ({"r": 4}, "give exactly one of r and oft_block_size"),
    ({"oft_block_size": 0}, "give exactly one of r and oft_block_size"),
    ({"bias": "lora_only"}, "bias='lora_only' is unknown"),
    ({"module_dropout": 1.0}, r"module_dropout must be in \[0, 1\)"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"block_size": 4}, "did you mean 'oft_block_size'"),
])
def test_bad_config_values(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected) as error:
        OFTConfig(**options)
    assert "\n" not in str(error.value)


def test_embedding_targets_are_refused(llama):
    _, models = llama
    model = models[False]
    with pytest.raises(jaxpeft.AdapterError, match="OFT cannot adapt") as error:
        jaxpeft.init_adapters(jax.random.key(0), OFTConfig(target_modules=["embed_tokens"]), model.apply_fn,
                              model.params, IDS, MASK)
    assert "\n" not in str(error.value)


# ----- BOFT -----

@pytest.fixture
def torch_boft(monkeypatch):
    """torch PEFT's BOFT layer module, its CUDA block-diagonal kernel replaced by torch.block_diag (so that
    boft_n_butterfly_factor > 1 is built on CPU as HF PEFT builds it on a GPU)."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer.FastBlockDiag, "apply",
                        staticmethod(lambda x: torch.stack([torch.block_diag(*blocks) for blocks in x])))
    return boft_layer


@pytest.mark.parametrize("factors,options", [(1, {"boft_block_size": 4}), (2, {"boft_block_size": 4}),
                                             (3, {"boft_block_num": 8, "boft_block_size": 0})])
def test_boft_matches_torch_peft_layer_and_merges(torch_boft, factors, options):
    torch.manual_seed(factors)
    linear = torch.nn.Linear(16, 5)
    torch_config = peft.BOFTConfig(boft_n_butterfly_factor=factors, target_modules=["x"], init_weights=False, **options)
    layer = torch_boft.Linear(linear, "default", config=torch_config)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x).numpy()
    model = nn.Dense(5)
    kernel, bias = linear.weight.detach().numpy().T, linear.bias.detach().numpy()
    config = BOFTConfig(boft_n_butterfly_factor=factors, target_modules=".*", **options)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply,
                                      {"params": {"kernel": kernel, "bias": bias}}, x.numpy())
    variables["params"]["boft_R"]["default"] = layer.boft_R["default"].detach().numpy()
    variables["params"]["boft_s"]["default"] = layer.boft_s["default"].detach().numpy()
    assert variables["params"]["boft_R"]["default"].shape[0] == factors
    got = jaxpeft.rewrite(model.apply, config)(variables, x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    merged = jaxpeft.merge(variables, config)
    np.testing.assert_allclose(model.apply(merged, x.numpy()), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    np.testing.assert_allclose(merged["params"]["kernel"], linear.weight.detach().numpy().T, atol=1e-6)
    np.testing.assert_allclose(jaxpeft.unmerge(merged, variables, config)["params"]["kernel"], kernel, atol=1e-6)


def test_boft_files_move_both_ways_with_torch_peft(llama, tmp_path, monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)  # what a CPU build finds, without compiling
    folder, models = llama
    model = models[True]
    torch.manual_seed(2)
    torch_config = peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS, init_weights=False,
                                   layers_to_transform=[0, 2])
    peft_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
                                     torch_config).eval()
    peft_model.save_pretrained(tmp_path / "torch")
    expected = _torch_logits(peft_model)
    variables, config = load_adapter(tmp_path / "torch", model.apply_fn, model.params, IDS, MASK)
    assert isinstance(config, BOFTConfig)
    adapted = jax.jit(jaxpeft.rewrite(model.apply_fn, config))
    got = _logits(adapted(variables, IDS, MASK))
    print(f"BOFT torch -> jaxpeft: max |difference| = {np.abs(got[KEEP] - expected[KEEP]).max():.2e}")
    np.testing.assert_allclose(got[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)

    changed = jax.tree_util.tree_map(lambda leaf: leaf, variables)
    flat = flatten(changed)
    for path, leaf in flat.items():
        if path[-2] in ("boft_R", "boft_s"):
            flat[path] = leaf + 0.05
    changed = unflatten_like(flat, changed)
    ours = _logits(adapted(changed, IDS, MASK))
    save_adapter(tmp_path / "ours", changed, config, model.apply_fn, IDS, MASK)
    torch_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "ours").eval()
    reloaded = _torch_logits(torch_model)
    print(f"BOFT jaxpeft -> torch: max |difference| = {np.abs(ours[KEEP] - reloaded[KEEP]).max():.2e}")
    np.testing.assert_allclose(ours[KEEP], reloaded[KEEP], atol=1e-4, rtol=1e-4)
    assert np.abs(ours[KEEP] - got[KEEP]).max() > 1e-3
    merged = jax.jit(lambda v: jaxpeft.merge(v, config))(changed)
    np.testing.assert_allclose(_logits(jax.jit(model.apply_fn)(merged, IDS, MASK)), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options,expected", [
    ({"boft_block_num": 4}, "give exactly one of boft_block_size and boft_block_num"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor must be a positive integer"),
    ({"bias": "lora_only"}, "bias='lora_only' is unknown"),
])
def test_boft_bad_config_values(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected) as error:
        BOFTConfig(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options,expected", [
    ({"boft_block_size": 3}, "multiple of boft_block_size"),
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 4}, "multiple of boft_block_size"),
    ({"boft_block_num": 2, "boft_block_size": 0, "boft_n_butterfly_factor": 3}, "must be a multiple of 2"),
])
def test_boft_refuses_block_shapes_torch_peft_refuses(options, expected):
    model = nn.Dense(4)
    x = jnp.ones((1, 16))
    with pytest.raises(jaxpeft.AdapterError, match=expected) as error:
        jaxpeft.init_adapters(jax.random.key(0), BOFTConfig(target_modules=".*", **options), model.apply,
                              model.init(jax.random.key(1), x), x)
    assert "\n" not in str(error.value)
