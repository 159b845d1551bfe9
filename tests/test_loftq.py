"""LoftQ (init_lora_weights="loftq"): HF PEFT's ``loftq_init`` and a numpy implementation as references."""

import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft.hf_format import config_from_hf_dict, config_to_hf_dict
from jaxpeft.methods.lora import LOFTQ_QUANTIZERS
from jaxpeft.models import AutoModelForCausalLM
from jaxpeft.quantization import QuantizedArray, dequantize, quantize_array

N_IN, N_OUT, RANK = 128, 96, 4
ALPHA = 8  # scaling 2: A B must hold half the correction
_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


@pytest.fixture(scope="module")
def hf_loftq_init():
    """HF PEFT's ``loftq_init`` (bitsandbytes' nf4 / int8 as its quantizers) run on the CPU: the only change to its
    source is the device it computes on, which it fixes to an accelerator."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    source = inspect.getsource(loftq_utils.loftq_init)
    if _DEVICE_LINE not in source:
        pytest.skip("this peft version picks its device differently")
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(_DEVICE_LINE, 'compute_device = "cpu"'), "hf_loftq_init", "exec"), namespace)
    return namespace["loftq_init"]


def _kernel(seed: int = 0) -> np.ndarray:
    """A Dense kernel ``(in, out)``: Gaussian noise plus a few strong directions, as trained weights have."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((N_IN, N_OUT)) / np.sqrt(N_IN)
    low_rank = rng.standard_normal((N_IN, 3)) @ rng.standard_normal((3, N_OUT)) / N_IN
    return (noise + low_rank).astype(np.float32)


def _dense_loftq(kernel: np.ndarray, bits: int = 4, n_iter: int = 1):
    """jaxpeft's LoftQ on one Dense layer: (deq(Q), scaling * A B, the params)."""
    model = nn.Dense(N_OUT)
    x = jnp.ones((1, N_IN))
    variables = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(N_OUT)}}
    config = jaxpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=".*", init_lora_weights="loftq",
                                loftq_config={"loftq_bits": bits, "loftq_iter": n_iter})
    params = jaxpeft.init_adapters(jax.random.key(0), config, model.apply, variables, x)["params"]
    delta = (ALPHA / RANK) * params["lora_A"]["default"] @ params["lora_B"]["default"]
    return np.asarray(dequantize(params["kernel"])), np.asarray(delta), params


def _plain(kernel: np.ndarray, bits: int = 4) -> np.ndarray:
    return np.asarray(dequantize(quantize_array(jnp.asarray(kernel), LOFTQ_QUANTIZERS[bits])))


def _numpy_loftq(kernel: np.ndarray, bits: int, n_iter: int):
    """LoftQ written out in numpy on the torch ``(out, in)`` weight (the quantizer: jaxpeft's, on the kernel)."""
    weight = kernel.T.astype(np.float64)
    residual = weight
    for step in range(n_iter):
        dequantized = _plain(residual.T.astype(np.float32), bits).T.astype(np.float64)
        u, s, vh = np.linalg.svd(weight - dequantized, full_matrices=False)
        left, right = u[:, :RANK] * np.sqrt(s[:RANK]), np.sqrt(s[:RANK])[:, None] * vh[:RANK]
        if step + 1 < n_iter:
            residual = weight - left @ right
    return dequantized.T, (left @ right).T


def _error(kernel, dequantized, delta=0.0) -> float:
    return float(np.linalg.norm(kernel - (dequantized + delta)))


