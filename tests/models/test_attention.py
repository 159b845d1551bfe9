"""Attention masks, prefix key/values (prefix tuning) against torch past_key_values, cached decoding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModelForCausalLM, init_cache
from jaxpeft.models.attention import make_attention_mask

torch.set_num_threads(2)

TOLERANCE = 1e-4
NUM_VIRTUAL = 3
CONFIGS = {
    "gpt2": transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, pad_token_id=0,
    ),
    "llama": transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, pad_token_id=0,
    ),
}  # fmt: skip


def expected_mask(key_mask, query_length, offset, window, num_prefix):
    """The rule written out element by element."""
    batch, slots = key_mask.shape
    out = np.zeros((batch, 1, query_length, num_prefix + slots), bool)
    for b in range(batch):
        for q in range(query_length):
            out[b, 0, q, :num_prefix] = True
            for k in range(slots):
                visible = k <= offset + q and (window is None or offset + q - k < window)
                out[b, 0, q, num_prefix + k] = visible and key_mask[b, k] == 1
    return out


@pytest.mark.parametrize("offset,window,num_prefix", [(0, None, 0), (0, 3, 2), (4, None, 0), (4, 2, 1)])
def test_mask_rule(offset, window, num_prefix):
    key_mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1, 1]])
    query_length = 9 - offset if offset == 0 else 3
    ours = make_attention_mask(
        jnp.asarray(key_mask), query_length, query_offset=offset, sliding_window=window, num_prefix_tokens=num_prefix
    )
    np.testing.assert_array_equal(np.asarray(ours), expected_mask(key_mask, query_length, offset, window, num_prefix))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]).eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, folder


def batch():
    ids = np.random.RandomState(0).randint(3, 101, (2, 8))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, :2] = 0
    return np.where(mask == 1, ids, 0), mask


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_prefix_key_values_match_torch_past_key_values(family, scan_layers):
    """Prefix tuning: per-layer key/values in front, always attended, real tokens keep positions 0..T-1."""
    name, reference, folder = family
    model = AutoModelForCausalLM.from_pretrained(folder, scan_layers=scan_layers)
    spec = model.module.cache_spec()
    ids, mask = batch()
    shape = (spec.num_layers, 2, NUM_VIRTUAL, spec.num_kv_heads, spec.head_dim)
    keys, values = (np.random.RandomState(seed).randn(*shape).astype(np.float32) for seed in (1, 2))
    ours = model(ids, mask, prefix_key_values=(jnp.asarray(keys), jnp.asarray(values))).logits

    past = transformers.DynamicCache()
    for layer in range(spec.num_layers):
        past.update(torch.tensor(keys[layer]).transpose(1, 2), torch.tensor(values[layer]).transpose(1, 2), layer)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(np.concatenate([np.ones((2, NUM_VIRTUAL), int), mask], axis=1)),
            position_ids=torch.arange(8).expand(2, 8),
            cache=past,
        ).logits.numpy()
    assert np.abs(np.asarray(ours) - expected)[mask.astype(bool)].max() < TOLERANCE


def test_prefix_key_values_of_the_wrong_shape_are_explained(family):
    _, _, folder = family
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = batch()
    wrong = jnp.zeros((1, 2, NUM_VIRTUAL, 2, 8))
    with pytest.raises(ValueError, match="num_layers, batch, num_virtual_tokens"):
        model(ids, mask, prefix_key_values=(wrong, wrong))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_cached_decoding_matches_torch_full_forward(family, scan_layers):
    """Prompt into the cache, then one token at a time: each step's logits equal torch's on the whole sequence."""
    _, reference, folder = family
    model = AutoModelForCausalLM.from_pretrained(folder, scan_layers=scan_layers)
    ids, mask = batch()
    ids, mask = ids[1:], mask[1:]  # left-padded row
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    cache = init_cache(model.module.cache_spec(), batch_size=1, max_length=8)
    out = model(ids[:, :5], mask, position_ids=positions[:, :5], cache=cache)
    steps = [np.asarray(out.logits)[:, -1]]
    for t in range(5, 8):
        out = model(ids[:, t : t + 1], mask, position_ids=positions[:, t : t + 1], cache=out.cache)
        steps.append(np.asarray(out.logits)[:, -1])
    assert np.abs(np.stack(steps, axis=1) - expected[:, 4:]).max() < TOLERANCE
