"""bitsandbytes checkpoints: folders that transformers saves from a 4-bit (NF4/FP4) or 8-bit (LLM.int8) model.

A ``QuantizedArray`` holds each slice's torch ``(out, in)`` weight flattened row-major in blocks, which is the
bitsandbytes layout itself, so the tensors map one to one and nothing is dequantized on the way in or out:

* 4-bit ``<module>.weight``: uint8 codes (two per byte, the first in the high half) -> ``codes``;
  ``weight.absmax`` -> ``scales`` (uint8 with double quantization); ``weight.nested_absmax`` -> ``nested_scales``;
  ``weight.quant_state.bitsandbytes__<nf4|fp4>`` (the bytes of a JSON object: ``quant_type``, ``blocksize``,
  ``dtype``, ``shape``, ``nested_offset``...) -> the static fields and ``offset``; ``weight.quant_map`` and
  ``weight.nested_quant_map`` are the code books, checked against jaxpeft's.
* 8-bit ``<module>.weight`` (int8, ``(out, in)``) -> ``codes``; ``<module>.SCB`` (each row's absmax) / 127 ->
  ``scales``, one block per row.

Loading (``load_pretrained`` on a folder whose ``config.json`` has ``quantization_config.quant_method ==
"bitsandbytes"``): the quantized weights dequantize to ``bnb_4bit_compute_dtype`` (4-bit) unless the caller passes
``param_dtype``; 8-bit weights to ``param_dtype`` (float32 by default). Saving (``save_pretrained``) writes
this layout back, with a ``quantization_config`` that transformers reads.

Example:
    >>> from jaxpeft.models import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("folder-saved-by-bitsandbytes")  # doctest: +SKIP
    >>> model.quantization_config.quant_type  # doctest: +SKIP
    'nf4'
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import quantization
from jaxpeft.quantization import QuantizationConfig, QuantizedArray

QUANT_METHOD = "bitsandbytes"
FOUR_BIT_TYPES = ("nf4", "fp4")
_CODE_BOOKS = {"nf4": quantization.NF4_CODE, "fp4": quantization.FP4_CODE}
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
_FOUR_BIT_PART = re.compile(r"^(?P<weight>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|"
                            r"quant_state\.bitsandbytes__\w+)$")
_EIGHT_BIT_PART = re.compile(r"^(?P<module>.+)\.(?P<part>SCB|weight_format)$")


# --------------------------------------------------------------------------------------------------------------
# config.json's quantization_config
# --------------------------------------------------------------------------------------------------------------


def checkpoint_quantization(config: Any) -> Mapping | None:
    """The ``quantization_config`` of a transformers config as a dict when it is a bitsandbytes one, else None.

    Another quantization method (GPTQ, AWQ, ...) is a one-line ``ValueError``.

    Example:
        >>> import transformers
        >>> checkpoint_quantization(transformers.LlamaConfig()) is None
        True
    """
    value = getattr(config, "quantization_config", None)
    if value is None:
        return None
    value = dict(value) if isinstance(value, Mapping) else value.to_dict()
    method = value.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"config.json quantization_config.quant_method {method!r} is not supported; jaxpeft reads "
                         f"{QUANT_METHOD!r} checkpoints (or load the float model and pass quantization_config=)")
    return value


def _is_4bit(bnb_config: Mapping) -> bool:
    return bool(bnb_config.get("load_in_4bit") or bnb_config.get("_load_in_4bit"))


def _is_8bit(bnb_config: Mapping) -> bool:
    return bool(bnb_config.get("load_in_8bit") or bnb_config.get("_load_in_8bit"))


def dtype_name(value: Any, field: str = "bnb_4bit_compute_dtype") -> str:
    """The jax dtype name of a torch dtype as transformers writes it (``"bfloat16"``, ``"torch.float16"``).

    Example:
        >>> dtype_name("torch.bfloat16")
        'bfloat16'
    """
    name = str(value).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"quantization_config.{field} {value!r} is not one of {', '.join(_FLOAT_DTYPES)}")
    return name


def to_quantization_config(bnb_config: Mapping, block_size: int = 64) -> QuantizationConfig:
    """The ``jaxpeft.QuantizationConfig`` of a bitsandbytes ``quantization_config`` dict (the block size is not in
    it: bitsandbytes' default 64 unless given, e.g. from a weight's quant_state).

    Example:
        >>> to_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
        ...     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}).double_quant
        True
    """
    skip = bnb_config.get("llm_int8_skip_modules") or None
    if _is_4bit(bnb_config):
        quant_type = bnb_config.get("bnb_4bit_quant_type", "fp4")  # transformers' default
        if quant_type not in FOUR_BIT_TYPES:
            raise ValueError(f"quantization_config.bnb_4bit_quant_type {quant_type!r} is not a bitsandbytes 4-bit "
                             f"type ({', '.join(FOUR_BIT_TYPES)})")
        compute = dtype_name(bnb_config.get("bnb_4bit_compute_dtype") or "float32")
        return QuantizationConfig(quant_type, block_size, double_quant=bool(bnb_config.get(
            "bnb_4bit_use_double_quant")), compute_dtype=compute, skip_modules=skip)
    if _is_8bit(bnb_config):
        return QuantizationConfig("int8", None, skip_modules=skip)
    raise ValueError("quantization_config (bitsandbytes) has neither load_in_4bit nor load_in_8bit set")


def loaded_quantization_config(bnb_config: Mapping, variables: Any) -> QuantizationConfig:
    """``to_quantization_config`` with the block size and compute dtype of the first 4-bit weight of
    ``variables`` (as loaded)."""
    leaves = jax.tree.leaves(variables, is_leaf=quantization.is_quantized)
    four_bit = [leaf for leaf in leaves if quantization.is_quantized(leaf) and leaf.quant_type in FOUR_BIT_TYPES
                and leaf.block_size in quantization.BLOCK_SIZES]
    qconfig = to_quantization_config(bnb_config, four_bit[0].block_size if four_bit else 64)
    return dataclasses.replace(qconfig, compute_dtype=four_bit[0].dtype_name) if four_bit else qconfig


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def parse_quant_state(array: np.ndarray, name: str) -> dict:
    """The JSON object packed in a ``quant_state.bitsandbytes__*`` tensor (its UTF-8 bytes as uint8).

    Example:
        >>> parse_quant_state(np.frombuffer(b'{"blocksize": 64}', np.uint8), "w")
        {'blocksize': 64}
    """
    try:
        state = json.loads(np.ascontiguousarray(array).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{name}: not a bitsandbytes quant_state (the bytes of a JSON object)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{name}: not a bitsandbytes quant_state (the bytes of a JSON object)")
    return state


def _companions(names: list[str]) -> dict[str, dict[str, str]]:
    """Weight name -> {part: tensor name} of the bitsandbytes tensors that belong to it."""
    parts: dict[str, dict[str, str]] = {}
    for name in names:
        four = _FOUR_BIT_PART.match(name)
        eight = _EIGHT_BIT_PART.match(name)
        if four:
            part = "quant_state" if four["part"].startswith("quant_state.") else four["part"]
            parts.setdefault(four["weight"], {})[part] = name
        elif eight:
            parts.setdefault(eight["module"] + ".weight", {})[eight["part"]] = name
    return parts


def _require(tensors: Mapping, parts: Mapping[str, str], weight: str, part: str) -> np.ndarray:
    if part not in parts:
        raise ValueError(f"bitsandbytes checkpoint: missing tensor {weight}.{part} (saved with {weight})")
    return np.asarray(tensors[parts[part]])


def _check_code(stored: np.ndarray, expected: np.ndarray, name: str) -> None:
    if stored.shape != expected.shape or not np.array_equal(stored.astype(np.float32), expected):
        raise ValueError(f"{name}: a code book other than bitsandbytes' standard one, which jaxpeft cannot read")


def _state_fields(state: Mapping, name: str) -> tuple[str, int, tuple[int, int]]:
    """(quant_type, blocksize, shape) of a 4-bit quant_state, checked."""
    quant_type = state.get("quant_type")
    if quant_type not in FOUR_BIT_TYPES:
        raise ValueError(f"{name}: unknown quant_type {quant_type!r} (bitsandbytes 4-bit has "
                         f"{', '.join(FOUR_BIT_TYPES)})")
    block, shape = state.get("blocksize"), state.get("shape")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"{name}: blocksize {block!r} is not a positive integer")
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"{name}: shape {shape!r} is not the [out, in] of a linear weight")
    return quant_type, block, (shape[0], shape[1])


def _check_sizes(weight: str, codes: np.ndarray, scales: np.ndarray, shape: tuple[int, int], block: int) -> None:
    n = shape[0] * shape[1]
    if codes.size != -(-n // 2) or scales.size != -(-n // block):
        raise ValueError(f"{weight}: {codes.size} code bytes and {scales.size} absmax values do not fit shape "
                         f"{list(shape)} in blocks of {block} (expected {-(-n // 2)} and {-(-n // block)})")


def _nested(tensors: Mapping, parts: Mapping[str, str], weight: str, state: Mapping) -> dict[str, np.ndarray]:
    """The double-quantization children (``nested_scales``, ``offset``) of a 4-bit weight; {} without."""
    if "nested_absmax" not in parts and "nested_offset" not in state:
        return {}
    nested_block = state.get("nested_blocksize", quantization.NESTED_BLOCK)
    if nested_block != quantization.NESTED_BLOCK:
        raise ValueError(f"{weight}: nested_blocksize {nested_block!r}; jaxpeft reads "
                         f"{quantization.NESTED_BLOCK} (bitsandbytes' double quantization)")
    if "nested_offset" not in state:
        raise ValueError(f"{weight}.quant_state: missing field nested_offset (the weight has nested_absmax)")
    _check_code(_require(tensors, parts, weight, "nested_quant_map"), quantization.DYNAMIC_CODE,
                f"{weight}.nested_quant_map")
    return {"nested_scales": _require(tensors, parts, weight, "nested_absmax").astype(np.float32),
            "offset": np.asarray(state["nested_offset"], np.float32)}


def read_4bit_weight(tensors: Mapping, parts: Mapping[str, str], weight: str, dtype: str) -> QuantizedArray:
    """The ``QuantizedArray`` (torch ``(out, in)`` layout) of a bitsandbytes 4-bit ``weight`` and its ``parts``."""
    state = parse_quant_state(_require(tensors, parts, weight, "quant_state"), parts["quant_state"])
    quant_type, block, shape = _state_fields(state, parts["quant_state"])
    codes = np.ascontiguousarray(np.asarray(tensors[weight])).view(np.uint8).reshape(-1)
    scales = _require(tensors, parts, weight, "absmax").reshape(-1)
    _check_code(_require(tensors, parts, weight, "quant_map"), _CODE_BOOKS[quant_type], f"{weight}.quant_map")
    _check_sizes(weight, codes, scales, shape, block)
    nested = _nested(tensors, parts, weight, state)
    if not nested and scales.dtype != np.float32:
        raise ValueError(f"{weight}.absmax: {scales.dtype} without double quantization (expected float32)")
    return QuantizedArray(codes=codes, scales=scales if nested else scales.astype(np.float32), **nested,
                          quant_type=quant_type, block_size=block, stored_shape=shape, perm=(0, 1),
                          stack_shape=(), dtype_name=dtype)


def read_8bit_weight(tensors: Mapping, parts: Mapping[str, str], weight: str, dtype: str) -> QuantizedArray:
    """The ``QuantizedArray`` of an LLM.int8 ``weight`` (int8 ``(out, in)``) and its ``SCB`` row absmax."""
    codes = np.asarray(tensors[weight])
    scb = _require(tensors, parts, weight, "SCB").astype(np.float32).reshape(-1)
    if codes.dtype != np.int8 or codes.ndim != 2 or scb.size != codes.shape[0]:
        raise ValueError(f"{weight}: an int8 (out, in) weight with one SCB value per row expected, got "
                         f"{codes.dtype} {codes.shape} and {scb.size} SCB values")
    if "weight_format" in parts and np.any(np.asarray(tensors[parts["weight_format"]]) != _ROW_FORMAT):
        raise ValueError(f"{parts['weight_format']}: only the row-major int8 layout ('row', 0) is supported")
    return QuantizedArray(codes=codes.reshape(-1), scales=int8_scales(scb), quant_type="int8",
                          block_size=codes.shape[1], stored_shape=tuple(codes.shape), perm=(0, 1), stack_shape=(),
                          dtype_name=dtype)


class BnbTensors(Mapping):
    """The tensors of a bitsandbytes checkpoint as the loader reads them: each quantized ``<module>.weight`` a
    ``QuantizedArray`` (read when looked up), its companion tensors hidden, every other tensor as stored.

    Example:
        >>> from jaxpeft.models import hub
        >>> tensors = BnbTensors(hub.read_checkpoint_tensors("bnb-folder", lazy=True))  # doctest: +SKIP
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], four_bit_dtype: str = "float32",
                 eight_bit_dtype: str = "float32"):
        self._tensors = tensors
        self._parts = _companions(list(tensors))
        hidden = {name for parts in self._parts.values() for name in parts.values()}
        self._names = [name for name in tensors if name not in hidden]
        self._dtypes = (four_bit_dtype, eight_bit_dtype)
        for weight, parts in self._parts.items():
            if weight not in tensors:
                raise ValueError(f"bitsandbytes checkpoint: missing tensor {weight} (its {sorted(parts)} are there)")

    def __getitem__(self, name: str) -> Any:
        parts = self._parts.get(name)
        if parts is None:
            return self._tensors[name]
        if "SCB" in parts or "weight_format" in parts:
            return read_8bit_weight(self._tensors, parts, name, self._dtypes[1])
        return read_4bit_weight(self._tensors, parts, name, self._dtypes[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _not_expressible(name: str, leaf: QuantizedArray, why: str) -> ValueError:
    return ValueError(f"{name}: {leaf.quant_type} weight {why}, which bitsandbytes cannot store; save a float "
                      "model instead (merge_and_unload() or quantization.dequantize_tree(model.params))")


def _check_expressible(name: str, leaf: QuantizedArray) -> None:
    if leaf.quant_type not in FOUR_BIT_TYPES + ("int8",):
        raise _not_expressible(name, leaf, "(bitsandbytes has nf4, fp4 and row-wise int8)")
    if leaf.stack_shape or len(leaf.stored_shape) != 2 or leaf.perm != (0, 1) or leaf.offsets is not None:
        raise _not_expressible(name, leaf, f"of shape {leaf.shape} is not a torch (out, in) linear weight")
    if leaf.quant_type == "int8" and leaf.block_size != leaf.stored_shape[1]:
        raise _not_expressible(name, leaf, f"has blocks of {leaf.block_size}, not one scale per output row")


# Each int8 row scale from bitsandbytes' SCB (row absmax) exactly as jaxpeft's int8 quantizer computes a scale from
# a row absmax (a jitted ``absmax / 127``), so that a row quantized by jaxpeft saves as its absmax and reloads the same.
_int8_scales = jax.jit(lambda absmax: absmax / 127.0)


def int8_scales(scb: np.ndarray) -> np.ndarray:
    """The int8 row scales (float32) of bitsandbytes' ``SCB`` row absmax values: ``SCB / 127``.

    Example:
        >>> float(int8_scales(np.float32([127.0]))[0])
        1.0
    """
    return np.asarray(_int8_scales(np.asarray(scb, np.float32)))


def _trailing_zero_bits(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32).astype(np.int64)
    lowest = bits & -bits
    return np.where(lowest == 0, 32, np.log2(np.maximum(lowest, 1)).astype(np.int64))


def int8_row_absmax(scales: np.ndarray) -> np.ndarray:
    """bitsandbytes' ``SCB`` (row absmax) for int8 row ``scales``: a float32 within two ulps of ``127 * scales``
    whose ``int8_scales`` is ``scales`` exactly (there is one for every scale a row absmax gave), the shortest
    such (bitsandbytes' SCB are float16 values) and then the nearest; so a reload is bit-identical.

    Example:
        >>> scb = np.float32([0.3, 1e-3, 2.5])
        >>> bool(np.all(int8_row_absmax(int8_scales(scb)) == scb))
        True
    """
    scales = np.asarray(scales, np.float32).reshape(-1)
    guess = (scales.astype(np.float64) * 127.0).astype(np.float32)
    down1, up1 = np.nextafter(guess, np.float32(-np.inf)), np.nextafter(guess, np.float32(np.inf))
    candidates = np.stack([guess, down1, up1, np.nextafter(down1, np.float32(-np.inf)),
                           np.nextafter(up1, np.float32(np.inf))])  # nearest first
    exact = int8_scales(candidates) == scales
    score = np.where(exact, _trailing_zero_bits(candidates), -1)
    best = candidates[np.argmax(score, axis=0), np.arange(scales.size)]
    return np.where(exact.any(axis=0), best, guess)


def write_4bit_weight(name: str, leaf: QuantizedArray) -> dict[str, np.ndarray]:
    """The bitsandbytes tensors of a 4-bit ``QuantizedArray`` in torch layout saved as ``name``."""
    state: dict[str, Any] = {"quant_type": leaf.quant_type, "blocksize": leaf.block_size,
                             "dtype": leaf.dtype_name, "shape": list(leaf.stored_shape)}
    tensors = {name: np.asarray(leaf.codes, np.uint8).reshape(-1, 1),
               f"{name}.absmax": np.asarray(leaf.scales),
               f"{name}.quant_map": _CODE_BOOKS[leaf.quant_type].copy()}
    if leaf.nested_scales is not None:
        state.update(nested_blocksize=quantization.NESTED_BLOCK, nested_dtype="float32",
                     nested_offset=float(np.asarray(leaf.offset, np.float32)))
        tensors.update({f"{name}.absmax": np.asarray(leaf.scales, np.uint8),
                        f"{name}.nested_absmax": np.asarray(leaf.nested_scales, np.float32),
                        f"{name}.nested_quant_map": quantization.DYNAMIC_CODE.copy()})
    tensors[f"{name}.quant_state.bitsandbytes__{leaf.quant_type}"] = np.frombuffer(
        json.dumps(state).encode("utf-8"), np.uint8).copy()
    return tensors


def write_8bit_weight(name: str, leaf: QuantizedArray) -> dict[str, np.ndarray]:
    """The LLM.int8 tensors (``weight``, ``SCB``, ``weight_format``) of a row-wise int8 ``QuantizedArray``."""
    module = name.removesuffix(".weight")
    return {name: np.asarray(leaf.codes, np.int8).reshape(leaf.stored_shape),
            f"{module}.SCB": int8_row_absmax(np.asarray(leaf.scales)),
            f"{module}.weight_format": np.asarray(_ROW_FORMAT, np.uint8)}


def _kind(leaf: QuantizedArray) -> tuple[str, bool]:
    return leaf.quant_type, leaf.nested_scales is not None


def _skip_modules(quantized: list[str], floats: list[str]) -> list[str]:
    """The float linear modules, by their last name when no quantized module shares it, else in full."""
    quantized_last = {name.rsplit(".", 1)[-1] for name in quantized}
    return sorted({name if name.rsplit(".", 1)[-1] in quantized_last else name.rsplit(".", 1)[-1]
                   for name in floats})


def config_dict(quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> dict:
    """The ``quantization_config`` of config.json that transformers' ``BitsAndBytesConfig`` reads.

    Example:
        >>> config_dict("nf4", False, "bfloat16", ["lm_head"])["bnb_4bit_compute_dtype"]
        'bfloat16'
    """
    four = quant_type in FOUR_BIT_TYPES
    return {"_load_in_4bit": four, "_load_in_8bit": not four, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip_modules or None,
            "llm_int8_threshold": 6.0, "load_in_4bit": four, "load_in_8bit": not four,
            "quant_method": QUANT_METHOD}


def to_bnb_tensors(tensors: Mapping[str, Any], float_linear: list[str] | None = None
                   ) -> tuple[dict[str, Any], dict | None]:
    """``(tensors, quantization_config)``: Hugging Face ``tensors`` whose quantized weights (``QuantizedArray`` in
    torch layout) are written out in the bitsandbytes layout, and the config.json ``quantization_config`` for
    them (None when nothing is quantized). ``float_linear`` names the linear modules kept in float (the
    ``llm_int8_skip_modules``; default: every other 2-D float ``*.weight``). A weight bitsandbytes cannot store,
    or a mix of kinds one config cannot describe, is a one-line ``ValueError``.

    Example:
        >>> to_bnb_tensors({"w": np.ones(2, np.float32)})[1] is None
        True
    """
    quantized = {name: leaf for name, leaf in tensors.items() if quantization.is_quantized(leaf)}
    if not quantized:
        return dict(tensors), None
    for name, leaf in quantized.items():
        _check_expressible(name, leaf)
    kinds = {_kind(leaf) for leaf in quantized.values()}
    if len(kinds) > 1:
        raise ValueError(f"bitsandbytes stores one kind of quantized weight per model, this one has {sorted(kinds)} "
                         "(quant type, double quant); save a float model instead (merge_and_unload())")
    out = {name: value for name, value in tensors.items() if name not in quantized}
    for name, leaf in quantized.items():
        out.update((write_8bit_weight if leaf.quant_type == "int8" else write_4bit_weight)(name, leaf))
    floats = float_linear if float_linear is not None else [
        name.removesuffix(".weight") for name, value in out.items()
        if name.endswith(".weight") and np.ndim(value) == 2 and jnp.issubdtype(np.asarray(value).dtype, jnp.floating)]
    (quant_type, double_quant), = kinds
    first = next(iter(quantized.values()))
    skip = _skip_modules([name.removesuffix(".weight") for name in quantized], floats)
    return out, config_dict(quant_type, double_quant, first.dtype_name, skip)
