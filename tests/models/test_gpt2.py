"""GPT-2 against transformers' torch GPT-2: every head, scanned and unrolled, save/load round trip, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

torch.set_num_threads(2)

TOLERANCE = 1e-4
CONFIG = dict(
    n_embd=32, n_layer=3, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_labels=3,
)  # fmt: skip
AUTO = {"base": AutoModel, "causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


def padded_batch(vocab_size=101, seq_len=9):
    """Row 0 right-padded, row 1 left-padded, row 2 full; pad id 0 never appears as a real token."""
    ids = np.random.RandomState(0).randint(3, vocab_size, (3, seq_len))
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, :2] = 0
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """Torch reference models sharing one set of GPT-2 weights, each saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIG)
    causal_lm = transformers.GPT2LMHeadModel(config).eval()
    seq_cls = transformers.GPT2ForSequenceClassification(config).eval()
    seq_cls.transformer.load_state_dict(causal_lm.transformer.state_dict())
    folders = {}
    for head, model in {"causal_lm": causal_lm, "seq_cls": seq_cls, "base": causal_lm.transformer}.items():
        folders[head] = str(tmp_path_factory.mktemp(f"gpt2_{head}"))
        model.save_pretrained(folders[head])
    return {"causal_lm": causal_lm, "seq_cls": seq_cls, "base": causal_lm.transformer}, folders


def torch_output(model, ids, mask, head):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if head == "base" else out.logits).numpy()


def jax_output(model, ids, mask, head):
    out = model(input_ids=ids, attention_mask=mask)
    return np.asarray(out.last_hidden_state if head == "base" else out.logits)


def max_diff(ours, reference, mask, head):
    if head == "seq_cls":
        return np.abs(ours - reference).max()
    return np.abs(ours - reference)[mask.astype(bool)].max()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("head", ["base", "causal_lm", "seq_cls"])
def test_matches_torch(torch_models, head, scan_layers):
    models, folders = torch_models
    ids, mask = padded_batch()
    model = AUTO[head].from_pretrained(folders[head], scan_layers=scan_layers)
    assert (
        max_diff(jax_output(model, ids, mask, head), torch_output(models[head], ids, mask, head), mask, head)
        < TOLERANCE
    )


def test_base_model_checkpoint_loads_into_causal_lm(torch_models):
    models, folders = torch_models
    ids, mask = padded_batch()
    model = AutoModelForCausalLM.from_pretrained(folders["base"], scan_layers=True)  # no "transformer." prefix
    reference = torch_output(models["causal_lm"], ids, mask, "causal_lm")
    assert max_diff(jax_output(model, ids, mask, "causal_lm"), reference, mask, "causal_lm") < TOLERANCE


@pytest.mark.parametrize("head", ["base", "causal_lm", "seq_cls"])
def test_save_pretrained_loads_in_torch(torch_models, head, tmp_path):
    models, folders = torch_models
    ids, mask = padded_batch()
    model = AUTO[head].from_pretrained(folders[head], scan_layers=True)
    model.save_pretrained(tmp_path)
    torch_class = type(models[head])
    reloaded, info = torch_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = torch_output(models[head], ids, mask, head)
    assert max_diff(torch_output(reloaded.eval(), ids, mask, head), reference, mask, head) < TOLERANCE


def test_untied_lm_head(tmp_path):
    torch.manual_seed(1)
    config = transformers.GPT2Config(**dict(CONFIG, tie_word_embeddings=False))
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "torch")
    ids, mask = padded_batch()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "torch")
    assert "lm_head" in model.params["params"]
    ours = jax_output(model, ids, mask, "causal_lm")
    assert max_diff(ours, torch_output(reference, ids, mask, "causal_lm"), mask, "causal_lm") < TOLERANCE
    model.save_pretrained(tmp_path / "jax")
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "jax", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(reloaded.lm_head.weight, reference.lm_head.weight)


def test_causal_lm_checkpoint_into_classifier_reports_new_score(torch_models, caplog):
    _, folders = torch_models
    with caplog.at_level("WARNING", logger="jaxpeft"):
        model = AutoModelForSequenceClassification.from_pretrained(folders["causal_lm"], num_labels=5)
    assert "newly initialized" in caplog.text and "score" in caplog.text
    assert model.params["params"]["score"]["kernel"].shape == (32, 5)
    ids, mask = padded_batch()
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 5)