def test_first_iteration_equals_hf_peft(hf_loftq_init):
    kernel = _kernel()
    dequantized, delta, params = _dense_loftq(kernel)
    assert isinstance(params["kernel"], QuantizedArray) and params["kernel"].quant_type == "nf4"
    qweight, lora_a, lora_b = hf_loftq_init(torch.from_numpy(kernel.T.copy()), num_bits=4, reduced_rank=RANK)
    np.testing.assert_array_equal(dequantized, qweight.numpy().T)  # bitsandbytes' nf4, bit for bit
    np.testing.assert_allclose(delta, (lora_b @ lora_a).numpy().T, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_error_against_hf_peft_plain_quantization_and_numpy(hf_loftq_init, bits):
    kernel = _kernel(1)
    dequantized, delta, _ = _dense_loftq(kernel, bits, n_iter=5)
    qweight, lora_a, lora_b = hf_loftq_init(torch.from_numpy(kernel.T.copy()), num_bits=bits, reduced_rank=RANK,
                                            num_iter=5)
    ours = _error(kernel, dequantized, delta)
    hf = _error(kernel, qweight.numpy().T, (lora_b @ lora_a).numpy().T)
    plain = _error(kernel, _plain(kernel, bits))
    # nf4 codes are bitsandbytes' own; its int8 row scales are float16 where jaxpeft keeps float32: within 1%.
    assert ours <= 1.01 * hf and ours < 0.9 * plain, (ours, hf, plain)
    reference_q, reference_delta = _numpy_loftq(kernel, bits, n_iter=5)
    np.testing.assert_allclose(dequantized, reference_q, atol=1e-5)
    np.testing.assert_allclose(delta, reference_delta, atol=1e-5)


def test_error_decreases_with_iterations():
    kernel = _kernel(2)
    errors = [_error(kernel, *_dense_loftq(kernel, n_iter=n)[:2]) for n in (1, 2, 3, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] < _error(kernel, _plain(kernel))


def test_llama_loftq_logits_closer_than_plain_nf4():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=99)
    model = AutoModelForCausalLM.from_config(config, seed=0)
    peft_model = jaxpeft.get_peft_model(model, jaxpeft.LoraConfig(init_lora_weights="loftq", r=4,
                                                                  target_modules=["q_proj", "v_proj"]))
    quantized = jaxpeft.quantization.quantized_paths(peft_model.params)
    assert quantized and all(path[-2] in ("q_proj", "v_proj") for path in quantized)
    assert any(path[-2] == "q_proj" for path in quantized)
    ids = np.random.default_rng(0).integers(1, 99, (2, 12))
    reference = np.asarray(model(input_ids=ids).logits)
    plain = jaxpeft.quantize(model.params, jaxpeft.QuantizationConfig("nf4"), target_modules=["q_proj", "v_proj"])
    plain = jaxpeft.quantization.dequantize_tree(plain)  # the same weights, as float arrays: no second compile
    plain_error = np.linalg.norm(np.asarray(model(input_ids=ids, params=plain).logits) - reference)
    loftq_error = np.linalg.norm(np.asarray(peft_model(input_ids=ids).logits) - reference)
    assert loftq_error < plain_error, (loftq_error, plain_error)


@pytest.mark.parametrize("bits", [2, 3, 16, True])
def test_unsupported_bits_are_one_line_errors(bits):
    with pytest.raises(jaxpeft.ConfigError, match=r"loftq_bits=.* is not supported; use 4 \(nf4\) or 8") as error:
        jaxpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": bits})
    assert "\n" not in str(error.value)


def test_loftq_options_are_checked():
    assert jaxpeft.LoraConfig(init_lora_weights="loftq").loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.raises(jaxpeft.ConfigError, match="loftq_iter must be a positive integer"):
        jaxpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.raises(jaxpeft.ConfigError, match="unknown key"):
        jaxpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jaxpeft.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}
    assert any("loftq_config is ignored" in str(w.message) for w in caught)


def test_quantized_base_and_embeddings_are_refused():
    kernel = _kernel()
    model = nn.Dense(N_OUT)
    x = jnp.ones((1, N_IN))
    quantized = {"params": {"kernel": quantize_array(jnp.asarray(kernel), LOFTQ_QUANTIZERS[4]),
                            "bias": jnp.zeros(N_OUT)}}
    config = jaxpeft.LoraConfig(r=RANK, target_modules=".*", init_lora_weights="loftq")
    with pytest.raises(jaxpeft.AdapterError, match="already quantized: pass the float model") as error:
        jaxpeft.init_adapters(jax.random.key(0), config, model.apply, quantized, x)
    assert "\n" not in str(error.value)
    embed, ids = nn.Embed(10, 4), jnp.array([[1, 2]])
    with pytest.raises(jaxpeft.AdapterError, match="LoftQ cannot initialise .*Embed"):
        jaxpeft.init_adapters(jax.random.key(0), config, embed.apply, embed.init(jax.random.key(1), ids), ids)


def test_hf_config_dict_keeps_loftq_config():
    config = jaxpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 3})
    hf_dict = config_to_hf_dict(config)
    assert hf_dict["init_lora_weights"] == "loftq"
    assert hf_dict["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 3}
    # Reading it back, LoftQ is init-only (the saved base is already quantized): as PiSSA, it reads as True.
    read = config_from_hf_dict(hf_dict)
    assert read.init_lora_weights is True and read.loftq_config == {}
