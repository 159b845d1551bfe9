"""GGUF (llama.cpp) files: Llama-family weights and the tokenizer described by the metadata.

``AutoModelForCausalLM.from_pretrained("model.gguf")`` reads the weights through ``read_gguf_checkpoint``, as
float32, or with a ``quantization_config`` keeping the Q4_0/Q4_1/Q8_0/Q4_K/Q6_K layer weights in their own codes
and scales (``QuantizedArray``);
``load_gguf_tokenizer("model.gguf")`` builds the matching ``transformers.PreTrainedTokenizerFast``.

Example (``path`` is a llama ``.gguf``, e.g. SmolLM2-135M-Instruct):
    >>> from jaxpeft.models import AutoModelForCausalLM, load_gguf_tokenizer  # doctest: +SKIP
    >>> tokenizer = load_gguf_tokenizer(path)  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path, scan_layers=True)  # doctest: +SKIP
    >>> prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
    ...     return_dict=True, return_tensors="np")  # doctest: +SKIP
    >>> tokenizer.decode(model.generate(**prompt, max_new_tokens=20)[0])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from jaxpeft.quantization import QuantizedArray

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"

# Hugging Face name of each per-layer GGUF tensor (blk.{i}.<name>.weight).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer splits for `tokenizer.ggml.pre` values whose regex differs from GPT-2's (as in transformers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4


def _reader(path: str):
    """A ``gguf.GGUFReader`` of ``path``; one-line errors for a file that is missing, not GGUF or cut short."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file.")
    with open(path, "rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r}); pass a .gguf file.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:  # what reading past the end raises
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: the file is truncated or damaged ({os.path.getsize(path)} bytes; reading it "
                         f"failed: {reason}); download or copy it again.") from None


def _metadata(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermuted_row_order(rows: int, num_heads: int) -> np.ndarray:
    """For each Hugging Face row of q_proj/k_proj, the GGUF row it comes from (llama.cpp interleaves the two
    halves of each head's rows)."""
    return np.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).swapaxes(1, 2).reshape(rows)


def unpermute_rows(weight: np.ndarray | QuantizedArray, num_heads: int) -> np.ndarray | QuantizedArray:
    """Undoes llama.cpp's per-head interleaving of q_proj/k_proj rows (``(out, in)`` torch layout).

    A ``QuantizedArray`` (stored as its ``(out, in)`` matrix) has whole rows of its codes and block statistics
    moved; GGUF blocks never cross a row.
    """
    if not isinstance(weight, QuantizedArray):
        return weight[_unpermuted_row_order(weight.shape[0], num_heads)]
    if weight.stack_shape or weight.perm != (0, 1) or weight.nested_scales is not None:
        raise ValueError(f"unpermute_rows takes an unstacked (out, in) QuantizedArray, not {weight!r}")
    order = _unpermuted_row_order(weight.stored_shape[0], num_heads)
    children = {"codes": weight.codes, "scales": weight.scales, "offsets": weight.offsets}
    return weight.replace(**{name: _rows_reordered(value, order) for name, value in children.items()
                             if value is not None})


def _rows_reordered(flat: Any, order: np.ndarray) -> np.ndarray:
    """A flat per-row array (equal parts per row) with its rows taken in ``order``."""
    return np.asarray(flat).reshape(len(order), -1)[order].reshape(-1)


# --- GGUF quantized blocks as QuantizedArray children -------------------------------------------------------------
# Each decoder takes the blocks of a tensor, ``(rows, blocks per row, bytes per block)`` uint8, and returns
# ``(quant_type, values per scale, children)``, children shaped ``(rows, ...)`` in each row's element order.
# Scales that are the file's own float16 values (Q4_0, Q4_1, Q8_0) stay float16, as stored: dequantizing reads
# them as float32 exactly, and the weight keeps GGUF's size (Q4_1: 6 bits per value, not 7 with float32 scales).
# The K-quant scales are float32 products (d * sub-block scale) that float16 cannot hold.


def _half(raw: np.ndarray) -> np.ndarray:
    """float16 fields (the last axis, 2 bytes) as float16 values."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _bit_fields(packed: np.ndarray, run: int, bits: int) -> np.ndarray:
    """The ``bits``-wide values of ``packed`` (last axis) in GGUF element order: each run of ``run`` bytes holds
    ``run`` values in its lowest bits, then ``run`` in the next bits up, and so on."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]
    grouped = packed.reshape(packed.shape[:-1] + (-1, 1, run)) >> shifts
    return (grouped & np.uint8((1 << bits) - 1)).reshape(packed.shape[:-1] + (-1,))


def _pack_high_first(nibbles: np.ndarray) -> np.ndarray:
    """4-bit values two per byte, the first in the high nibble (the ``QuantizedArray`` layout)."""
    return (nibbles[..., 0::2] << np.uint8(4)) | nibbles[..., 1::2]


def _q4_0(blocks: np.ndarray) -> tuple[str, int, dict[str, np.ndarray]]:
    """Q4_0: f16 d, 32 nibbles; value = d * (q - 8)."""
    codes = _pack_high_first(_bit_fields(blocks[..., 2:], 16, 4))
    return "int4", 32, {"codes": codes, "scales": _half(blocks[..., :2])}


def _q4_1(blocks: np.ndarray) -> tuple[str, int, dict[str, np.ndarray]]:
    """Q4_1: f16 d, f16 m, 32 nibbles; value = d * q + m."""
    codes = _pack_high_first(_bit_fields(blocks[..., 4:], 16, 4))
    return "uint4", 32, {"codes": codes, "scales": _half(blocks[..., :2]), "offsets": _half(blocks[..., 2:4])}


def _q8_0(blocks: np.ndarray) -> tuple[str, int, dict[str, np.ndarray]]:
    """Q8_0: f16 d, 32 int8; value = d * q."""
    return "int8", 32, {"codes": blocks[..., 2:].view(np.int8), "scales": _half(blocks[..., :2])}


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit sub-block scales and mins of each Q4_K super-block (12 bytes: the low 6 bits of scales 0-3
    and mins 0-3 in bytes 0-7, the low 4 bits of scales/mins 4-7 in bytes 8-11, their top 2 bits in the top 2
    bits of bytes 0-7)."""
    low_scales, low_mins, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low_scales & 0x3F, (high & 0x0F) | ((low_scales >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([low_mins & 0x3F, (high >> 4) | ((low_mins >> 2) & 0x30)], axis=-1)
    return scales, mins


def _q4_k(blocks: np.ndarray) -> tuple[str, int, dict[str, np.ndarray]]:
    """Q4_K: super-blocks of 256 (f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles) in 8
    sub-blocks of 32; value = (d * sc) * q - (dmin * m), each product in float32 as llama.cpp computes it."""
    sub_scales, sub_mins = _q4_k_scales_and_mins(blocks[..., 4:16])
    scales = _half(blocks[..., 0:2]).astype(np.float32)[..., None] * sub_scales.astype(np.float32)
    offsets = -(_half(blocks[..., 2:4]).astype(np.float32)[..., None] * sub_mins.astype(np.float32))
    codes = _pack_high_first(_bit_fields(blocks[..., 16:], 32, 4))
    return "uint4", 32, {"codes": codes, "scales": scales, "offsets": offsets}


def _q6_k(blocks: np.ndarray) -> tuple[str, int, dict[str, np.ndarray]]:
    """Q6_K: super-blocks of 256 (128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 sub-block
    scales, f16 d) in 16 sub-blocks of 16; value = (d * sc) * (q - 32)."""
    low = _bit_fields(blocks[..., :128], 64, 4)
    high = _bit_fields(blocks[..., 128:192], 32, 2)
    codes = ((low | (high << np.uint8(4))).astype(np.int16) - 32).astype(np.int8)
    super_scales = _half(blocks[..., 208:210]).astype(np.float32)[..., None]
    scales = super_scales * blocks[..., 192:208].view(np.int8).astype(np.float32)
    return "int8", 16, {"codes": codes, "scales": scales}


_BLOCK_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
KEPT_QUANTIZED_TYPES = tuple(_BLOCK_DECODERS)


def quantized_tensor(tensor) -> QuantizedArray:
    """A 2-D GGUF tensor of a type in ``KEPT_QUANTIZED_TYPES`` (a ``gguf.ReaderTensor``) as a ``QuantizedArray`` in
    torch ``(out, in)`` layout, with no copy to float: its dequantized values equal ``gguf.dequantize``'s.
    """
    import gguf

    decode = _BLOCK_DECODERS[tensor.tensor_type.name]
    rows, cols = (int(d) for d in reversed(tensor.shape))
    type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, type_size)
    quant_type, block_size, children = decode(blocks)
    return QuantizedArray(**{name: np.ascontiguousarray(value).reshape(-1) for name, value in children.items()},
                          quant_type=quant_type, block_size=block_size, stored_shape=(rows, cols), perm=(0, 1),
                          stack_shape=(), dtype_name="float32")


def gguf_config(reader, **config_overrides):
    """The ``transformers.LlamaConfig`` described by a GGUF file's metadata."""
    import transformers

    architecture = _metadata(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; jaxpeft reads {SUPPORTED_ARCHITECTURES}."
        )

    def meta(name, default=None):
        return _metadata(reader, f"{architecture}.{name}", default)

    tensor_names = {tensor.name for tensor in reader.tensors}
    if "rope_freqs.weight" in tensor_names or meta("rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling (rope_freqs / rope.scaling) are not supported yet.")
    num_heads = int(meta("attention.head_count"))
    hidden_size = int(meta("embedding_length"))
    vocab_size = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    token_ids = {
        name: _metadata(reader, f"tokenizer.ggml.{key}")
        for name, key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        )
    }
    settings = dict(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("rope.dimension_count", hidden_size // num_heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta("context_length", 2048)),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in tensor_names,
        **{name: None if value is None else int(value) for name, value in token_ids.items()},
    )
    settings.update(config_overrides)
    return transformers.LlamaConfig(**settings)


def _hf_name(gguf_name: str) -> tuple[str, str | None]:
    """The Hugging Face name of a GGUF tensor, and its per-layer GGUF name (``attn_q``...; None for globals)."""
    match = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", gguf_name)
    if match:
        layer, name, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSORS.get(name, name)}.{kind}", name
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_TENSORS.get(stem, stem)}.{kind}", None


