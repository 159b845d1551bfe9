"""Qwen3-MoE and Mixtral against transformers' torch models on the same random weights (float32, eager attention):
logits, router logits, the auxiliary loss, greedy generation, checkpoints both ways (per-expert and fused), scanned
stacks, and LoRA adapter files with torch PEFT. Each model is loaded and compiled once per family (fixtures)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from test_torch_parity import _load_in_torch, _randomised_jax
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import jaxpeft
from jaxpeft import sharding
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification, hub, moe

torch.set_num_threads(2)

TOLERANCE = 1e-4
NEW_TOKENS = 8
SMALL = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
    num_experts_per_tok=2, initializer_range=0.2,
)  # fmt: skip
CONFIGS = {
    # Qwen3-MoE: q/k norms, head_dim from the config, renormalised top-k, untied embeddings.
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**dict(SMALL, moe_intermediate_size=16, head_dim=16,
                                                                 num_experts=4, norm_topk_prob=True, **kw)),
    # Mixtral: a sliding window shorter than the batch so that it matters, tied embeddings.
    "mixtral": lambda **kw: transformers.MixtralConfig(**dict(SMALL, num_local_experts=4, sliding_window=4,
                                                              tie_word_embeddings=True, **kw)),
}  # fmt: skip


def padded_batch(seq_len=9):
    """Row 0 right-padded, row 1 left-padded, row 2 full; pad id 0 never appears as a real token."""
    ids = np.random.RandomState(0).randint(3, SMALL["vocab_size"], (3, seq_len))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, :2] = 0
    return np.where(mask == 1, ids, 0), mask


def left_padded_prompts():
    """Rows 0 and 2 full, row 1 left-padded by 3."""
    ids, mask = padded_batch(seq_len=7)
    mask[0] = 1
    mask[1, :3] = 0
    return np.where(mask == 1, ids, 0), mask


def torch_forward(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)


def real_tokens(logits, mask):
    return np.asarray(logits)[mask.astype(bool)]


class Family:
    """One family's torch references, their checkpoint folders and the jaxpeft models loaded from them (each
    loaded, and so compiled, once)."""

    def __init__(self, name, tmp_path_factory):
        self.name = name
        torch.manual_seed(0)
        config = CONFIGS[name]()
        config._attn_implementation = "eager"
        self.torch_lm = transformers.AutoModelForCausalLM.from_config(config).eval()
        self.torch_cls = transformers.AutoModelForSequenceClassification.from_config(config).eval()
        self.torch_cls.model.load_state_dict(self.torch_lm.model.state_dict())
        self.folders = {}
        for key, model, original_format in (("lm", self.torch_lm, True), ("lm_fused", self.torch_lm, False),
                                            ("cls", self.torch_cls, True)):
            self.folders[key] = str(tmp_path_factory.mktemp(f"{name}_{key}"))
            model.save_pretrained(self.folders[key], save_original_format=original_format)
        self.ids, self.mask = padded_batch()
        self.reference = torch_forward(self.torch_lm, self.ids, self.mask, output_router_logits=True)
        self.lm = AutoModelForCausalLM.from_pretrained(self.folders["lm"])
        self.lm_out = self.lm(self.ids, self.mask)
        self._scanned = None

    @property
    def scanned(self):
        """The causal LM with scanned layers, rematerialised."""
        if self._scanned is None:
            self._scanned = AutoModelForCausalLM.from_pretrained(self.folders["lm"], scan_layers=True,
                                                                 remat_policy="full")
        return self._scanned


_LOADED: dict[str, Family] = {}


def loaded_family(name, tmp_path_factory) -> Family:
    """The ``Family`` of that name, built on first use (tests of a single family share the fixture's)."""
    if name not in _LOADED:
        _LOADED[name] = Family(name, tmp_path_factory)
    return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    return loaded_family(request.param, tmp_path_factory)


def test_causal_lm_matches_torch(family):
    ours, reference = family.lm_out, family.reference
    logits_diff = np.abs(real_tokens(ours.logits, family.mask) - real_tokens(reference.logits, family.mask)).max()
    router = np.stack([r.numpy() for r in reference.router_logits])  # per layer (batch * seq, experts)
    router_diff = np.abs(np.asarray(ours.router_logits).reshape(router.shape) - router).max()
    print(f"{family.name}: logits max abs diff {logits_diff:.2e}, router logits {router_diff:.2e}")
    assert logits_diff <= TOLERANCE and router_diff <= TOLERANCE


def test_scanned_rematerialised_stack_equals_unrolled(family):
    scanned = family.scanned(family.ids, family.mask)
    np.testing.assert_allclose(scanned.logits, family.lm_out.logits, atol=1e-5)
    np.testing.assert_allclose(scanned.router_logits, family.lm_out.router_logits, atol=1e-5)
    assert family.scanned.params["params"]["model"]["layers"]["mlp"]["experts"]["gate_up_proj"].shape[:2] == (2, 4)


def test_sequence_classification_matches_torch(family):
    model = AutoModelForSequenceClassification.from_pretrained(family.folders["cls"], scan_layers=True)
    expected = torch_forward(family.torch_cls, family.ids, family.mask).logits.numpy()
    assert np.abs(np.asarray(model(family.ids, family.mask).logits) - expected).max() <= TOLERANCE


def test_fused_and_per_expert_checkpoints_load_alike(family):
    """transformers 5 writes one tensor per expert by default (the 4.x layout), fused when not
    save_original_format."""
    per_expert, fused = (set(hub.read_checkpoint_tensors(family.folders[key])) for key in ("lm", "lm_fused"))
    assert any(".experts.3." in name for name in per_expert)
    assert not any(name.endswith(".experts.gate_up_proj") for name in per_expert)
    assert any(name.endswith(".experts.gate_up_proj") for name in fused)
    fused = AutoModelForCausalLM.from_pretrained(family.folders["lm_fused"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, fused.params, family.lm.params))


def test_save_pretrained_loads_in_torch(family, tmp_path):
    family.scanned.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    logits = torch_forward(reloaded.eval(), family.ids, family.mask).logits
    assert np.abs(real_tokens(logits, family.mask) - real_tokens(family.reference.logits, family.mask)).max() <= 1e-5


def test_saved_files_use_the_per_expert_layout_of_transformers(family, tmp_path):
    family.lm.save_pretrained(tmp_path)
    assert set(hub.read_checkpoint_tensors(str(tmp_path))) == set(hub.read_checkpoint_tensors(family.folders["lm"]))


def torch_greedy_tokens(reference):
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        return reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0).numpy()


