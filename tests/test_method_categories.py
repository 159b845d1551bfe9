"""HF PEFT's test categories, for every method on tiny GPT-2, BERT and Llama models.

For each method and family: identity at init (where the method has one), only the method's parameters change in a
training step, merge (merged == adapted == merge_and_unload, or a clear error for methods that cannot merge),
disable_adapter (also when the block raises), save -> load writes the two files and reproduces the outputs,
set/delete/unknown adapter names, and a mixed batch reproducing each row (methods that act on layers).
"""

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jaxpeft
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

IDS = np.array([[5, 6, 7, 8, 9], [0, 3, 4, 5, 6]])
MASK = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])

FAMILIES = {
    "gpt2": lambda: AutoModelForCausalLM.from_config(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=32, pad_token_id=0), seed=0),
    "bert": lambda: AutoModelForSequenceClassification.from_config(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=60,
        num_labels=3), seed=0),
    "llama": lambda: AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, pad_token_id=0), seed=0),
}


def _task(family):
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


@dataclasses.dataclass(frozen=True)
class Method:
    make_config: object  # task type -> config
    identity_at_init: bool
    mergeable: bool
    layer_method: bool = True  # acts on layers: can share a mixed batch


METHODS = {
    "lora": Method(lambda task: jaxpeft.LoraConfig(r=4, lora_alpha=8, task_type=task), True, True),
    "rslora": Method(lambda task: jaxpeft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, task_type=task), True, True),
    "dora": Method(lambda task: jaxpeft.LoraConfig(r=4, use_dora=True, task_type=task), True, True),
    "ia3": Method(lambda task: jaxpeft.IA3Config(task_type=task), True, True),
    "bitfit": Method(lambda task: jaxpeft.BitFitConfig(task_type=task), True, True),
    "bottleneck": Method(lambda task: jaxpeft.AdapterConfig(reduction_factor=4, task_type=task), True, False),
    "prompt": Method(lambda task: jaxpeft.PromptTuningConfig(num_virtual_tokens=3, task_type=task), False, False,
                     layer_method=False),
    "prefix": Method(lambda task: jaxpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type=task), False, False,
                     layer_method=False),
    "loha": Method(lambda task: jaxpeft.LoHaConfig(r=2, alpha=4, task_type=task), True, True),
    "lokr": Method(lambda task: jaxpeft.LoKrConfig(r=2, alpha=4, task_type=task), True, True),
    "vera": Method(lambda task: jaxpeft.VeraConfig(r=8, task_type=task), True, True),
    "oft": Method(lambda task: jaxpeft.OFTConfig(oft_block_size=8, r=0, task_type=task), True, True),
    "boft": Method(lambda task: jaxpeft.BOFTConfig(boft_block_size=4, task_type=task), True, True),
    "ln_tuning": Method(lambda task: jaxpeft.LNTuningConfig(task_type=task), True, True),
    "trainable_tokens": Method(lambda task: jaxpeft.TrainableTokensConfig(token_indices=[3, 5, 7], task_type=task),
                               True, True),
    "p_tuning": Method(lambda task: jaxpeft.PromptEncoderConfig(num_virtual_tokens=3, task_type=task), False, False,
                       layer_method=False),
}
# LoRA on every family; the other methods on two each, so that every family meets most methods (each method's own
# test file covers the families more deeply). Llama layers have no biases: BitFit refuses them
# (test_bitfit_on_a_model_without_biases).
OTHER_FAMILIES = {"rslora": ("bert", "llama"), "dora": ("llama", "gpt2"), "ia3": ("gpt2", "llama"),
                  "bitfit": ("bert", "gpt2"), "bottleneck": ("llama", "bert"), "prompt": ("gpt2", "bert"),
                  "prefix": ("llama", "bert"), "loha": ("llama",), "lokr": ("bert",), "vera": ("gpt2",),
                  "oft": ("llama",), "boft": ("bert",), "ln_tuning": ("gpt2",), "trainable_tokens": ("llama",),
                  "p_tuning": ("gpt2",)}
CASES = [("lora", family) for family in FAMILIES] + [
    (method, family) for method, families in OTHER_FAMILIES.items() for family in families]


def _logits(model, **kwargs):
    return np.asarray(model(IDS, MASK, **kwargs).logits)


def _randomize(model, adapter_name, seed):
    """Moves every trainable leaf of the adapter away from its initial value."""
    model.set_adapter(adapter_name)
    flags = jax.tree_util.tree_leaves(model.trainable_mask)
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    model.params = jax.tree_util.tree_unflatten(treedef, [
        leaf + 0.2 * jax.random.normal(key, jnp.shape(leaf)) if flag else leaf
        for leaf, flag, key in zip(leaves, flags, keys, strict=True)])


