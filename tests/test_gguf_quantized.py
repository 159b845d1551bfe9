"""GGUF quantized tensors read as ``QuantizedArray`` leaves, checked against ``gguf.dequantize`` (gguf-py, the
reference dequantizer of llama.cpp's Python package)."""

import gc

import gguf
import jax
import numpy as np
import pytest

import jaxpeft
from jaxpeft import assets, quantization
from jaxpeft.models import AutoModelForCausalLM, read_gguf_checkpoint
from jaxpeft.quantization import QuantizedArray

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
# GGUF type -> (QuantizedArray quant_type, values per scale, byte offsets of the float16 fields in a block).
EXPECTED_LAYOUT = {
    "Q4_0": ("int4", 32, (0,)),
    "Q4_1": ("uint4", 32, (0, 2)),
    "Q8_0": ("int8", 32, (0,)),
    "Q4_K": ("uint4", 32, (0, 2)),
    "Q6_K": ("int8", 16, (208,)),
}


def random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of random bytes (any bit pattern is a valid block) whose float16 scales are finite, of both
    signs, between 1e-3 and 1e-1 in magnitude."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in EXPECTED_LAYOUT[qtype.name][2]:
        magnitude = rng.uniform(1e-3, 1e-1, blocks.shape[:2]) * rng.choice([-1.0, 1.0], blocks.shape[:2])
        blocks[..., offset:offset + 2] = magnitude.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_tensor(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """The bytes of an ``(rows, cols)`` tensor: a float matrix quantized by gguf-py where it can quantize
    ``qtype``, random blocks where it cannot (the K-quants)."""
    try:
        return gguf.quants.quantize(rng.normal(0.0, 0.05, (rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:
        return random_blocks(qtype, rows, cols, rng)


def write_tiny_llama(path, qtype: gguf.GGMLQuantizationType) -> None:
    """A one-layer llama GGUF whose projections (and token embedding) are of ``qtype``."""
    rng = np.random.default_rng(list(EXPECTED_LAYOUT).index(qtype.name))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "blk.0.ffn_up.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTERMEDIATE),
    }
    for name, (rows, cols) in shapes.items():
        maker = random_blocks if name == "blk.0.ffn_down.weight" else gguf_tensor
        writer.add_tensor(name, maker(qtype, rows, cols, rng), raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", rng.normal(1.0, 0.1, HIDDEN).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf-py, ``(rows, cols)`` as stored (no row un-permutation)."""
    reader = gguf.GGUFReader(str(path))
    return {tensor.name: gguf.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
            for tensor in reader.tensors}


def interleaved_rows_undone(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """transformers' reverse of llama.cpp's q/k row permutation."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("type_name", list(EXPECTED_LAYOUT))
def test_quantized_gguf_tensors_dequantize_exactly_as_gguf_py(tmp_path, type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    path = tmp_path / f"tiny-{type_name}.gguf"
    write_tiny_llama(path, qtype)
    reference = reference_tensors(path)
    _, tensors = read_gguf_checkpoint(path, keep_quantized=True)
    quant_type, block_size, _ = EXPECTED_LAYOUT[type_name]

    for gguf_name, hf_name in (("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        leaf = tensors[hf_name]
        assert isinstance(leaf, QuantizedArray)
        assert (leaf.quant_type, leaf.block_size, leaf.shape) == (quant_type, block_size, reference[gguf_name].shape)
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), reference[gguf_name])
    for gguf_name, hf_name, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", HEADS),
                                      ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", KV_HEADS)):
        assert isinstance(tensors[hf_name], QuantizedArray)
        np.testing.assert_array_equal(np.asarray(tensors[hf_name].dequantize()),
                                      interleaved_rows_undone(reference[gguf_name], heads))
    # The embedding and the norm stay float, as without keep_quantized.
    embedding = tensors["model.embed_tokens.weight"]
    assert isinstance(embedding, np.ndarray) and embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding, reference["token_embd.weight"])
    assert isinstance(tensors["model.layers.0.input_layernorm.weight"], np.ndarray)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K"])
def test_jitted_dequantization_matches_gguf_py(tmp_path, type_name):
    """The affine types (scale, then offset added) also match inside ``jit`` on the CPU, where XLA fuses the
    operations but does not contract them into fused multiply-adds (a GPU compiler may: one rounding fewer)."""
    path = tmp_path / f"tiny-{type_name}.gguf"
    write_tiny_llama(path, gguf.GGMLQuantizationType[type_name])
    _, tensors = read_gguf_checkpoint(path, keep_quantized=True)
    with jax.default_device(jax.devices("cpu")[0]):
        dequantized = jax.jit(quantization.dequantize)(tensors["model.layers.0.mlp.down_proj.weight"])
    np.testing.assert_array_equal(np.asarray(dequantized), reference_tensors(path)["blk.0.ffn_down.weight"])


def test_without_keep_quantized_every_tensor_is_float(tmp_path):
    path = tmp_path / "tiny-Q4_K.gguf"
    write_tiny_llama(path, gguf.GGMLQuantizationType.Q4_K)
    _, tensors = read_gguf_checkpoint(path)
    assert all(isinstance(value, np.ndarray) and value.dtype == np.float32 for value in tensors.values())


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return assets.smollm2_gguf()
    except assets.AssetError as error:
        pytest.skip(f"the SmolLM2 GGUF asset is not installed: {error}")


def test_smollm2_q4_1_loads_quantized_with_the_float_model_outputs(smollm2_path):
    # "The quick brown fox jumps over the lazy dog." in the file's tokenizer (load_gguf_tokenizer).
    ids = np.array([[504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]], np.int32)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=jaxpeft.QuantizationConfig("nf4"),
                                                 scan_layers=True)
    attention = model.params["params"]["model"]["layers"]["self_attn"]
    assert all(isinstance(attention[name]["kernel"], QuantizedArray) for name in ("q_proj", "k_proj"))
    assert attention["q_proj"]["kernel"].quant_type == "uint4"
    kernels = {name: np.asarray(attention[name]["kernel"].dequantize()) for name in ("q_proj", "k_proj")}
    sizes = quantization.parameter_bytes(model.params)
    quantized_logits = np.asarray(model(input_ids=ids).logits)
    del model, attention
    gc.collect()

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, scan_layers=True)
    float_attention = model.params["params"]["model"]["layers"]["self_attn"]
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(kernel, np.asarray(float_attention[name]["kernel"]))
    # float32 logits up to ~15 from 30 layers, summed in another order (dequantized inside the matmul): up to 1.5e-4
    np.testing.assert_allclose(quantized_logits, np.asarray(model(input_ids=ids).logits), rtol=2e-5, atol=3e-4)
    assert sizes["quantized"] <= 0.35 * sizes["quantized_as_bf16"], sizes
    del model, float_attention
    gc.collect()
