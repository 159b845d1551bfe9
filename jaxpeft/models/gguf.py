"""GGUF (llama.cpp) files: dequantised Llama-family weights and the tokenizer described by the metadata.

``AutoModelForCausalLM.from_pretrained("model.gguf")`` reads the weights through ``read_gguf_checkpoint``;
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


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head interleaving of q_proj/k_proj rows (``(out, in)`` torch layout)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


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


def read_gguf_checkpoint(path: str | os.PathLike, **config_overrides) -> tuple[Any, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a llama ``.gguf``: float32 tensors under their Hugging Face names.

    Example:
        >>> config, tensors = read_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> tensors["model.layers.0.self_attn.q_proj.weight"].shape  # doctest: +SKIP
        (576, 576)
    """
    import gguf

    reader = _reader(os.fspath(path))
    config = gguf_config(reader, **config_overrides)
    layer_pattern = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        match = layer_pattern.match(tensor.name)
        if match:
            layer, name, kind = match.groups()
            if name == "attn_q":
                array = unpermute_rows(array, config.num_attention_heads)
            elif name == "attn_k":
                array = unpermute_rows(array, config.num_key_value_heads)
            hf_name = f"model.layers.{layer}.{_LAYER_TENSORS.get(name, name)}.{kind}"
        else:
            stem, _, kind = tensor.name.rpartition(".")
            hf_name = f"{_GLOBAL_TENSORS.get(stem, stem)}.{kind}"
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
