"""Gemma 2 and Gemma 3 (text) against transformers' torch models (float32, eager attention) on the same weights.

The tiny configs make every Gemma-specific piece matter: a sliding window (4) shorter than the inputs, layers of
both types, ``query_pre_attn_scalar`` apart from ``head_dim``, soft-caps small enough to bend the scores and logits,
Gemma 3's two RoPE bases with linear scaling on the full layers, and RMSNorm weights drawn away from their zero init.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from test_torch_parity import _load_in_torch, _randomised_jax

import jaxpeft
from jaxpeft.models import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    supported_model_types,
)

torch.set_num_threads(2)

TOLERANCE = 1e-4
NEW_TOKENS = 8
SMALL = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, query_pre_attn_scalar=16, vocab_size=101, max_position_embeddings=64, sliding_window=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3, initializer_range=0.2, final_logit_softcapping=10.0,
)  # fmt: skip
CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, attn_logit_softcapping=2.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL, layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=1000.0,
        rope_local_base_freq=50.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
}  # fmt: skip
TORCH_AUTO = {
    "causal_lm": transformers.AutoModelForCausalLM,
    "seq_cls": transformers.AutoModelForSequenceClassification,
    "token_cls": transformers.AutoModelForTokenClassification,
}
# transformers has no Gemma 3 token classification class.
HEADS = {"gemma2": ("causal_lm", "seq_cls", "token_cls"), "gemma3": ("causal_lm", "seq_cls")}
AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "seq_cls": AutoModelForSequenceClassification,
    "token_cls": AutoModelForTokenClassification,
}


def padded_batch(seq_len=9):
    """Row 0 right-padded, row 1 left-padded, row 2 full; pad id 0 never appears as a real token."""
    ids = np.random.RandomState(0).randint(3, 101, (3, seq_len))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, :2] = 0
    return np.where(mask == 1, ids, 0), mask


def left_padded_prompts():
    """Prompts of 9, 7 (left-padded) and 9 real tokens: longer than the sliding window."""
    ids, mask = padded_batch()
    mask[0] = 1
    return np.where(mask == 1, np.maximum(ids, 3), 0), mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def real_tokens(logits, mask):
    return logits[mask.astype(bool)] if logits.ndim == 3 else logits


def max_diff(ours, reference, mask):
    return float(np.abs(real_tokens(np.asarray(ours), mask) - real_tokens(reference, mask)).max())


def build_family(name, tmp_path_factory):
    """Torch reference models of each head sharing random weights (norm weights away from zero), each saved to a
    folder, and the jaxpeft models loaded from them (built once, so each jits once)."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    causal_lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter_name, parameter in causal_lm.named_parameters():
            if "norm" in parameter_name:
                parameter.normal_(0.0, 0.5)
    references, folders = {"causal_lm": causal_lm}, {}
    for head in HEADS[name]:
        if head != "causal_lm":
            references[head] = TORCH_AUTO[head].from_config(config).eval()
            references[head].model.load_state_dict(causal_lm.model.state_dict())
        folders[head] = str(tmp_path_factory.mktemp(f"{name}_{head}"))
        references[head].save_pretrained(folders[head])
    ours = {head: AUTO[head].from_pretrained(folders[head]) for head in HEADS[name]}
    ours["scanned"] = AutoModelForCausalLM.from_pretrained(folders["causal_lm"], scan_layers=True)
    return dict(references=references, folders=folders, ours=ours)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> what ``build_family`` returns, built on first use."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family(name, tmp_path_factory)
        return built[name]

    return get


@pytest.fixture(params=sorted(CONFIGS))
def family(request, families):
    return families(request.param)


def test_both_types_are_served():
    assert {"gemma2", "gemma3_text"} <= set(supported_model_types())


@pytest.mark.parametrize("name, head", [(name, head) for name in sorted(CONFIGS) for head in HEADS[name]])
def test_heads_match_torch_with_padding(families, name, head):
    family = families(name)
    ids, mask = padded_batch()
    ours = family["ours"][head](ids, mask).logits
    assert max_diff(ours, torch_logits(family["references"][head], ids, mask), mask) <= TOLERANCE


