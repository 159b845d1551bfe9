"""The fused attention kernels (cuDNN, splash) and the backend choice, checked on CPU against ``xla_attention``.

cuDNN cannot run here, so its argument mapping (``is_causal``, the dense mask) is run through jax's XLA
implementation of the same ``jax.nn.dot_product_attention`` call; splash runs in Pallas interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models import attention_kernels as kernels
from jaxpeft.models.attention import AttentionMask


def make_mask(attention_mask, *, query_length=None, **fields) -> AttentionMask:
    """An ``AttentionMask`` over ``attention_mask`` (a nested list), self-attention unless told otherwise."""
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    query_length = attention_mask.shape[1] if query_length is None else query_length
    offset = jnp.asarray(fields.pop("query_offset", 0), jnp.int32)
    window = fields.pop("sliding_window", None)
    window = None if window is None else jnp.asarray(window, jnp.int32)
    return AttentionMask(attention_mask, offset, window, query_length=query_length, **fields)


def make_inputs(batch, num_queries, num_keys, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32, seed=0):
    """Random ``(query, key, value)`` with ``num_keys`` keys (prefix key/values included)."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, num_queries, heads, head_dim)] + [(batch, num_keys, kv_heads, head_dim)] * 2
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


def run(kernel, query, key, value, mask, **options):
    """``kernel(query, key, value, mask, **options)`` under ``jit`` (one compilation, not one per operation)."""
    return jax.jit(functools.partial(kernel, **options))(query, key, value, mask)


def real_queries(mask: AttentionMask) -> np.ndarray:
    """``(batch, T)``: True at the queries that are not padding."""
    return np.asarray(mask.query_segments() != 0)