@pytest.fixture(scope="module")
def bases():
    return {family: make() for family, make in FAMILIES.items()}


@pytest.mark.parametrize("method, family", CASES)
def test_init_training_step_and_disable(bases, method, family):
    spec, base = METHODS[method], bases[family]
    base_logits = _logits(base)
    model = jaxpeft.get_peft_model(base, spec.make_config(_task(family)))
    if spec.identity_at_init:
        np.testing.assert_allclose(_logits(model), base_logits, atol=1e-6)

    mask = model.trainable_mask
    optimizer = jaxpeft.freeze(optax.adam(1e-2), mask)
    labels = jnp.asarray(np.arange(IDS.shape[0]) % 3) if family == "bert" else None

    def loss(params):
        logits = model.apply_fn(params, jnp.asarray(IDS), jnp.asarray(MASK)).logits
        if labels is not None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        logits = logits[:, -IDS.shape[1]:]  # prompt tuning's logits start with the virtual tokens
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(IDS)[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = model.params
    state = optimizer.init(params)
    for _ in range(2):  # two steps: B of LoRA starts at zero, A gets no gradient in the first step
        params, state = step(params, state)
    changed = jax.tree_util.tree_map(lambda old, new: bool(jnp.any(old != new)), model.params, params)
    flat_changed, flat_mask = jaxpeft.tree.flatten(changed), jaxpeft.tree.flatten(mask)
    assert any(flat_changed[p] for p in flat_mask if flat_mask[p]), "no trainable leaf changed"
    assert not any(flat_changed[p] for p in flat_mask if not flat_mask[p]), "a frozen leaf changed"

    model.params = params
    adapted = _logits(model)
    assert np.abs(adapted[:, -IDS.shape[1]:] - base_logits).max() > 1e-5
    with model.disable_adapter():
        np.testing.assert_array_equal(_logits(model), base_logits)
    np.testing.assert_array_equal(_logits(model), adapted)
    with contextlib.suppress(RuntimeError), model.disable_adapter():
        raise RuntimeError("inside the block")
    np.testing.assert_array_equal(_logits(model), adapted)


@pytest.mark.parametrize("method, family", CASES)
def test_merge(bases, method, family):
    spec = METHODS[method]
    model = jaxpeft.get_peft_model(bases[family], spec.make_config(_task(family)))
    _randomize(model, "default", 1)
    if not spec.mergeable:
        with pytest.raises(jaxpeft.AdapterError, match="cannot be merged"):
            model.merge_and_unload()
        return
    adapted = _logits(model)
    merged_model = model.merge_and_unload()
    np.testing.assert_allclose(_logits(merged_model), adapted, atol=1e-4)
    config = model.peft_config["default"]
    merged = jaxpeft.merge(model.params, config)
    np.testing.assert_allclose(np.asarray(bases[family].apply_fn(merged, IDS, MASK).logits), adapted, atol=1e-4)
    restored = jaxpeft.unmerge(merged, model.params, config)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(model.params), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("method, family", CASES)
def test_save_load_names_and_mixed_batch(bases, method, family, tmp_path):
    spec, base = METHODS[method], bases[family]
    model = jaxpeft.get_peft_model(base, spec.make_config(_task(family)))
    _randomize(model, "default", 2)
    model.add_adapter("other", spec.make_config(_task(family)), seed=5)
    _randomize(model, "other", 3)
    model.set_adapter("default")
    default_logits = _logits(model)
    model.set_adapter("other")
    other_logits = _logits(model)
    assert np.abs(default_logits - other_logits).max() > 1e-5

    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    np.testing.assert_allclose(_logits(reloaded), default_logits, atol=1e-5)
    reloaded.load_adapter(tmp_path / "other", "other")
    reloaded.set_adapter("other")
    np.testing.assert_allclose(_logits(reloaded), other_logits, atol=1e-5)

    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        model.set_adapter("missing")
    if spec.layer_method:
        mixed = _logits(model, adapter_names=["other", "default"])
        np.testing.assert_allclose(mixed[0], other_logits[0], atol=1e-5)
        np.testing.assert_allclose(mixed[1], default_logits[1], atol=1e-5)
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    np.testing.assert_array_equal(_logits(model), default_logits)
    assert jaxpeft.adapter_names(model.params) == ["default"]


def test_bitfit_on_a_model_without_biases(bases):
    with pytest.raises(jaxpeft.AdapterError, match="this model has no biases for BitFit to train"):
        jaxpeft.get_peft_model(bases["llama"], jaxpeft.BitFitConfig())
