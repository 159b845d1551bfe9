"""Generation against transformers' torch generate: greedy tokens, EOS handling, sampling controls."""

import flax.linen as nn
import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModelForCausalLM, generate
from jaxpeft.models.generation import filter_logits

torch.set_num_threads(2)

NEW_TOKENS = 20
CONFIGS = {
    "gpt2": transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2,
    ),
    "llama": transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,
    ),
}  # fmt: skip


def left_padded_prompts():
    ids = np.random.RandomState(0).randint(3, 101, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return np.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]).eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, folder


def torch_generate(reference, ids, mask, **kwargs):
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs
        )
    return out.numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_greedy_matches_torch(family, scan_layers):
    _, reference, folder = family
    ids, mask = left_padded_prompts()
    model = AutoModelForCausalLM.from_pretrained(folder, scan_layers=scan_layers)
    expected = torch_generate(reference, ids, mask, eos_token_id=None, pad_token_id=0)
    ours = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert expected.shape == (3, 7 + NEW_TOKENS)
    np.testing.assert_array_equal(ours, expected)


def test_eos_finishes_rows_like_torch(family):
    _, reference, folder = family
    ids, mask = left_padded_prompts()
    free_running = torch_generate(reference, ids, mask, eos_token_id=None, pad_token_id=0)
    # Row 0's third new token becomes EOS: row 0 stops early, the others go on (or stop where they hit it).
    eos = int(free_running[0, 7 + 2])
    expected = torch_generate(reference, ids, mask, eos_token_id=eos, pad_token_id=0)
    model = AutoModelForCausalLM.from_pretrained(folder, scan_layers=True)
    ours = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(ours, expected)
    assert ours[0, 7 + 2] == eos and np.all(ours[0, 7 + 3 :] == 0)


def test_stops_when_every_row_has_finished(family):
    _, reference, folder = family
    ids, mask = left_padded_prompts()
    free_running = torch_generate(reference, ids[:1], np.ones((1, 7)), eos_token_id=None, pad_token_id=0)
    eos = int(free_running[0, 7 + 1])
    stop = 7 + 1 + int(np.argmax(free_running[0, 7:] == eos))  # the first time it appears
    model = AutoModelForCausalLM.from_pretrained(folder, scan_layers=True)
    ours = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    np.testing.assert_array_equal(ours, free_running[:, :stop])


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS["gpt2"], seed=3, scan_layers=True)


def test_sampling_is_seeded(gpt2_model):
    ids, mask = left_padded_prompts()
    sample = dict(max_new_tokens=NEW_TOKENS, do_sample=True, eos_token_id=None, temperature=1.5)
    first = gpt2_model.generate(ids, mask, seed=0, **sample)
    np.testing.assert_array_equal(first, gpt2_model.generate(ids, mask, seed=0, **sample))
    assert not np.array_equal(first, gpt2_model.generate(ids, mask, seed=1, **sample))


def test_top_k_one_and_tiny_top_p_are_greedy(gpt2_model):
    ids, mask = left_padded_prompts()
    greedy = gpt2_model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    top_k = gpt2_model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=True, top_k=1)
    top_p = gpt2_model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=True, top_p=1e-6)
    np.testing.assert_array_equal(top_k, greedy)
    np.testing.assert_array_equal(top_p, greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 10, 0.5)])
def test_logit_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    expected = torch.tensor(logits)
    for warper in warpers:
        expected = warper(None, expected)
    ours = np.asarray(filter_logits(logits, temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
    kept = ~np.isinf(ours)
    np.testing.assert_allclose(ours[kept], expected.numpy()[kept], rtol=1e-6)


def test_generate_runs_a_rewritten_apply_function(gpt2_model):
    """The functional generate takes any apply with module.apply's signature (as the PEFT core provides)."""
    calls = []

    def count_dense(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense):
            calls.append(context.module.path)
        return next_fun(*args, **kwargs)

    def intercepted_apply(variables, *args, **kwargs):
        with nn.intercept_methods(count_dense):
            return gpt2_model.module.apply(variables, *args, **kwargs)

    ids, mask = left_padded_prompts()
    spec = gpt2_model.module.cache_spec()
    ours = generate(intercepted_apply, gpt2_model.params, spec, ids, mask, max_new_tokens=5, pad_token_id=0)
    np.testing.assert_array_equal(ours, gpt2_model.generate(ids, mask, max_new_tokens=5, eos_token_id=None))
    assert ("transformer", "h", "attn", "c_attn") in calls


def test_bad_generate_inputs_are_explained(gpt2_model):
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left padding"):
        gpt2_model.generate(ids, mask[:, ::-1], max_new_tokens=3)
    with pytest.raises(ValueError, match="Nothing to generate"):
        gpt2_model.generate(ids, mask, max_length=5)
    with pytest.raises(ValueError, match="temperature"):
        gpt2_model.generate(ids, mask, max_new_tokens=3, do_sample=True, temperature=0.0)
