"""Attention masks and kernels, prefix key/values (prefix tuning) against torch past_key_values, cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpeft.models import AutoModelForCausalLM, attention_kernels, init_cache
from jaxpeft.models.attention import AttentionMask

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


def expected_mask(key_mask, query_length, offset, window, num_prefix, causal=True):
    """The rule written out element by element: a key is seen when it is not padding (0), lies in the query's
    segment (a padding query sees every segment), is not later (causal) and lies within the window."""
    batch, slots = key_mask.shape
    out = np.zeros((batch, 1, query_length, num_prefix + slots), bool)
    for b in range(batch):
        for q in range(query_length):
            out[b, 0, q, :num_prefix] = True
            segment = key_mask[b, offset + q]
            for k in range(slots):
                visible = (not causal or k <= offset + q) and (window is None or offset + q - k < window)
                same_segment = segment == 0 or key_mask[b, k] == segment
                out[b, 0, q, num_prefix + k] = visible and key_mask[b, k] != 0 and same_segment
    return out


MASKS = {
    "padding": np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 1, 1]]),
    "packed": np.array([[1, 1, 2, 2, 2, 3, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2, 2]]),
}


@pytest.mark.parametrize("masks", sorted(MASKS))
@pytest.mark.parametrize("offset,window,num_prefix", [(0, None, 0), (0, 3, 2), (4, None, 0), (4, 2, 1)])
def test_mask_rule(offset, window, num_prefix, masks):
    key_mask = MASKS[masks]
    query_length = 9 - offset if offset == 0 else 3
    ours = AttentionMask(
        jnp.asarray(key_mask), jnp.asarray(offset, jnp.int32), None if window is None else jnp.asarray(window),
        query_length=query_length, num_prefix_tokens=num_prefix, has_cache=offset != 0,
    )
    expected = expected_mask(key_mask, query_length, offset, window, num_prefix)
    np.testing.assert_array_equal(np.asarray(ours.rows()), expected)


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


def hand_attention(query, key, value, mask, scale, softcap=None):
    """Grouped-query softmax attention in float64 numpy on a dense boolean mask (batch, 1, T, S)."""
    query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
    group = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, group, axis=2), np.repeat(value, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", query, key) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(mask, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", scores / scores.sum(-1, keepdims=True), value)


# (attention_mask, query offset (a cache when > 0), prefix tokens, sliding window, causal)
KERNEL_CASES = {
    "right-padding": (MASKS["padding"][::-1].copy(), 0, 0, None, True),
    "left-padding": (MASKS["padding"], 0, 0, None, True),
    "packed": (MASKS["packed"], 0, 0, None, True),
    "prefix+window": (MASKS["packed"], 0, 2, 3, True),
    "cache": (MASKS["padding"], 4, 1, None, True),
    "bidirectional": (MASKS["packed"], 0, 0, None, False),
}


def kernel_inputs(case):
    key_mask, offset, num_prefix, window, causal = KERNEL_CASES[case]
    query_length = key_mask.shape[1] - offset if offset == 0 else 3
    mask = AttentionMask(
        jnp.asarray(key_mask), jnp.asarray(offset, jnp.int32),
        None if window is None else jnp.asarray(window, jnp.int32), query_length=query_length,
        num_prefix_tokens=num_prefix, causal=causal, has_cache=offset > 0,
    )
    rng = np.random.RandomState(0)
    query = rng.randn(2, query_length, 4, 8).astype(np.float32)
    key, value = (rng.randn(2, num_prefix + key_mask.shape[1], 2, 8).astype(np.float32) for _ in range(2))
    dense = expected_mask(key_mask, query_length, offset, window, num_prefix, causal)
    real = np.asarray(key_mask)[:, offset : offset + query_length] != 0  # queries that are not padding
    return mask, (query, key, value), dense, real


@pytest.mark.parametrize(
    "case,softcap", [(case, None) for case in sorted(KERNEL_CASES)] + [("packed", 5.0), ("prefix+window", 5.0)]
)
def test_chunked_attention_equals_the_hand_computation(case, softcap):
    mask, (query, key, value), dense, real = kernel_inputs(case)
    with np.errstate(invalid="ignore"):  # padding queries of the packed rows see nothing; they are not compared
        expected = hand_attention(query, key, value, dense, 0.3, softcap)
    blocks = (("xla", None), ("xla", 2), ("xla", 4), ("xla_chunked", 2), ("xla_chunked", 4), ("xla_chunked", 64))
    for implementation, block_size in blocks:
        ours = attention_kernels.attend(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value),
                                        mask.replace(implementation=implementation), scale=0.3,
                                        logit_softcap=softcap, block_size=block_size)
        np.testing.assert_allclose(np.asarray(ours)[real], expected[real], atol=2e-6)


@pytest.mark.parametrize("case", ["left-padding", "prefix+window", "cache"])
def test_chunked_attention_gradients_equal_the_dense_ones(case):
    mask, inputs, dense_mask, real = kernel_inputs(case)
    weights = jnp.asarray(real, jnp.float32)[:, :, None, None]

    def loss(implementation, block_size, query, key, value):
        if implementation == "dense":
            out = attention_kernels.explicit_attention(query, key, value, jnp.asarray(dense_mask), scale=0.3)
        else:
            out = attention_kernels.attend(query, key, value, mask.replace(implementation=implementation),
                                           scale=0.3, block_size=block_size)
        return jnp.sum(jnp.sin(out) * weights)

    inputs = tuple(jnp.asarray(x) for x in inputs)
    dense = jax.grad(functools.partial(loss, "dense", None), argnums=(0, 1, 2))(*inputs)
    for implementation in ("xla", "xla_chunked"):
        blocked = jax.jit(jax.grad(functools.partial(loss, implementation, 2), argnums=(0, 1, 2)))(*inputs)
        for ours, theirs in zip(blocked, dense, strict=True):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)


def score_key_lengths(function, *inputs) -> list[int]:
    """The key count of each ``bkqh,bksh->bkqs`` score product in ``function``'s jaxpr, in order."""
    jaxpr = jax.make_jaxpr(function)(*inputs)
    return [eqn.outvars[0].aval.shape[-1] for eqn in jaxpr.eqns
            if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][0] == ((3,), (3,))]


