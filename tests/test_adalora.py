"""AdaLoRA: torch PEFT parity both ways (also after rank allocation), the rank allocator and the orthogonal
regularization against torch PEFT's own, merge, and training."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from toy_models import MLP

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.hf_format import load_adapter, save_adapter
from jaxpeft.methods import adalora
from jaxpeft.methods.adalora import AdaLoraConfig
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.tree import flatten

IDS = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
KEEP = MASK.astype(bool)
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), ["c_attn", "mlp.c_proj"]),
}
# A schedule short enough to pass through warmup (steps 0-2), budget decay (3-6, masking on even steps) and the
# final phase (7-10) in a test.
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=10, beta1=0.7, beta2=0.8)
OPTIONS = dict(lora_alpha=6, layers_to_transform=[0, 2], orth_reg_weight=0.3, **SCHEDULE)
PREFIX = "base_model.model."


def _torch_config(targets, **extra):
    return peft.AdaLoraConfig(target_modules=targets, init_lora_weights=False, **{**OPTIONS, **extra})


def _config(targets, **extra):
    return AdaLoraConfig(target_modules=targets, init_lora_weights=False, **{**OPTIONS, **extra})


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def _logits(output):
    return np.asarray(output.logits if hasattr(output, "logits") else output["logits"])


_APPLIED: dict = {}


def _apply(model, config):
    """The jitted adapted apply, once per model and config (compiling is the slow part); ``rank_pattern`` changes
    what the files hold, not the computation."""
    key = (id(model), dataclasses.replace(config, rank_pattern=None).to_json())
    if key not in _APPLIED:
        _APPLIED[key] = jax.jit(jaxpeft.rewrite(model.apply_fn, config))
    return _APPLIED[key]


def _factor_names(torch_model):
    """``{HF module name: {leaf key: torch parameter}}`` of torch PEFT's AdaLoRA layers."""
    out = {}
    for name, param in torch_model.named_parameters():
        for leaf, hf in adalora.HF_NAMES.items():
            if name.endswith(f".{hf}.default"):
                out.setdefault(name.removeprefix(PREFIX).removesuffix(f".{hf}.default"), {})[leaf] = param
    return out


def _allocate_in_torch(model, steps, seed=0):
    """torch PEFT's AdaLoRA loop on synthetic gradients: each step moves every factor by -0.05 * grad and calls
    ``update_and_allocate``. Returns the gradients used, ``[{HF module name: {leaf key: array}}]`` per step."""
    rng = np.random.default_rng(seed)
    factors = _factor_names(model)
    used = []
    for step in range(steps):
        grads = {m: {k: rng.standard_normal(tuple(p.shape)).astype(np.float32) for k, p in f.items()}
                 for m, f in sorted(factors.items())}
        with torch.no_grad():
            for m, f in factors.items():
                for k, p in f.items():
                    p.grad = torch.from_numpy(grads[m][k])
                    p -= 0.05 * p.grad
        model.base_model.update_and_allocate(step)
        used.append(grads)
    return used


_MADE: dict = {}