def generate_greedily(model):
    ids, mask = left_padded_prompts()
    return model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)


def test_greedy_generation_matches_torch(family):
    """Scanned layers here; unrolled ones (a tuple of per-layer caches) in test_dense_layers_where_the_config_says."""
    np.testing.assert_array_equal(generate_greedily(family.scanned), torch_greedy_tokens(family.torch_lm))


def test_aux_loss_matches_transformers(family):
    config = family.lm.config
    router_logits = family.lm_out.router_logits
    per_layer = tuple(torch.tensor(np.asarray(layer).reshape(-1, config.num_experts)) for layer in router_logits)
    unmasked = load_balancing_loss_func(per_layer, config.num_experts, config.num_experts_per_tok)
    np.testing.assert_allclose(moe.load_balancing_loss(router_logits, config.num_experts_per_tok),
                               unmasked.numpy(), rtol=1e-5)
    masked = moe.load_balancing_loss(router_logits, config.num_experts_per_tok, family.mask)
    np.testing.assert_allclose(masked, family.reference.aux_loss.numpy(), rtol=1e-5)
    coef = config.router_aux_loss_coef
    np.testing.assert_allclose(moe.router_aux_loss(router_logits, config, family.mask), coef * masked, rtol=1e-6)


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
# HF PEFT's expert LoRA: one A and B per expert on the fused expert tensors, beside the attention projections.
EXPERT_LORA = dict(LORA, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
LORAS = pytest.mark.parametrize("lora", [LORA, EXPERT_LORA], ids=["attention", "experts"])


@LORAS
def test_jaxpeft_lora_adapter_gives_its_logits_in_torch_peft(family, tmp_path, lora):
    model = _randomised_jax(jaxpeft.get_peft_model(family.lm, jaxpeft.LoraConfig(**lora)), seed=2)
    model.save_pretrained(tmp_path)
    ours = real_tokens(model(family.ids, family.mask).logits, family.mask)
    torch_model, problems = _load_in_torch(transformers.AutoModelForCausalLM.from_pretrained(family.folders["lm"]),
                                           tmp_path)
    assert not problems
    expected = real_tokens(torch_forward(torch_model, family.ids, family.mask).logits, family.mask)
    assert np.abs(ours - expected).max() <= TOLERANCE
    assert np.abs(expected - real_tokens(family.reference.logits, family.mask)).max() > 1e-2  # the adapter matters


@LORAS
def test_torch_peft_lora_adapter_gives_torch_logits_in_jaxpeft(family, tmp_path, lora):
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(family.folders["lm"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch PEFT's FutureWarning on transformers' is_gradient_checkpointing
        torch_model = peft.get_peft_model(base, peft.LoraConfig(**lora)).eval()
        with torch.no_grad():
            for name, parameter in torch_model.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
        torch_model.save_pretrained(tmp_path)
    expected = real_tokens(torch_forward(torch_model, family.ids, family.mask).logits, family.mask)
    loaded = jaxpeft.PeftModel.from_pretrained(family.lm, tmp_path)
    assert np.abs(real_tokens(loaded(family.ids, family.mask).logits, family.mask) - expected).max() <= TOLERANCE


def test_default_lora_targets_are_the_attention_projections(family):
    """HF PEFT's default for mixtral; HF PEFT 0.21 has none for qwen3_moe (it asks for target_modules), jaxpeft
    gives it mixtral's."""
    model = jaxpeft.get_peft_model(family.lm, jaxpeft.LoraConfig(r=2))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_logical_axes_name_the_experts_axis(family):
    layer = family.scanned.logical_axes()["params"]["model"]["layers"]["mlp"]
    assert tuple(layer["experts"]["gate_up_proj"]) == ("layers", "exp", "mlp", "embed")
    assert tuple(layer["experts"]["down_proj"]) == ("layers", "exp", "embed", "mlp")
    assert tuple(layer["gate"]["weight"]) == ("layers", "exp", "embed")
    # sharding.DEFAULT_RULES keep the experts axis whole ("exp": None), the others split as a dense MLP's.
    shardings = sharding.param_shardings(family.scanned.params, sharding.make_mesh(data=-1),
                                         family.scanned.logical_axes())
    spec = shardings["params"]["model"]["layers"]["mlp"]["experts"]["gate_up_proj"].spec
    assert tuple(spec) == (None, None, "tensor", "fsdp")
    # Expert LoRA keeps the expert tensor's axes: A drops the output axis (2 * inner), B the input axis (embed).
    adapted = jaxpeft.get_peft_model(family.scanned, jaxpeft.LoraConfig(**EXPERT_LORA))
    specs = sharding.param_specs(adapted.params, family.scanned.logical_axes())
    leaves = specs["params"]["model"]["layers"]["mlp"]["experts"]["target_parameters"]["gate_up_proj"]
    assert tuple(leaves["lora_A"]["default"]) == ("layers", "exp", None, "embed", None)
    assert tuple(leaves["lora_B"]["default"]) == ("layers", "exp", "mlp", None, None)


def test_bfloat16_compute_and_parameters(tmp_path_factory):
    family = loaded_family("qwen3_moe", tmp_path_factory)  # the family that rounds routing weights to bfloat16
    half = AutoModelForCausalLM.from_pretrained(family.folders["lm"], dtype="bfloat16", param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    out = half(family.ids, family.mask)
    assert out.logits.dtype == jnp.bfloat16
    ours = real_tokens(out.logits.astype(jnp.float32), family.mask)
    full = real_tokens(family.lm_out.logits, family.mask)
    assert np.abs(ours - full).max() <= 0.05 * np.abs(full).max()


def test_dense_layers_where_the_config_says(tmp_path):
    """Qwen3-MoE's mlp_only_layers: layer 0 has the dense MLP, layer 1 the experts; a scanned stack is refused."""
    torch.manual_seed(0)
    config = CONFIGS["qwen3_moe"](mlp_only_layers=[0])
    config._attn_implementation = "eager"
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(model.params["params"]["model"]["layers"]["0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    ids, mask = padded_batch()
    out = model(ids, mask)
    expected = torch_forward(reference, ids, mask, output_router_logits=True)
    assert np.abs(real_tokens(out.logits, mask) - real_tokens(expected.logits, mask)).max() <= TOLERANCE
    assert out.router_logits.shape == (1, 3, 9, 4) and len(expected.router_logits) == 1
    np.testing.assert_allclose(np.asarray(out.router_logits).reshape(27, 4), expected.router_logits[0], atol=TOLERANCE)
    np.testing.assert_array_equal(generate_greedily(model), torch_greedy_tokens(reference))
    with pytest.raises(ValueError, match=r"scan_layers=True needs layers of one kind, but layers \[0\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path, scan_layers=True)


def test_expert_mlp_and_its_gradients_match_a_dense_reference():
    rng = np.random.RandomState(0)
    tokens, width, inner, experts, top_k = 7, 6, 5, 4, 2
    hidden = jnp.asarray(rng.randn(tokens, width), jnp.float32)
    gate_up = jnp.asarray(rng.randn(experts, 2 * inner, width), jnp.float32)
    down = jnp.asarray(rng.randn(experts, width, inner), jnp.float32)
    weights, index = moe.route(jnp.asarray(rng.randn(tokens, experts)), top_k, normalize=False)

    def dense(hidden, gate_up, down):
        gate, up = jnp.split(jnp.einsum("th,efh->tef", hidden, gate_up), 2, axis=-1)
        per_expert = jnp.einsum("tei,ehi->teh", jax.nn.silu(gate) * up, down)
        chosen = jnp.sum(jax.nn.one_hot(index, experts) * weights[..., None], axis=1)
        return jnp.einsum("teh,te->th", per_expert, chosen)

    def routed(hidden, gate_up, down):
        return moe.expert_mlp(hidden, index, weights, gate_up, down, jax.nn.silu)

    def output_and_gradients(f):
        args = (hidden, gate_up, down)
        return f(*args), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(*args)

    both = jax.jit(lambda: (output_and_gradients(routed), output_and_gradients(dense)))
    (ours, grads), (expected, expected_grads) = both()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mixtral_routing_is_softmax_over_the_chosen_logits():
    logits = jnp.asarray(np.random.RandomState(1).randn(5, 8), jnp.float32)
    weights, index = moe.route(logits, top_k=2, normalize=True)
    chosen = jnp.take_along_axis(logits, index, axis=-1)
    np.testing.assert_allclose(weights, jax.nn.softmax(chosen, axis=-1), rtol=1e-6)


def test_mixtral_router_jitter_noise_only_in_training():
    config = CONFIGS["mixtral"](router_jitter_noise=0.5)
    block = moe.SparseMoeBlock(config)
    hidden = jnp.asarray(np.random.RandomState(2).randn(1, 3, config.hidden_size), jnp.float32)

    @jax.jit
    def still_calm_noisy():
        variables = block.init(jax.random.key(0), hidden)
        calm, noisy = ({"deterministic": flag, "rngs": {"dropout": jax.random.key(1)}} for flag in (True, False))
        return [block.apply(variables, hidden, **options)[0] for options in ({}, calm, noisy)]

    still, calm, noisy = still_calm_noisy()
    np.testing.assert_array_equal(still, calm)
    assert np.abs(np.asarray(noisy - still)).max() > 1e-3
