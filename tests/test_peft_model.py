"""get_peft_model / PeftModel: HF PEFT's workflow on jaxpeft's models, checked against torch PEFT."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

IDS = np.array([[5, 6, 7, 8, 9], [3, 4, 5, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _gpt2_config():
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(_gpt2_config()).save_pretrained(folder)
    return folder


def _family(name: str):
    """(transformers config, torch class, jaxpeft Auto class, task type) of a tiny model of family ``name``."""
    return {
        "gpt2": (_gpt2_config(), transformers.GPT2LMHeadModel, AutoModelForCausalLM, "CAUSAL_LM"),
        "bert": (transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=99, num_labels=3),
                 transformers.BertForSequenceClassification, AutoModelForSequenceClassification, "SEQ_CLS"),
        "llama": (transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=99),
                  transformers.LlamaForCausalLM, AutoModelForCausalLM, "CAUSAL_LM"),
    }[name]


def _printed(fn) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue().strip()


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_default_targets_and_trainable_parameter_line_match_torch_peft(family, tmp_path):
    config, torch_class, auto_class, task = _family(family)
    torch.manual_seed(0)
    torch_class(config).save_pretrained(tmp_path)
    torch_model = peft.get_peft_model(torch_class.from_pretrained(tmp_path),
                                      peft.LoraConfig(r=4, lora_alpha=8, task_type=task))
    model = jaxpeft.get_peft_model(auto_class.from_pretrained(tmp_path),
                                   jaxpeft.LoraConfig(r=4, lora_alpha=8, task_type=task))
    assert _printed(model.print_trainable_parameters) == _printed(torch_model.print_trainable_parameters)


def test_the_base_model_is_not_changed(gpt2):
    base = AutoModelForCausalLM.from_pretrained(gpt2)
    before = jax.tree_util.tree_structure(base.params)
    expected = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
    jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, init_lora_weights=False))
    assert jax.tree_util.tree_structure(base.params) == before
    np.testing.assert_array_equal(base(input_ids=IDS, attention_mask=MASK).logits, expected)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_outputs_disable_adapter_and_merge_and_unload(gpt2, scan_layers):
    base = AutoModelForCausalLM.from_pretrained(gpt2, scan_layers=scan_layers)
    base_logits = np.asarray(base(input_ids=IDS, attention_mask=MASK).logits)
    at_init = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4))
    np.testing.assert_array_equal(at_init(input_ids=IDS, attention_mask=MASK).logits, base_logits)

    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, target_modules="all-linear",
                                                            init_lora_weights=False))
    adapted = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    assert np.abs(adapted - base_logits).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, base_logits)
    np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, adapted)
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("inside")
    np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, adapted)

    merged = model.merge_and_unload()
    assert jaxpeft.adapter_names(merged.params) == []
    np.testing.assert_allclose(merged(input_ids=IDS, attention_mask=MASK).logits, adapted, atol=1e-4)
    np.testing.assert_array_equal(model.unload()(input_ids=IDS, attention_mask=MASK).logits, base_logits)


def test_several_adapters(gpt2):
    base = AutoModelForCausalLM.from_pretrained(gpt2)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, init_lora_weights=False))
    first = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    model.add_adapter("other", jaxpeft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False), seed=1)
    np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, first)
    model.set_adapter("other")
    other = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    assert np.abs(other - first).max() > 1e-3
    alone = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False),
                                   adapter_name="other", seed=1)
    np.testing.assert_array_equal(alone(input_ids=IDS, attention_mask=MASK).logits, other)
    with pytest.raises(ValueError, match="no adapter named 'missing'; adapters: \\['default', 'other'\\]"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", jaxpeft.LoraConfig(r=2))
    model.delete_adapter("other")
    assert model.active_adapter == "default" and jaxpeft.adapter_names(model.params) == ["default"]
    np.testing.assert_array_equal(model(input_ids=IDS, attention_mask=MASK).logits, first)


def test_generate_uses_the_adapter(gpt2):
    base = AutoModelForCausalLM.from_pretrained(gpt2)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False))
    prompt = np.array([[0, 5, 6, 7]])
    mask = np.array([[0, 1, 1, 1]])
    with model.disable_adapter():
        plain = model.generate(prompt, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    np.testing.assert_array_equal(plain, base.generate(prompt, attention_mask=mask, max_new_tokens=8,
                                                       eos_token_id=None))
    merged = model.merge_and_unload()
    np.testing.assert_array_equal(model.generate(prompt, attention_mask=mask, max_new_tokens=8, eos_token_id=None),
                                  merged.generate(prompt, attention_mask=mask, max_new_tokens=8, eos_token_id=None))


def test_functional_pieces_train_only_the_adapter(gpt2):
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2), jaxpeft.LoraConfig(r=4))
    trainable, frozen = jaxpeft.partition(model.params, model.trainable_mask)

    def loss(trainable):
        logits = model.apply_fn(jaxpeft.combine(trainable, frozen), jnp.asarray(IDS), jnp.asarray(MASK)).logits
        return jnp.mean(logits ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    leaves = {p: g for p, g in jaxpeft.tree.flatten(grads).items() if g is not None}
    assert leaves and all(p[-2] in ("lora_A", "lora_B") for p in leaves)


def test_save_pretrained_and_from_pretrained_round_trip(gpt2, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(gpt2)
    model = jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("second", jaxpeft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False), seed=3)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "second"]
    expected = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    reloaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    np.testing.assert_allclose(reloaded(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-6)
    assert reloaded.get_nb_trainable_parameters()[0] == 0
    trainable = jaxpeft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    reloaded.load_adapter(tmp_path / "second", "second")
    reloaded.set_adapter("second")
    model.set_adapter("second")
    np.testing.assert_allclose(reloaded(input_ids=IDS, attention_mask=MASK).logits,
                               model(input_ids=IDS, attention_mask=MASK).logits, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_ia3_defaults_match_torch_peft(family, tmp_path):
    config, torch_class, auto_class, task = _family(family)
    torch.manual_seed(0)
    torch_class(config).save_pretrained(tmp_path)
    torch_model = peft.get_peft_model(torch_class.from_pretrained(tmp_path), peft.IA3Config(task_type=task))
    model = jaxpeft.get_peft_model(auto_class.from_pretrained(tmp_path), jaxpeft.IA3Config(task_type=task))
    assert _printed(model.print_trainable_parameters) == _printed(torch_model.print_trainable_parameters)
    base = auto_class.from_pretrained(tmp_path)
    # IA3 starts at ones: the identity, up to XLA fusing the adapted graph differently (float32 rounding)
    np.testing.assert_allclose(model(input_ids=IDS, attention_mask=MASK).logits,
                               base(input_ids=IDS, attention_mask=MASK).logits, rtol=0, atol=1e-6)


def test_bitfit_trains_every_bias(gpt2):
    base = AutoModelForCausalLM.from_pretrained(gpt2)
    model = jaxpeft.get_peft_model(base, jaxpeft.BitFitConfig())
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(gpt2)
    biases = sum(p.numel() for name, p in torch_model.named_parameters() if name.endswith(".bias"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == biases
    assert total == sum(p.numel() for p in torch_model.parameters()) + biases