def _read_tensor(tensor, keep_quantized: bool) -> np.ndarray | QuantizedArray:
    """One GGUF tensor in torch layout: a ``QuantizedArray`` when ``keep_quantized`` and its type is kept, else
    float32."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    if keep_quantized and len(shape) == 2 and tensor.tensor_type.name in KEPT_QUANTIZED_TYPES:
        return quantized_tensor(tensor)
    return np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def read_gguf_checkpoint(path: str | os.PathLike, keep_quantized: bool = False,
                         **config_overrides) -> tuple[Any, dict[str, np.ndarray | QuantizedArray]]:
    """``(config, tensors)`` of a llama ``.gguf``: its tensors under their Hugging Face names, torch layout.

    Every tensor is float32, except with ``keep_quantized``: the layers' linear weights of a type in
    ``KEPT_QUANTIZED_TYPES`` (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) are then ``QuantizedArray`` leaves holding the file's
    own codes and scales, whose dequantized values equal the float ones. Embeddings, norms and the output head
    stay float.

    Example:
        >>> config, tensors = read_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> tensors["model.layers.0.self_attn.q_proj.weight"].shape  # doctest: +SKIP
        (576, 576)
    """
    reader = _reader(os.fspath(path))
    config = gguf_config(reader, **config_overrides)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for tensor in reader.tensors:
        hf_name, layer_tensor = _hf_name(tensor.name)
        array = _read_tensor(tensor, keep_quantized and layer_tensor is not None)
        if layer_tensor in heads:
            array = unpermute_rows(array, heads[layer_tensor])
        tensors[hf_name] = array
    return config, tensors


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer of a GGUF file (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``) as a
    ``transformers.PreTrainedTokenizerFast``, with its special tokens and chat template.

    Example:
        >>> tokenizer = load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> tokenizer("Hello world")["input_ids"]  # doctest: +SKIP
        [19556, 905]
    """
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    path = os.fspath(path)
    reader = _reader(path)
    tokenizer_model = _metadata(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {tokenizer_model!r} is not supported; load_gguf_tokenizer builds byte-level BPE "
            "('gpt2') tokenizers. Use transformers.AutoTokenizer.from_pretrained(folder, gguf_file=...) instead."
        )
    tokens = list(_metadata(reader, "tokenizer.ggml.tokens"))
    token_types = list(_metadata(reader, "tokenizer.ggml.token_type", [0] * len(tokens)))
    merges = [tuple(merge.split(" ")) for merge in _metadata(reader, "tokenizer.ggml.merges", [])]
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # Tokens outside the byte alphabet are written in it, as transformers' GGUF converter does.
    vocab = {
        token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = _PRE_TOKENIZER_SPLITS.get(_metadata(reader, "tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL and set(t) <= spelled]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user_defined = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    def special(key):
        token_id = _metadata(reader, f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[int(token_id)]

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"),
        chat_template=_metadata(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
