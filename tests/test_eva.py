"""EVA initialisation of LoRA (jaxpeft.eva) against torch PEFT's ``initialize_lora_eva_weights`` on a tiny Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.config import ConfigError
from jaxpeft.core import AdapterError
from jaxpeft.eva import EvaConfig, distribute_ranks, initialize_lora_eva_weights, principal_components
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.tree import flatten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, RHO = 4, 8, 2.0
# Measured: HF PEFT's randomized incremental SVD (float32) against jaxpeft's exact float64 SVD, max |A^T A - A'^T A'|
# 4.8e-4 over all 14 layers, every component's |cosine| >= 0.99999.
PROJECTOR_ATOL = 2e-3


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (4, 16))
    mask = np.ones_like(ids)
    mask[1, 12:], mask[3, 10:] = 0, 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100  # a prompt the label mask leaves out of the SVD
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=99, pad_token_id=0)
    config._attn_implementation = "eager"
    folder = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _eva_pair(folder, r, rho):
    """(torch PEFT model after EVA, jaxpeft PeftModel after EVA, jaxpeft base model, batch, base folder)."""
    batch = _batch()
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf = peft.get_peft_model(torch_base, peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         init_lora_weights="eva",
                                                         eva_config=peft.EvaConfig(rho=rho)))
    peft.initialize_lora_eva_weights(hf, dataloader=[{k: torch.tensor(v) for k, v in batch.items()}],
                                     show_progress_bar=False)
    base = AutoModelForCausalLM.from_pretrained(folder)
    # LoraConfig does not take init_lora_weights="eva" yet: a plain adapter, whose A and ranks EVA replaces.
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=TARGETS))
    initialize_lora_eva_weights(model, [batch], eva_config=EvaConfig(rho=rho))
    return hf, model, base, batch, folder


@pytest.fixture(scope="module")
def models(llama_folder):
    return _eva_pair(llama_folder, R, RHO)


@pytest.fixture(scope="module")
def models_with_dropped_layers(llama_folder):
    """r=1, rho=8: EVA gives some layers rank 0 (measured: layer 0's k, v and both down_proj)."""
    return _eva_pair(llama_folder, 1, 8.0)


def _hf_lora_a(hf):
    return {name.removeprefix("base_model.model."): module.lora_A["default"].weight.detach().numpy()
            for name, module in hf.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


def _jax_lora_a(model):
    return {".".join(path[1:-2]): np.asarray(leaf).T for path, leaf in flatten(model.params).items()
            if path[-2:] == ("lora_A", "default")}


@pytest.mark.parametrize("pair", ["models", "models_with_dropped_layers"])
def test_ranks_and_subspaces_match_torch_peft(pair, request):
    hf, model, *_ = request.getfixturevalue(pair)
    hf_config, config = hf.peft_config["default"], model.peft_config["default"]
    assert hf_config.rank_pattern and config.rank_pattern == hf_config.rank_pattern  # ranks did move (rho > 1)
    assert config.alpha_pattern == hf_config.alpha_pattern
    hf_a, jax_a = _hf_lora_a(hf), _jax_lora_a(model)
    assert sorted(hf_a) == sorted(jax_a)
    if pair == "models":
        assert len(jax_a) == 2 * len(TARGETS)
    else:  # the layers EVA dropped are no longer targeted
        assert len(jax_a) < 2 * len(TARGETS) and sorted(config.target_modules) == sorted(hf_config.target_modules)
    for name, a in jax_a.items():
        b = hf_a[name].astype(np.float64)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a.T @ a, b.T @ b, atol=PROJECTOR_ATOL, err_msg=name)
        cosine = np.abs(np.sum(a * b, axis=1)) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.999, name


@pytest.mark.parametrize("pair", ["models", "models_with_dropped_layers"])
def test_saved_adapter_loads_in_torch_peft_with_eva_ranks(pair, request, tmp_path):
    hf, model, _, batch, folder = request.getfixturevalue(pair)
    model.save_pretrained(tmp_path)
    torch_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
                                                 tmp_path).eval()
    loaded, ours = _hf_lora_a(torch_model), _jax_lora_a(model)
    assert sorted(loaded) == sorted(ours)
    for name, a in ours.items():
        np.testing.assert_allclose(loaded[name], a, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("pair", ["models", "models_with_dropped_layers"])
def test_torch_eva_adapter_loads_in_jaxpeft(pair, request, tmp_path):
    hf, _, base, _, _ = request.getfixturevalue(pair)
    hf.save_pretrained(tmp_path)  # init_lora_weights="eva", eva_config, rank_pattern, alpha_pattern
    loaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].rank_pattern == hf.peft_config["default"].rank_pattern
    ours, theirs = _jax_lora_a(loaded), _hf_lora_a(hf)
    assert sorted(ours) == sorted(theirs)
    for name, a in ours.items():
        np.testing.assert_array_equal(a, theirs[name], err_msg=name)


def test_model_starts_unchanged(models):
    _, model, base, batch, _ = models
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    np.testing.assert_allclose(np.asarray(model(**inputs).logits), np.asarray(base(**inputs).logits), atol=1e-6)


def test_training_after_eva_lowers_the_loss(models):
    _, model, _, batch, _ = models
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    labels = jnp.asarray(batch["labels"])
    apply_fn, trainable = model.apply_fn, model.trainable_mask

    def loss_fn(params):
        out = apply_fn(params, input_ids=ids, attention_mask=mask)
        logits = out.logits if hasattr(out, "logits") else out["logits"]
        target, keep = labels[:, 1:], labels[:, 1:] != -100
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.where(keep, target, 0))
        return jnp.sum(losses * keep) / keep.sum()

    labels_of = jax.tree_util.tree_map(lambda train: "train" if train else "frozen", trainable)
    optimizer = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels_of)
    params, state = model.params, optimizer.init(model.params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(4):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    before, after = flatten(model.params), flatten(params)
    flat_mask = flatten(trainable)
    assert any(not np.array_equal(before[p], after[p]) for p in before if p[-2] == "lora_B")
    assert all(np.array_equal(before[p], after[p]) for p in before if not flat_mask[p])


def test_distribution_hand_computed():
    # Layer "b" shares "a"'s input: its ratios are a's, and a gets the larger count.
    ratios = {("a",): np.array([0.5, 0.2, 0.1]), ("b",): np.array([0.5, 0.2, 0.1]), ("c",): np.array([0.3, 0.25])}
    assert distribute_ranks(ratios, 4, {("b",): ("a",)}) == {("a",): 1, ("b",): 1, ("c",): 2}
    assert distribute_ranks(ratios, 5, {("b",): ("a",)}) == {("a",): 2, ("b",): 1, ("c",): 2}
    x = np.random.default_rng(1).normal(size=(50, 6)) @ np.diag([5.0, 3, 1, 1, 1, 1])
    components, ratio, _ = principal_components(x, 2)
    centered = x - x.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
    np.testing.assert_allclose(np.abs(components @ eigenvectors[:, ::-1][:, :2]), np.eye(2), atol=1e-8)
    np.testing.assert_allclose(ratio, eigenvalues[::-1][:2] / eigenvalues.sum(), rtol=1e-10)


def test_refusals(models):
    with pytest.raises(ConfigError, match="rho"):
        EvaConfig(rho=0.5)
    _, _, base, batch, _ = models
    pissa = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="init_lora_weights=True"):
        initialize_lora_eva_weights(pissa, [batch])
    scanned = AutoModelForCausalLM.from_pretrained(models[4], scan_layers=True)
    model = jaxpeft.get_peft_model(scanned, jaxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="unscanned"):
        initialize_lora_eva_weights(model, [batch])