@pytest.mark.parametrize("remat_policy", [None, "full", "dots"])
def test_gradients_match_torch(torch_models, remat_policy):
    """d(sum(logits * weights))/d(layer-1 c_attn weight) against torch autograd, with and without remat."""
    models, folders = torch_models
    ids, mask = padded_batch()
    weights = np.random.RandomState(1).randn(3, 9, CONFIG["vocab_size"]).astype(np.float32) * mask[..., None]
    reference = models["causal_lm"]
    reference.zero_grad()
    logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (logits * torch.tensor(weights)).sum().backward()
    torch_grad = reference.transformer.h[1].attn.c_attn.weight.grad.numpy()

    model = AutoModelForCausalLM.from_pretrained(folders["causal_lm"], scan_layers=True, remat_policy=remat_policy)

    def loss(params):
        out = model.module.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        return jnp.sum(out.logits * weights)

    grads = jax.jit(jax.grad(loss))(model.params)
    ours = np.asarray(grads["params"]["transformer"]["h"]["attn"]["c_attn"]["kernel"][1])
    assert np.abs(ours - torch_grad).max() < TOLERANCE


def test_dropout_only_in_training(tmp_path):
    config = transformers.GPT2Config(**dict(CONFIG, resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5))
    model = AutoModelForCausalLM.from_config(config, scan_layers=True)
    ids, mask = padded_batch()
    evaluated = np.asarray(model(ids, mask).logits)
    assert np.array_equal(evaluated, np.asarray(model(ids, mask).logits))
    first = np.asarray(model(ids, mask, train=True, dropout_rng=jax.random.key(0)).logits)
    again = np.asarray(model(ids, mask, train=True, dropout_rng=jax.random.key(0)).logits)
    other = np.asarray(model(ids, mask, train=True, dropout_rng=jax.random.key(1)).logits)
    assert np.array_equal(first, again) and not np.allclose(first, other) and not np.allclose(first, evaluated)
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, mask, train=True)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_dense_modules_are_interceptable_at_hf_paths(scan_layers):
    model = AutoModelForCausalLM.from_config(transformers.GPT2Config(**CONFIG), scan_layers=scan_layers)
    seen = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Dense, nn.Embed)):
            seen.add((type(context.module).__name__, context.module.path, context.method_name))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.module.apply(model.params, jnp.ones((1, 4), jnp.int32))
    layer = ("transformer", "h") if scan_layers else ("transformer", "h", "0")
    assert ("Dense", (*layer, "attn", "c_attn"), "__call__") in seen
    assert ("Dense", (*layer, "mlp", "c_fc"), "__call__") in seen
    assert ("Embed", ("transformer", "wte"), "attend") in seen


def test_logical_axes_cover_every_parameter():
    model = AutoModelForCausalLM.from_config(transformers.GPT2Config(**CONFIG), scan_layers=True)
    specs = model.logical_axes()
    c_attn = specs["params"]["transformer"]["h"]["attn"]["c_attn"]
    assert tuple(c_attn["kernel"]) == ("layers", "embed", "heads")
    assert tuple(specs["params"]["transformer"]["wte"]["embedding"]) == ("vocab", "embed")
    shapes = jax.tree_util.tree_map(np.shape, model.params)
    ranks = jax.tree_util.tree_map(lambda spec: len(tuple(spec)), specs, is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree_util.tree_map(len, shapes, is_leaf=lambda x: isinstance(x, tuple)) == ranks


def test_bfloat16_compute_and_params(torch_models):
    models, folders = torch_models
    model = AutoModelForCausalLM.from_pretrained(folders["causal_lm"], dtype="bfloat16", param_dtype="bfloat16")
    assert model.params["params"]["transformer"]["wte"]["embedding"].dtype == jnp.bfloat16
    ids, mask = padded_batch()
    ours = jax_output(model, ids, mask, "causal_lm").astype(np.float32)
    reference = torch_output(models["causal_lm"], ids, mask, "causal_lm")
    assert max_diff(ours, reference, mask, "causal_lm") < 0.05


def test_calls_of_the_same_shape_reuse_one_compilation(torch_models):
    _, folders = torch_models
    model = AutoModelForCausalLM.from_pretrained(folders["causal_lm"])
    ids, mask = padded_batch()
    for shift in range(3):
        model(input_ids=(ids + shift) % 101, attention_mask=mask)
    assert model._forward._cache_size() == 1