def assert_close_at_real_queries(out, expected, mask, atol):
    real = real_queries(mask)
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(out[real], expected[real], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------- the chooser


def gpu_bf16(num_queries=8, num_keys=None, head_dim=64):
    return make_inputs(1, num_queries, num_keys or num_queries, head_dim=head_dim, dtype=jnp.bfloat16)[:2]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain", "cudnn"),
        ("float32", "xla"),
        ("float32 long", "xla_chunked"),
        ("soft-cap", "xla"),
        ("head_dim 12", "xla"),
        ("head_dim 264", "xla"),
        ("padding", "cudnn"),
        ("prefix", "cudnn"),
        ("prefix odd keys", "xla"),
        ("cache decode one token", "xla"),
        ("cache two tokens", "cudnn"),
    ],
)
def test_choose_on_gpu(case, expected):
    mask = make_mask(jnp.ones((1, 8)), given=False)
    query, key = gpu_bf16()
    softcap = 30.0 if case == "soft-cap" else None
    if case.startswith("float32"):
        length = 2048 if case.endswith("long") else 8
        query = key = jnp.zeros((1, length, 4, 64))
        mask = make_mask(jnp.ones((1, length)), given=False)
    elif case.startswith("head_dim"):
        query, key = gpu_bf16(head_dim=int(case.split()[1]))
    elif case == "padding":
        mask = make_mask([[1, 1, 1, 1, 1, 1, 0, 0]])
    elif case.startswith("prefix"):
        prefix = 3 if case.endswith("odd keys") else 2
        mask = make_mask(jnp.ones((1, 8)), given=False, num_prefix_tokens=prefix)
        query, key = gpu_bf16(8, 8 + prefix)
    elif case.startswith("cache"):
        num_queries = 1 if "one token" in case else 2
        mask = make_mask(jnp.ones((1, 8)), query_length=num_queries, query_offset=3, has_cache=True, given=False)
        query, key = gpu_bf16(num_queries, 8)
    assert kernels.choose_implementation(mask, query, key, softcap, backend="gpu") == expected


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain", "splash"),
        ("packed", "splash"),
        ("soft-cap", "splash"),
        ("float16", "xla"),
        ("length 200", "xla"),
        ("length 1200", "xla_chunked"),
        ("prefix", "xla"),
        ("cache", "xla"),
        ("sliding window", "xla"),
    ],
)
def test_choose_on_tpu(case, expected):
    length = 256
    if case.startswith("length"):
        length = int(case.split()[1])
    query = key = jnp.zeros((1, length, 4, 64), jnp.float16 if case == "float16" else jnp.bfloat16)
    fields = {"given": case == "packed"}
    segments = jnp.repeat(jnp.array([[1, 2]]), length // 2, axis=1) if case == "packed" else jnp.ones((1, length))
    if case == "prefix":
        fields["num_prefix_tokens"] = 128
        key = jnp.zeros((1, length + 128, 4, 64), jnp.bfloat16)
    elif case == "cache":
        fields.update(query_offset=128, has_cache=True, query_length=128)
        query = query[:, :128]
    elif case == "sliding window":
        fields["sliding_window"] = 64
    mask = make_mask(segments, **fields)
    softcap = 50.0 if case == "soft-cap" else None
    assert kernels.choose_implementation(mask, query, key, softcap, backend="tpu") == expected


def test_choose_on_cpu_is_xla_by_size():
    short, long = jnp.zeros((1, 8, 4, 64), jnp.bfloat16), jnp.zeros((1, 2048, 4, 64), jnp.bfloat16)
    for backend in ("cpu", None):
        assert kernels.choose_implementation(make_mask(jnp.ones((1, 8))), short, short, backend=backend) == "xla"
        long_mask = make_mask(jnp.ones((1, 2048)))
        assert kernels.choose_implementation(long_mask, long, long, backend=backend) == "xla_chunked"


def test_cudnn_head_dim_limit_and_reasons():
    mask = make_mask(jnp.ones((1, 8)), given=False)
    query, key = gpu_bf16(head_dim=128)
    assert kernels.cudnn_applies(mask, query, key) is None
    assert "multiple of 8" in kernels.cudnn_applies(mask, *gpu_bf16(head_dim=20))
    assert "soft-capping" in kernels.cudnn_applies(mask, query, key, 30.0)
    assert "float32" in kernels.cudnn_applies(mask, query, key.astype(jnp.float32))
    padded = make_mask([[1, 1, 1, 1, 1, 1, 0]])
    assert "even query and key lengths" in kernels.cudnn_applies(padded, *gpu_bf16(7, 7))
    assert kernels.cudnn_applies(make_mask(jnp.ones((1, 7)), given=False), *gpu_bf16(7, 7)) is None


# ------------------------------------------------------------------------------------ cuDNN's argument mapping


@pytest.fixture
def cudnn_on_xla(monkeypatch):
    """Runs the ``implementation="cudnn"`` call on jax's XLA attention; returns the list of its arguments."""
    calls = []
    original = jax.nn.dot_product_attention

    def dot_product_attention(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            calls.append(kwargs)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", dot_product_attention)
    return calls


CUDNN_CASES = {
    "right padding": ([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], {}, True),
    "left padding": ([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], {}, True),
    "packed segments": ([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]], {}, True),
    "prefix tokens": ([[1] * 6] * 2, {"num_prefix_tokens": 2, "given": False}, False),
    "prefix and left padding": ([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], {"num_prefix_tokens": 2}, False),
    "sliding window": ([[1] * 6] * 2, {"sliding_window": 3, "given": False}, True),
    "window and packed": ([[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]], {"sliding_window": 2}, True),
    "encoder padding": ([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], {"causal": False}, False),
    "cache": ([[1] * 8] * 2, {"query_length": 2, "query_offset": 3, "has_cache": True, "given": False}, False),
    "cache left padding": ([[0, 0, 1, 1, 1, 1, 1, 1]] * 2, {"query_length": 4, "query_offset": 2, "has_cache": True},
                           False),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_mapping_matches_xla(case, cudnn_on_xla):
    segments, fields, is_causal = CUDNN_CASES[case]
    mask = make_mask(segments, **fields)
    query, key, value = make_inputs(2, mask.query_length, mask.num_keys, dtype=jnp.bfloat16, seed=len(case))
    expected = run(kernels.xla_attention, query, key, value, mask, scale=0.3)
    out = run(kernels.cudnn_attention, query, key, value, mask, scale=0.3)
    assert_close_at_real_queries(out, expected, mask, atol=1e-2)
    (call,) = cudnn_on_xla
    assert call["is_causal"] is is_causal
    assert call["mask"] is not None and call["mask"].shape == (2, 1, mask.query_length, mask.num_keys)


@pytest.mark.parametrize(("causal", "kv_heads"), [(True, 2), (True, 1), (False, 4)])
def test_cudnn_without_mask_array(causal, kv_heads, cudnn_on_xla):
    mask = make_mask(jnp.ones((2, 6)), causal=causal, given=False)
    query, key, value = make_inputs(2, 6, 6, kv_heads=kv_heads, dtype=jnp.bfloat16)
    expected = run(kernels.xla_attention, query, key, value, mask, scale=0.3)
    out = run(kernels.cudnn_attention, query, key, value, mask, scale=0.3)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=1e-2)
    (call,) = cudnn_on_xla
    assert call["is_causal"] is causal and call["mask"] is None


def test_cudnn_gradients_match_xla(cudnn_on_xla):
    mask = make_mask([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]])
    inputs = make_inputs(2, 6, 6, dtype=jnp.bfloat16)
    weight = jnp.asarray(real_queries(mask), jnp.float32)[:, :, None, None]

    def loss(kernel, *inputs):
        return (kernel(*inputs, mask, scale=0.3).astype(jnp.float32) * weight).sum()

    expected = jax.jit(jax.grad(functools.partial(loss, kernels.xla_attention), argnums=(0, 1, 2)))(*inputs)
    grads = jax.jit(jax.grad(functools.partial(loss, kernels.cudnn_attention), argnums=(0, 1, 2)))(*inputs)
    for grad, reference in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(reference, np.float32), atol=3e-2)