def _made(family, tmp_path_factory):
    """A tiny transformers model saved; torch PEFT's AdaLoRA on it (random factors) saved before and after rank
    allocation, with their logits; and jaxpeft's model, scanned and not (built once per family)."""
    if family in _MADE:
        return _MADE[family]
    make_config, targets = FAMILIES[family]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(base_folder)
    base_logits = _torch_logits(model)
    peft_model = peft.get_peft_model(model, _torch_config(targets, fan_in_fan_out=family == "gpt2"))
    folders, logits = {}, {}
    folders["plain"] = tmp_path_factory.mktemp(family + "_plain")
    peft_model.save_pretrained(folders["plain"])
    logits["plain"] = _torch_logits(peft_model.eval())
    _allocate_in_torch(peft_model, 6)  # into the budget decay: masks that differ from layer to layer
    folders["allocated"] = tmp_path_factory.mktemp(family + "_allocated")
    peft_model.save_pretrained(folders["allocated"])
    # what torch PEFT loads from it (resized layers): not the model in training, whose masked rows of E moved since
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval(),
                                              folders["allocated"]).eval()
    logits["allocated"] = _torch_logits(reloaded)
    models = {scan: AutoModelForCausalLM.from_pretrained(base_folder, scan_layers=scan) for scan in (False, True)}
    _MADE[family] = dict(targets=targets, base_folder=base_folder, base_logits=base_logits, folders=folders,
                         logits=logits, models=models)
    return _MADE[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def made(request, tmp_path_factory):
    return _made(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _made("llama", tmp_path_factory)


def test_docstring_example():
    result = doctest.testmod(adalora, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----- torch PEFT parity, both ways -----

def test_torch_peft_adapter_loads_and_reproduces_torch_logits(made):
    """The folder before allocation (full init_r tensors) loads scanned and unscanned; the one after (resized
    tensors, ``rank_pattern`` masks that differ per layer) loads scanned and unscanned alike."""
    for kind in ("plain", "allocated"):
        expected = made["logits"][kind]
        assert np.abs(expected[KEEP] - made["base_logits"][KEEP]).max() > 1e-2
        for scan_layers, model in made["models"].items():
            variables, config = load_adapter(made["folders"][kind], model.apply_fn, model.params, IDS, MASK)
            assert isinstance(config, AdaLoraConfig) and (config.init_r, config.lora_alpha) == (4, 6)
            assert (config.rank_pattern is None) == (kind == "plain")
            got = _logits(_apply(model, config)(variables, IDS, MASK))
            error = float(np.abs(got[KEEP] - expected[KEEP]).max())
            print(f"\n{kind} {'scanned' if scan_layers else 'unscanned'}: max |jaxpeft - torch PEFT| = {error:.2e}")
            np.testing.assert_allclose(got[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)


def test_allocated_folder_keeps_hf_resized_shapes(llama):
    """HF PEFT's file after allocation holds only the kept rows (some layers none): loading and saving again in
    jaxpeft writes the same tensors."""
    from safetensors.numpy import load_file

    model = llama["models"][False]
    folder = llama["folders"]["allocated"]
    variables, config = load_adapter(folder, model.apply_fn, model.params, IDS, MASK)
    ranks = {sum(kept) for kept in config.rank_pattern.values()}
    assert len(ranks) > 1, ranks  # the masks differ in size from layer to layer
    again = save_adapter(folder.parent / "again", variables, config, model.apply_fn, IDS, MASK)
    theirs, ours = load_file(folder / "adapter_model.safetensors"), load_file(f"{again}/adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and not any(k.endswith("ranknum") for k in ours)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jaxpeft_saved_adapter_loads_in_torch_peft(family, tmp_path_factory, tmp_path):
    """jaxpeft's adapter with random factors and a ``rank_pattern`` (so resized tensors) loads in torch PEFT with
    the same logits, merged or not."""
    made = _made(family, tmp_path_factory)
    model = made["models"][False]
    config = _config(made["targets"])
    names = _module_names(model, made["targets"])
    rng = np.random.default_rng(1)
    pattern = {f"{name}.lora_E": [bool(v) for v in rng.random(4) < 0.6] for module in names
               for name in names[module].values()}
    config = dataclasses.replace(config, rank_pattern=pattern)
    variables = jaxpeft.init_adapters(jax.random.key(3), config, model.apply_fn, model.params, IDS, MASK)
    ours = _logits(_apply(model, config)(variables, IDS, MASK))
    save_adapter(tmp_path, variables, config, model.apply_fn, IDS, MASK)
    base = transformers.AutoModelForCausalLM.from_pretrained(made["base_folder"]).eval()
    torch_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    for name, f in _factor_names(torch_model).items():
        assert f["adalora_A"].shape[0] == sum(pattern[f"{name}.lora_E"]), name
    expected = _torch_logits(torch_model)
    error = float(np.abs(ours[KEEP] - expected[KEEP]).max())
    print(f"\n{family} jaxpeft -> torch PEFT: max |jaxpeft - torch PEFT| logits = {error:.2e}")
    np.testing.assert_allclose(ours[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    assert np.abs(ours[KEEP] - made["base_logits"][KEEP]).max() > 1e-2
    torch_model.merge_adapter()
    np.testing.assert_allclose(ours[KEEP], _torch_logits(torch_model)[KEEP], atol=1e-4, rtol=1e-4)


# ----- the rank allocator and the orthogonal regularization, against torch PEFT's -----

def _module_names(model, targets=FAMILIES["llama"][1]):
    """``{allocator module key: {stack index: HF module name}}`` of the layers the test config adapts."""
    trace = trace_layers(model.apply_fn, model.params, (IDS, MASK), {})
    config = _config(targets)
    from jaxpeft.core import resolve_layers

    layers = resolve_layers(config, trace, ("dense", "dense_general", "einsum"), method_name="AdaLoRA")
    return {"/".join(path): dict(layer.virtual_paths) for path, layer in layers.items()}


def _per_module(names, per_name, leaf, shape_of):
    """A stacked array per allocator module from ``{HF name: {leaf: array}}`` (zeros where not adapted)."""
    out = {}
    for module, virtual in names.items():
        stack = tuple(max(i[a] for i in virtual) + 1 for a in range(len(next(iter(virtual)))))
        first = next(per_name[name] for name in virtual.values() if name in per_name)
        full = np.zeros(stack + shape_of(first[leaf]), np.float32)
        for index, name in virtual.items():
            if name in per_name:
                full[index] = per_name[name][leaf]
        out[module] = full
    return out


def _tree(names, per_name):
    """``{"params": ...}`` holding the adapter's factors from ``{HF name: {leaf: array}}``, and ``adalora_active``:
    1 where the layer has factors."""
    tree = {}
    for leaf in adalora.FACTORS:
        for module, array in _per_module(names, per_name, leaf, lambda a: tuple(a.shape)).items():
            node = tree
            for part in module.split("/"):
                node = node.setdefault(part, {})
            node[leaf] = {"default": jnp.asarray(array)}
            node[adalora.ACTIVE] = {"default": jnp.asarray(np.any(array != 0, axis=tuple(range(-2, 0))), jnp.float32)}
    return {"params": tree}


def _torch_arrays(torch_model):
    return {m: {k: p.detach().numpy().copy() for k, p in f.items()} for m, f in _factor_names(torch_model).items()}


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_allocator_matches_torch_peft_step_by_step(llama, scan_layers):
    """torch PEFT's ``update_and_allocate`` and jaxpeft's on the same factors and gradients, through warmup, budget
    decay and the final phase: the same budget, EMAs, masks and ``E`` at every step, and the same final
    ``rank_pattern``."""
    model = llama["models"][scan_layers]
    names = _module_names(model)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama["base_folder"])
    torch.manual_seed(2)
    torch_model = peft.get_peft_model(base, _torch_config(llama["targets"]))
    allocator = torch_model.base_model.rankallocator
    variables, config = load_adapter(llama["folders"]["plain"], model.apply_fn, model.params, IDS, MASK)
    state = adalora.init_allocator(config, variables["params"])
    assert adalora.budgets(config, state) == (allocator.init_bgt, allocator.target_bgt) == (24, 12)
    rng = np.random.default_rng(0)
    factors = _factor_names(torch_model)
    for step in range(SCHEDULE["total_step"] + 1):
        with torch.no_grad():  # the same update on both sides, done in torch; then its result given to jaxpeft
            grads = {m: {k: rng.standard_normal(tuple(p.shape)).astype(np.float32) for k, p in f.items()}
                     for m, f in sorted(factors.items())}
            for m, f in factors.items():
                for k, p in f.items():
                    p.grad = torch.from_numpy(grads[m][k])
                    p -= 0.05 * p.grad
        params = _tree(names, _torch_arrays(torch_model))
        params, state = adalora.update_and_allocate(config, state, params, _tree(names, grads), step)
        torch_model.base_model.update_and_allocate(step)
        assert int(state["budget"]) == allocator.budget_schedule(step)[0], step
        theirs = _torch_arrays(torch_model)
        ours_e = adalora._leaves(params, "default")
        for module, e in _per_module(names, theirs, "adalora_E", lambda a: tuple(a.shape)).items():
            np.testing.assert_array_equal(ours_e[module]["adalora_E"], e, err_msg=f"step {step} {module}")
        if step < SCHEDULE["total_step"] - SCHEDULE["tfinal"]:
            ema = {name: {k: allocator.exp_avg_ipt[f"{name}.{hf}.default"].numpy() for k, hf in
                          adalora.HF_NAMES.items()} for name in theirs}
            for module, s in _per_module(names, ema, "adalora_A", lambda a: tuple(a.shape)).items():
                np.testing.assert_allclose(state["sensitivity"][module]["adalora_A"], s, rtol=1e-6, atol=1e-7)
        pattern = config_pattern = torch_model.peft_config["default"].rank_pattern
        if pattern:
            kept = {name.removesuffix(".lora_E.default"): {"m": np.asarray(v)} for name, v in pattern.items()}
            for module, mask in _per_module(names, kept, "m", lambda a: tuple(a.shape)).items():
                active = np.asarray(state["active"][module])
                np.testing.assert_array_equal(np.asarray(state["mask"][module])[active], mask.astype(bool)[active])
    assert config_pattern and {k.removesuffix(".default"): v for k, v in config_pattern.items()} == (
        adalora.rank_pattern(state, model.apply_fn, variables, IDS, MASK))
    assert sum(sum(kept) for kept in config_pattern.values()) <= allocator.target_bgt


def test_orthogonal_regularization_matches_torch_peft(llama):
    """HF PEFT adds ``orth_reg_weight`` times it to the loss: the loss with weight 1 minus the loss with weight 0
    is torch's value; scanned and unscanned parameters give it too."""
    base = transformers.AutoModelForCausalLM.from_pretrained(llama["base_folder"])
    torch.manual_seed(3)
    torch_model = peft.get_peft_model(base, _torch_config(llama["targets"]))
    losses = []
    for weight in (0.0, 1.0):
        torch_model.peft_config["default"].orth_reg_weight = weight
        with torch.no_grad():
            losses.append(float(torch_model.base_model(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss))
    expected = losses[1] - losses[0]
    theirs = _torch_arrays(torch_model)
    for model in llama["models"].values():
        got = float(adalora.orthogonal_regularization(_tree(_module_names(model), theirs)))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        variables, _ = load_adapter(llama["folders"]["plain"], model.apply_fn, model.params, IDS, MASK)
        assert float(adalora.orthogonal_regularization(variables)) > 1.0  # with the stack's skipped layer left out


# ----- merge, scan, training -----

def test_merge_equals_rewritten_apply_and_unmerge_restores(llama):
    """On the scanned Llama whose stacks skip layer 1 (``layers_to_transform``)."""
    model = llama["models"][True]
    variables, config = load_adapter(llama["folders"]["plain"], model.apply_fn, model.params, IDS, MASK)
    adapted = _logits(_apply(model, config)(variables, IDS, MASK))
    merged = jaxpeft.merge(variables, config)
    assert jaxpeft.adapter_names(merged) == []
    np.testing.assert_allclose(_logits(jax.jit(model.apply_fn)(merged, IDS, MASK)), adapted, atol=1e-5, rtol=1e-5)
    restored = flatten(jaxpeft.unmerge(merged, variables, config))
    for path, leaf in flatten(variables).items():  # float32 rounding of kernel + ΔW - ΔW, with |ΔW| up to ~10
        np.testing.assert_allclose(restored[path], leaf, atol=1e-5, rtol=0, err_msg=str(path))


def test_hand_computation_for_one_dense_layer():
    """ΔW = B (A ⊙ E) * lora_alpha / (init_r + 1e-5), on the input after the layer's kernel."""
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    config = AdaLoraConfig(init_r=3, total_step=4, target_r=1, lora_alpha=5, init_lora_weights=False,
                           target_modules=["fc1"])
    variables = jaxpeft.init_adapters(jax.random.key(5), config, model.apply, model.init(jax.random.key(1), x), x)
    fc1 = variables["params"]["fc1"]
    a, e, b = (np.asarray(fc1[k]["default"], np.float64) for k in adalora.FACTORS)
    kernel = np.asarray(fc1["kernel"], np.float64) + (b @ (a * e)).T * 5 / (3 + 1e-5)
    hidden = np.maximum(np.asarray(x) @ kernel + np.asarray(fc1["bias"]), 0)
    params = variables["params"]
    hidden = np.maximum(hidden @ np.asarray(params["fc2"]["kernel"]) + np.asarray(params["fc2"]["bias"]), 0)
    expected = hidden @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
    np.testing.assert_allclose(jaxpeft.rewrite(model.apply, config)(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_default_init_matches_hf_peft(llama):
    """``init_lora_weights=True``: E zero (the model starts unchanged), A and B from N(0, 0.02²), as torch PEFT's;
    no ``ranknum`` tensor in the files, as torch PEFT saves none."""
    torch_model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama["base_folder"]),
                                      peft.AdaLoraConfig(target_modules=llama["targets"], **SCHEDULE))
    model = llama["models"][True]
    config = AdaLoraConfig(target_modules=llama["targets"], **SCHEDULE)
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, IDS, MASK)
    ours = {path[-2]: np.asarray(leaf) for path, leaf in flatten(variables).items() if path[-2] in adalora.FACTORS}
    theirs = next(iter(_torch_arrays(torch_model).values()))
    for leaf in adalora.FACTORS:
        for values in (ours[leaf], theirs[leaf]):
            if leaf == "adalora_E":
                assert not values.any()
            else:
                assert 0.01 < values.std() < 0.03, (leaf, values.std())
    assert not any("ranknum" in name for name in peft.get_peft_model_state_dict(torch_model))


def test_only_adapter_leaves_train_with_orth_reg_and_allocation():
    """A few optax steps on the loss plus the orthogonal regularization, with ``update_and_allocate`` after each:
    the factors change (E from zero too), the base and the constants stay bit-identical, and the final mask leaves
    ``target_r`` ranks per layer on average."""
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (8, 6))
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, target_modules=["fc1", "fc2"])
    variables = jaxpeft.init_adapters(jax.random.key(5), config, model.apply, model.init(jax.random.key(1), x), x)
    mask = jaxpeft.trainable_mask(variables, config)
    assert {path[-2] for path, trains in flatten(mask).items() if trains} == set(adalora.FACTORS)
    apply = jaxpeft.rewrite(model.apply, config)
    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)

    def loss(params):
        return jnp.mean(apply(params, x) ** 2) + config.orth_reg_weight * adalora.orthogonal_regularization(params)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    params, opt_state = variables, optimizer.init(variables)
    allocator = adalora.init_allocator(config, params)
    for i in range(config.total_step + 1):
        params, opt_state, grads = step(params, opt_state)
        params, allocator = adalora.update_and_allocate(config, allocator, params, grads, i)
    before, after = flatten(variables), flatten(params)
    for path, trains in flatten(mask).items():
        if trains:
            assert not np.array_equal(before[path], after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    kept = sum(int(np.asarray(m).sum()) for m in allocator["mask"].values())
    assert kept <= config.target_r * 2 and int(allocator["budget"]) == config.target_r * 2
    for name in ("fc1", "fc2"):
        e = np.asarray(params["params"][name]["adalora_E"]["default"])[:, 0]
        np.testing.assert_array_equal(e[~np.asarray(allocator["mask"][name])], 0)


# ----- what is refused -----

@pytest.mark.parametrize("options, expected", [
    ({"total_step": None}, "AdaLoRA needs total_step"),
    ({"tinit": 8, "tfinal": 3}, "leave no budgeting phase"),
    ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
    ({"orth_reg_weight": -1}, "orth_reg_weight must be >= 0"),
    ({"init_r": 0}, "init_r must be a positive integer"),
    ({"rank_pattern": {"q_proj": 2}}, "must name a module's lora_E"),
    ({"rank_pattern": {"a.lora_E": [True]}}, "must be init_r=12 booleans"),
    ({"use_dora": True}, "unknown option"),
])
def test_bad_options_are_one_line_errors(options, expected):
    with pytest.raises(jaxpeft.ConfigError, match=expected):
        AdaLoraConfig(**{"total_step": 10, **options})


def test_hf_in_training_rank_pattern_keys_are_normalised():
    config = AdaLoraConfig(init_r=2, total_step=3, rank_pattern={"m.q_proj.lora_E.default": [True, False]})
    assert config.rank_pattern == {"m.q_proj.lora_E": [True, False]}
    assert config.kept_ranks("m.q_proj").tolist() == [True, False]


# ----- the Trainer drives the allocator -----

TRAIN_DATA = [{"input_ids": [int(t) for t in np.random.default_rng(i).integers(1, 99, 5 + i % 4)]} for i in range(8)]
EVAL_DATA = TRAIN_DATA[:3]


def _trainer_args(folder, **extra):
    """11 steps (HF's global_step 0-10: warmup, budget decay and the final phase), Adam at a constant rate, no
    clipping (the allocator scores the gradients it is given)."""
    return jaxpeft.TrainingArguments(folder, **{
        "max_steps": SCHEDULE["total_step"] + 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "logging_steps": 1, "save_steps": 4,
        "disable_tqdm": True, "seed": 3, **extra})


def _trainer_model(llama):
    """A fresh AdaLoRA PeftModel on the scanned Llama (its stacks skip layer 1: ``layers_to_transform``)."""
    return jaxpeft.get_peft_model(llama["models"][True], AdaLoraConfig(target_modules=llama["targets"], **OPTIONS))


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    """One Trainer run, its model before training and its first batch."""
    model = _trainer_model(llama)
    initial = model.params
    trainer = jaxpeft.Trainer(model=model, args=_trainer_args(tmp_path_factory.mktemp("adalora_run")),
                              train_dataset=TRAIN_DATA, eval_dataset=EVAL_DATA)
    first_batch = next(iter(trainer._batch_indices(trainer._features(TRAIN_DATA), 0, 0)))
    trainer.train()
    return dict(trainer=trainer, model=model, initial=initial, first_batch=[TRAIN_DATA[int(i)] for i in first_batch])


def test_trainer_allocates_ranks_as_the_manual_loop(llama, trained):
    """The same batches through ``update_and_allocate`` after each step of the same optax optimizer, with the
    orthogonal regularization in the loss: the same masks, budget and parameters."""
    from jaxpeft import training

    trainer, model = trained["trainer"], _trainer_model(llama)
    config = model.peft_config["default"]
    mask = model.trainable_mask
    optimizer = jaxpeft.freeze(training.make_optimizer(1e-2, total_steps=11, schedule="constant")[0], mask)

    def loss(params, batch):
        logits = model.apply_fn(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (training.causal_lm_loss(logits, batch["labels"])
                + config.orth_reg_weight * adalora.orthogonal_regularization(params))

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    params, opt_state = model.params, optimizer.init(model.params)
    allocator = adalora.init_allocator(config, params)
    assert adalora.budgets(config, allocator) == (24, 12)  # 2 of the 3 layers, 3 targets, init_r=4, target_r=2
    features = trainer._features(TRAIN_DATA)
    batches = [indices for epoch in range(3) for indices in trainer._batch_indices(features, epoch, 0)]
    for number, indices in enumerate(batches[:SCHEDULE["total_step"] + 1]):
        batch = {k: jnp.asarray(v) for k, v in trainer.data_collator([features[int(i)] for i in indices]).items()}
        params, opt_state, grads = step(params, opt_state, batch)
        params, allocator = adalora.update_and_allocate(config, allocator, params, grads, number)

    ours = trainer.state.opt_state.allocator
    assert int(ours["budget"]) == int(allocator["budget"]) == 12 and bool(ours["allocated"])
    for module, kept in allocator["mask"].items():
        np.testing.assert_array_equal(ours["mask"][module], kept, err_msg=module)
    assert len({int(np.asarray(kept)[i].sum()) for kept in allocator["mask"].values() for i in (0, 2)}) > 1
    trained_leaves, expected = flatten(trained["model"].params), flatten(params)
    error = max(float(np.abs(np.asarray(trained_leaves[path]) - np.asarray(value)).max()) for path, value in
                expected.items())
    print(f"\nTrainer vs manual update_and_allocate loop: max |params difference| = {error:.2e}")
    for path, value in expected.items():
        np.testing.assert_allclose(trained_leaves[path], value, rtol=1e-6, atol=1e-6, err_msg=str(path))
    e_leaves = adalora._leaves(trained["model"].params, "default")
    for module, kept in allocator["mask"].items():
        assert not np.asarray(e_leaves[module]["adalora_E"])[~np.asarray(kept)].any(), module


def _hand_token_loss(model, params, examples):
    """Mean next-token cross-entropy over every token of ``examples`` (right-padded into one call, which a causal
    model's real positions do not see), in float64."""
    length = max(len(example["input_ids"]) for example in examples)
    ids = np.array([example["input_ids"] + [0] * (length - len(example["input_ids"])) for example in examples])
    all_logits = np.asarray(_apply(model.base_model, model.peft_config["default"])(params, ids).logits, np.float64)
    total, count = 0.0, 0
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        logits = all_logits[row, :n - 1]
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        total -= log_probs[np.arange(n - 1), ids[row, 1:n]].sum()
        count += n - 1
    return total / count


def _hand_orthogonal_regularization(params):
    """The mean of ‖A Aᵀ - I‖_F and ‖Bᵀ B - I‖_F over the adapted layers (stack entries 0 and 2), in float64."""
    norms = []
    for path, leaf in flatten(params).items():
        if path[-2] in ("adalora_A", "adalora_B"):
            for index in (0, 2):
                factor = np.asarray(leaf, np.float64)[index]
                gram = factor @ factor.T if path[-2] == "adalora_A" else factor.T @ factor
                norms.append(np.linalg.norm(gram - np.eye(len(gram))))
    assert len(norms) == 2 * 2 * 3
    return float(np.mean(norms))


def test_trainer_training_loss_adds_orthogonal_regularization_and_eval_loss_does_not(llama, trained):
    model, trainer = trained["model"], trained["trainer"]
    config = model.peft_config["default"]
    orth = _hand_orthogonal_regularization(trained["initial"])
    first = _hand_token_loss(model, trained["initial"], trained["first_batch"]) + config.orth_reg_weight * orth
    logged = next(r["loss"] for r in trainer.log_history if r.get("step") == 1 and "grad_norm" in r)
    assert orth > 0.1
    np.testing.assert_allclose(logged, first, rtol=2e-5)
    eval_loss = trainer.evaluate()["eval_loss"]
    np.testing.assert_allclose(eval_loss, _hand_token_loss(model, model.params, EVAL_DATA), rtol=2e-5)


def test_trainer_resumed_run_ends_with_the_same_params_and_allocator_state(llama, trained, tmp_path):
    class StopAfter:  # a collator that raises on its 7th call: the run killed during step 7, after checkpoint 4
        def __init__(self, collator):
            self.collator, self.calls = collator, 0

        def __call__(self, features):
            self.calls += 1
            if self.calls > 6:
                raise KeyboardInterrupt
            return self.collator(features)

    interrupted = jaxpeft.Trainer(model=_trainer_model(llama), args=_trainer_args(tmp_path), train_dataset=TRAIN_DATA)
    interrupted.data_collator = StopAfter(interrupted.data_collator)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    model = _trainer_model(llama)
    resumed = jaxpeft.Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=TRAIN_DATA)
    resumed.train(resume_from_checkpoint=True)
    assert [r["step"] for r in resumed.log_history if "grad_norm" in r] == list(range(1, 12))
    whole = trained["trainer"].state
    for name, expected, got in ((("params",), trained["model"].params, model.params),
                                (("opt_state",), whole.opt_state, resumed.state.opt_state)):
        expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
        got_leaves = jax.tree_util.tree_leaves_with_path(got)
        assert [p for p, _ in expected_leaves] == [p for p, _ in got_leaves]
        for (path, value), (_, other) in zip(expected_leaves, got_leaves, strict=True):
            np.testing.assert_array_equal(other, value, err_msg=f"{name} {jax.tree_util.keystr(path)}")
    assert int(resumed.state.opt_state.count) == 11 and model.peft_config["default"].rank_pattern


def test_trainer_saves_the_rank_pattern_and_torch_peft_loads_it(llama, trained, tmp_path):
    import json

    model, trainer = trained["model"], trained["trainer"]
    trainer.save_model(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    allocator = trainer.state.opt_state.allocator
    names = _module_names(model.base_model)
    assert len(pattern) == 2 * 3
    for module, virtual in names.items():
        for index, name in virtual.items():
            assert pattern[f"{name}.lora_E"] == np.asarray(allocator["mask"][module])[index].tolist(), name
    base = transformers.AutoModelForCausalLM.from_pretrained(llama["base_folder"]).eval()
    torch_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    for name, factors in _factor_names(torch_model).items():
        assert factors["adalora_E"].shape[0] == sum(pattern[f"{name}.lora_E"]), name
    ours = _logits(model(input_ids=IDS, attention_mask=MASK))
    expected = _torch_logits(torch_model)
    error = float(np.abs(ours[KEEP] - expected[KEEP]).max())
    print(f"\nTrainer-saved AdaLoRA -> torch PEFT: max |jaxpeft - torch PEFT| logits = {error:.2e}")
    np.testing.assert_allclose(ours[KEEP], expected[KEEP], atol=1e-4, rtol=1e-4)
    assert np.abs(expected[KEEP] - llama["base_logits"][KEEP]).max() > 1e-3