@pytest.mark.parametrize("causal,has_cache", [(True, False), (False, False), (True, True)])
def test_the_xla_kernel_skips_the_keys_after_each_causal_block(causal, has_cache):
    """64 causal queries go in 4 blocks of 16 that see 16, 32, 48 and 64 keys, equal to the hand computation; a
    bidirectional mask or a cache keeps one block over all keys."""
    rng = np.random.RandomState(1)
    key_mask = np.ones((2, 64), np.int32)
    key_mask[0, :5] = 0  # left padding
    key_mask[1, 40:] = 2  # a second packed document
    offset = 0
    query_length = 64
    mask = AttentionMask(jnp.asarray(key_mask), jnp.asarray(offset, jnp.int32), query_length=query_length,
                         causal=causal, has_cache=has_cache)
    query = rng.randn(2, query_length, 4, 8).astype(np.float32)
    key, value = (rng.randn(2, 64, 2, 8).astype(np.float32) for _ in range(2))
    function = functools.partial(attention_kernels.xla_attention, mask=mask, scale=0.3)
    expected_lengths = [16, 32, 48, 64] if causal and not has_cache else [64]
    assert score_key_lengths(function, query, key, value) == expected_lengths
    dense = expected_mask(key_mask, query_length, offset, None, 0, causal)
    with np.errstate(invalid="ignore"):  # left-padding queries before any real key see nothing; not compared
        expected = hand_attention(query, key, value, dense, 0.3)
    real = key_mask != 0
    np.testing.assert_allclose(np.asarray(jax.jit(function)(query, key, value))[real], expected[real], atol=2e-6)


def test_unknown_attention_implementation_is_a_one_line_error(family):
    _, _, folder = family
    with pytest.raises(ValueError, match="attention_implementation='flash' is not one of None"):
        AutoModelForCausalLM.from_pretrained(folder, attention_implementation="flash")