def test_scanned_equals_unrolled(family):
    ids, mask = padded_batch()
    unrolled = np.asarray(family["ours"]["causal_lm"](ids, mask).logits)
    scanned = np.asarray(family["ours"]["scanned"](ids, mask).logits)
    assert max_diff(scanned, unrolled, mask) <= 1e-5
    assert max_diff(scanned, torch_logits(family["references"]["causal_lm"], ids, mask), mask) <= TOLERANCE
    kernel = family["ours"]["scanned"].params["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.shape == (3, 32, 32)


def test_remat_and_logical_axes(families):
    """Rematerialised scanned layers (Gemma 3's pattern) give the same logits; parameters carry logical axes."""
    family = families("gemma3")
    model = AutoModelForCausalLM.from_pretrained(family["folders"]["causal_lm"], scan_layers=True, remat_policy="full")
    ids, mask = padded_batch()
    reference = family["ours"]["scanned"](ids, mask).logits
    assert max_diff(model(ids, mask).logits, np.asarray(reference), mask) <= 1e-5
    layers = model.logical_axes()["params"]["model"]["layers"]
    assert tuple(layers["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(layers["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(layers["post_feedforward_layernorm"]["scale"]) == ("layers", "embed")


def test_greedy_generation_matches_torch(family):
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        expected = family["references"]["causal_lm"].generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=NEW_TOKENS,
            eos_token_id=None, pad_token_id=0,
        ).numpy()  # fmt: skip
    for model in (family["ours"]["causal_lm"], family["ours"]["scanned"]):
        np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None), expected)


def test_sampling_with_top_k_one_is_greedy(families):
    """The sampling path of the decode loop (family-independent, so on Gemma 3 only)."""
    model = families("gemma3")["ours"]["scanned"]
    ids, mask = left_padded_prompts()
    greedy = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    sampled = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(sampled, greedy)


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls"])
def test_save_pretrained_loads_in_torch(family, head, tmp_path):
    model = family["ours"]["scanned"] if head == "causal_lm" else family["ours"][head]
    model.save_pretrained(tmp_path)
    reloaded, info = TORCH_AUTO[head].from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(reloaded) is type(family["references"][head])
    ids, mask = padded_batch()
    reference = torch_logits(family["references"][head], ids, mask)
    assert max_diff(torch_logits(reloaded.eval(), ids, mask), reference, mask) <= TOLERANCE


def test_jaxpeft_lora_adapter_gives_its_logits_in_torch_peft(family, tmp_path):
    """jaxpeft LoRA on the default targets (q_proj, v_proj, as HF PEFT) of a scanned model, moved off its init,
    saved, loaded by torch PEFT on the torch base: the same logits."""
    model = jaxpeft.get_peft_model(family["ours"]["scanned"], jaxpeft.LoraConfig(r=4, lora_alpha=8))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    model = _randomised_jax(model, seed=2)
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    ours = np.asarray(model(ids, mask).logits)
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        family["folders"]["causal_lm"], attn_implementation="eager"
    ).eval()
    torch_model, problems = _load_in_torch(torch_base, tmp_path)
    assert not problems
    assert isinstance(torch_model.peft_config["default"], peft.LoraConfig)
    expected = torch_logits(torch_model, ids, mask)
    assert max_diff(ours, expected, mask) <= TOLERANCE
    assert max_diff(ours, torch_logits(family["references"]["causal_lm"], ids, mask), mask) > 1e-2


def test_torch_peft_lora_adapter_gives_its_logits_in_jaxpeft(family, tmp_path):
    """torch PEFT LoRA on q_proj/v_proj, moved off its init and saved, loaded by jaxpeft on the unrolled model."""
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        family["folders"]["causal_lm"], attn_implementation="eager"
    ).eval()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices to torch PEFT
        torch_model = peft.get_peft_model(torch_base, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for parameter in torch_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    torch_model.eval().save_pretrained(tmp_path)
    ids, mask = padded_batch()
    loaded = jaxpeft.PeftModel.from_pretrained(family["ours"]["causal_lm"], tmp_path)
    assert sorted(loaded.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert max_diff(loaded(ids, mask).logits, torch_logits(torch_model, ids, mask), mask) <= TOLERANCE


def test_base_model_in_bfloat16(families):
    """The base model with bfloat16 parameters and compute stays near float32 torch (about 2% of the scale)."""
    family = families("gemma2")
    ids, mask = padded_batch()
    base = AutoModel.from_pretrained(family["folders"]["causal_lm"], dtype="bfloat16", param_dtype="bfloat16")
    hidden = base(ids, mask).last_hidden_state
    assert hidden.dtype == jnp.bfloat16
    with torch.no_grad():
        expected = (
            family["references"]["causal_lm"]
            .model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
            .last_hidden_state.numpy()
        )
    scale = np.abs(real_tokens(expected, mask)).max()
    assert max_diff(np.asarray(hidden, np.float32), expected, mask) <= 0.1 * scale