def test_attend_dispatches_to_cudnn_on_gpu(cudnn_on_xla, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    mask = make_mask([[0, 1, 1, 1, 1, 1]])
    query, key, value = make_inputs(1, 6, 6, dtype=jnp.bfloat16)
    out = run(kernels.attend, query, key, value, mask, scale=0.3)
    assert len(cudnn_on_xla) == 1
    expected = run(kernels.xla_attention, query, key, value, mask, scale=0.3)
    assert_close_at_real_queries(out, expected, mask, atol=1e-2)


# ------------------------------------------------------------------------------------ splash, interpret mode


def splash_inputs(segments, kv_heads=2, seed=0):
    segments = jnp.asarray(segments, jnp.int32)
    return make_inputs(segments.shape[0], segments.shape[1], segments.shape[1], kv_heads=kv_heads, head_dim=32,
                       seed=seed)


def test_splash_matches_xla_forward_and_gradient():
    length = 128
    segments = np.ones((3, length), np.int32)
    segments[0, 100:] = 0  # right padding
    segments[1, :28] = 0  # left padding
    segments[2, 50:110], segments[2, 110:] = 2, 0  # two packed documents, then padding
    mask = make_mask(segments)
    inputs = splash_inputs(segments)
    splash = functools.partial(kernels.splash_attention, interpret=True)
    cotangent = make_inputs(3, length, 1, head_dim=32, seed=7)[0] * real_queries(mask)[:, :, None, None]

    @functools.partial(jax.jit, static_argnums=0)
    def forward_and_backward(kernel, *inputs):
        out, vjp = jax.vjp(lambda *args: kernel(*args, mask, scale=0.2), *inputs)
        return out, vjp(cotangent)

    out, grads = forward_and_backward(splash, *inputs)
    expected, expected_grads = forward_and_backward(kernels.xla_attention, *inputs)
    assert np.isfinite(np.asarray(out)).all()
    assert_close_at_real_queries(out, expected, mask, atol=2e-5)
    for grad, reference in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(reference), atol=2e-5)


def test_splash_encoder_padding_with_soft_cap():
    segments = np.ones((2, 128), np.int32)
    segments[0, 90:] = 0
    mask = make_mask(segments, causal=False)
    query, key, value = splash_inputs(segments, seed=1)
    query = query * 8.0  # scores well beyond the cap, so that capping shows
    out = run(kernels.splash_attention, query, key, value, mask, scale=0.5, logit_softcap=5.0, interpret=True)
    expected = run(kernels.xla_attention, query, key, value, mask, scale=0.5, logit_softcap=5.0)
    assert np.isfinite(np.asarray(out)).all()
    assert_close_at_real_queries(out, expected, mask, atol=2e-5)


def test_splash_causal_without_segments_multi_query():
    mask = make_mask(jnp.ones((1, 256)), given=False)
    query, key, value = splash_inputs(np.ones((1, 256)), kv_heads=1, seed=2)
    out = run(kernels.splash_attention, query, key, value, mask, scale=0.2, interpret=True)
    expected = run(kernels.xla_attention, query, key, value, mask, scale=0.2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)


def test_attend_dispatches_to_splash_on_tpu(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(kernels, "splash_attention", lambda *args, **kwargs: calls.append(kwargs) or args[0])
    mask = make_mask(jnp.ones((1, 128)), given=False)
    query, key, value = make_inputs(1, 128, 128, dtype=jnp.bfloat16)
    kernels.attend(query, key, value, mask, scale=0.3, logit_softcap=20.0)
    assert calls == [{"scale": 0.3, "logit_softcap": 20.0}]


# ------------------------------------------------------------------------------------------------------- errors


def one_line_error(implementation, mask, inputs, softcap=None) -> str:
    with pytest.raises(ValueError) as error:
        kernels.attend(*inputs, mask.replace(implementation=implementation), scale=0.3, logit_softcap=softcap)
    message = str(error.value)
    assert "\n" not in message and "attention_implementation=None" in message and "'xla_chunked'" in message
    return message


def test_named_fused_kernels_off_their_backend():
    mask = make_mask(jnp.ones((1, 128)), given=False)
    inputs = make_inputs(1, 128, 128, dtype=jnp.bfloat16)
    assert "needs an NVIDIA GPU" in one_line_error("cudnn", mask, inputs)
    assert "needs a TPU" in one_line_error("splash", mask, inputs)


def test_named_cudnn_that_does_not_apply(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    mask = make_mask(jnp.ones((1, 8)), given=False)
    assert "float32" in one_line_error("cudnn", mask, make_inputs(1, 8, 8))
    assert "soft-capping" in one_line_error("cudnn", mask, make_inputs(1, 8, 8, dtype=jnp.bfloat16), 30.0)


def test_named_splash_that_does_not_apply(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    prefix = make_mask(jnp.ones((1, 128)), given=False, num_prefix_tokens=128)
    assert "prefix" in one_line_error("splash", prefix, make_inputs(1, 128, 256, dtype=jnp.bfloat16))
    short = make_mask(jnp.ones((1, 100)), given=False)
    assert "multiples of 128" in one_line_error("splash", short, make_inputs(1, 100, 100, dtype=jnp.bfloat16))


def test_kernels_refuse_what_they_cannot_run():
    mask = make_mask(jnp.ones((1, 8)), given=False)
    with pytest.raises(ValueError, match="soft-capping"):
        kernels.cudnn_attention(*make_inputs(1, 8, 8, dtype=jnp.bfloat16), mask, scale=0.3, logit_softcap=5.0)
    with pytest.raises(ValueError, match="multiples of 128"):
        kernels.splash_attention(*make_inputs(1, 8, 8), mask, scale=0.3, interpret=True)
