"""Finding a checkpoint and reading/writing its ``*.safetensors`` tensors as numpy arrays (never through torch).

Example:
    >>> import tempfile, numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> write_safetensors({"w": np.ones((2, 3), np.float32)}, f"{folder}/model.safetensors")
    >>> read_checkpoint_tensors(folder)["w"].shape
    (2, 3)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxpeft import quantization

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes; safetensors refuses longer headers
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "generation_config.json"]


def _hub_is_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or flag.upper() in ("1", "ON", "YES", "TRUE")


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """The local folder of a checkpoint: ``name_or_path`` itself, else the Hugging Face cache, else the hub.

    Raises:
        FileNotFoundError: a one-line message naming the id when it is neither local, cached nor downloadable.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a file; pass the folder holding config.json and *.safetensors (or a .gguf).")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure of the cache lookup means "not cached"
        pass
    if _hub_is_offline():
        raise FileNotFoundError(
            f"Model {name!r} is not a local folder and not in the Hugging Face cache, and the hub is offline "
            "(HF_HUB_OFFLINE); pass the path of a local folder with config.json and *.safetensors."
        )
    try:
        return snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(
            f"Model {name!r} is not a local folder, not in the Hugging Face cache, and could not be downloaded "
            f"({type(error).__name__}); pass the path of a local folder with config.json and *.safetensors."
        ) from error


def _data_end(header: Mapping) -> int:
    """Where the last tensor of a safetensors header ends, counted from the end of the header."""
    ends = [entry.get("data_offsets", [0, 0])[-1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, Mapping)]
    return max((end for end in ends if isinstance(end, int)), default=0)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole ``.safetensors`` file (cut short, or not one at all), from its header alone;
    None when its size is what the header promises.

    Example:
        >>> import tempfile, numpy as np
        >>> path = f"{tempfile.mkdtemp()}/model.safetensors"
        >>> write_safetensors({"w": np.ones((4, 4), np.float32)}, path)
        >>> safetensors_problem(path) is None
        True
        >>> with open(path, "r+b") as file:
        ...     _ = file.truncate(100)
        >>> safetensors_problem(path)
        'the file is truncated: 100 bytes of the 160 its header promises; download or copy it again'
    """
    size = os.path.getsize(path)
    not_safetensors = "not a safetensors file (no safetensors header at its start); pass a .safetensors file"
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_size = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_size > _SAFETENSORS_HEADER_LIMIT:
            return not_safetensors
        header_bytes = file.read(header_size)
    if not header_bytes.startswith(b"{"):
        return not_safetensors
    if len(header_bytes) < header_size:
        return (f"the file is truncated: {size} bytes, less than its {8 + header_size}-byte header; download or "
                "copy it again")
    try:
        header = json.loads(header_bytes)
    except ValueError:  # also UnicodeDecodeError
        return not_safetensors
    expected = 8 + header_size + (_data_end(header) if isinstance(header, Mapping) else 0)
    if size < expected:
        return f"the file is truncated: {size} bytes of the {expected} its header promises; download or copy it again"
    return None


class LazyTensors(Mapping):
    """The tensors of safetensors files, each read from disk when it is looked up (so a loader that converts
    tensor by tensor, e.g. quantizing them, never holds the whole float checkpoint)."""

    def __init__(self, files: Mapping[str, str]):
        self._files = dict(files)  # tensor name -> file

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        try:
            with safe_open(path, framework="np") as file:
                return file.get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({str(error).strip()}).") from None

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _tensor_names(path: str) -> list[str]:
    problem = safetensors_problem(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}.")
    try:
        with safe_open(path, framework="np") as file:
            return list(file.keys())
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({str(error).strip()}).") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``).

    A truncated file, or one that is not safetensors, is a one-line ``ValueError`` naming the file.
    """
    return dict(LazyTensors({name: path for name in _tensor_names(path)}))


def read_checkpoint_tensors(folder: str, lazy: bool = False) -> Mapping[str, np.ndarray]:
    """Every tensor of the checkpoint in ``folder``: ``model.safetensors`` or the shards of its index; with
    ``lazy`` a ``LazyTensors`` mapping that reads each tensor when it is looked up."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX_FILE)
    single_path = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.exists(index_path):
        with open(index_path) as file:
            shard_names = sorted(set(json.load(file)["weight_map"].values()))
        paths = [os.path.join(folder, shard_name) for shard_name in shard_names]
    elif os.path.exists(single_path):
        paths = [single_path]
    else:
        others = sorted(f for f in os.listdir(folder)
                        if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")))
        hint = f" (found {others}; re-save it with transformers' save_pretrained())" if others else ""
        raise FileNotFoundError(f"No {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} in {folder!r}{hint}.")
    tensors = LazyTensors({name: path for path in paths for name in _tensor_names(path)})
    return tensors if lazy else dict(tensors)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Writes ``tensors`` with the ``{"format": "pt"}`` metadata that transformers' torch loader expects."""
    arrays = {name: np.require(np.asarray(array), requirements="C") for name, array in tensors.items()}  # 0-d kept
    save_file(arrays, path, metadata={"format": "pt"})


# --- Name mapping between Hugging Face tensors and linen parameter trees -------------------------------------------

# How a torch module's tensors become linen leaves: `dense` is nn.Linear (weight transposed to the [in, out]
# kernel), `conv1d` is GPT-2's Conv1D (weight already [in, out]), `norm` a LayerNorm/RMSNorm, `embed` an Embedding.
# A `raw` module's parameters keep their torch names and layouts (e.g. fused MoE experts, `experts.gate_up_proj`).
_LEAF_NAMES = {
    "dense": {"weight": "kernel", "bias": "bias"},
    "conv1d": {"weight": "kernel", "bias": "bias"},
    "norm": {"weight": "scale", "bias": "bias"},
    "embed": {"weight": "embedding"},
}


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Describes how a decoder's Hugging Face tensor names relate to its linen parameter paths.

    Attributes:
        base_prefix: the base model's attribute in the head classes (``"transformer"``, ``"model"``).
        layers_name: the ModuleList holding the layers (``"h"``, ``"layers"``).
        num_layers: number of layers.
        module_kind: module name (last part of its path) -> ``"dense"``, ``"conv1d"``, ``"norm"``, ``"embed"``
            or ``"raw"`` (parameters named and laid out as the torch tensors).
        head_modules: head -> the top-level modules that head adds to the base model (``{"causal_lm": ("lm_head",)}``).
    """

    base_prefix: str
    layers_name: str
    num_layers: int
    module_kind: Callable[[str], str]
    head_modules: Mapping[str, tuple[str, ...]]


def _leaf_from_hf(name_map: NameMap, module_path: tuple[str, ...], tensor_name: str, array: np.ndarray):
    kind = name_map.module_kind(module_path[-1])
    if kind == "raw":
        return tensor_name, array
    leaf = _LEAF_NAMES[kind].get(tensor_name)
    if leaf is None:
        return None
    return leaf, (array.T if _transposed(kind, leaf, array) else array)


def _transposed(kind: str, leaf: str, array: Any) -> bool:
    """Whether a kernel's Hugging Face tensor is its transpose: a Linear weight, and a quantized Conv1D weight
    (bitsandbytes stores Conv1D weights as the equivalent Linear's ``(out, in)``)."""
    return leaf == "kernel" and (kind == "dense" or (kind == "conv1d" and quantization.is_quantized(array)))


_CONVERT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxpeft_convert_leaf", default=None)


@contextlib.contextmanager
def converting(convert: Callable[[tuple, Any], Any] | None):
    """Within the block, ``hf_tensors_to_params`` passes each leaf through ``convert(param_path, value)`` as it
    places it (the loader quantizes this way, one tensor at a time)."""
    token = _CONVERT.set(convert)
    try:
        yield
    finally:
        _CONVERT.reset(token)


def _stack(values: list) -> Any:
    if isinstance(values[0], quantization.QuantizedArray):
        return quantization.stack(values)
    return np.stack(values)


def hf_tensors_to_params(
    tensors: Mapping[str, np.ndarray], name_map: NameMap, head: str, scan_layers: bool
) -> tuple[dict, list[str]]:
    """``(variables, unused_names)`` from Hugging Face ``tensors``, for ``ModelFamily.params_from_hf``.

    Base-model tensors are accepted with or without ``base_prefix``; scanned layers are stacked on a new axis 0
    (a leaf present in only some layers is left out, and so reported missing by the loader). Inside
    ``converting(convert)`` each leaf is converted as it is placed.
    """
    convert = _CONVERT.get() or (lambda path, value: value)
    head_modules = set(name_map.head_modules.get(head, ()))
    any_head_modules = {m for modules in name_map.head_modules.values() for m in modules}
    base_root = () if head == "base" else (name_map.base_prefix,)
    layer_pattern = re.compile(rf"^{re.escape(name_map.layers_name)}\.(\d+)\.(.+)$")
    flat: dict[tuple, np.ndarray] = {}
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    unused = []
    for name, array in tensors.items():
        parts = name.split(".")
        root = base_root
        if parts[0] in head_modules:
            root = ()
        elif parts[0] in any_head_modules:  # another head's module, e.g. lm_head when loading a classifier
            unused.append(name)
            continue
        elif parts[0] == name_map.base_prefix:
            parts = parts[1:]
        layer = None
        layer_match = layer_pattern.match(".".join(parts))
        if layer_match:
            layer = int(layer_match.group(1))
            parts = layer_match.group(2).split(".")
        leaf = None
        if len(parts) >= 2 and (layer is None or layer < name_map.num_layers):
            leaf = _leaf_from_hf(name_map, tuple(parts[:-1]), parts[-1], array)
        if leaf is None:
            unused.append(name)
            continue
        module_path, (leaf_name, value) = tuple(parts[:-1]), leaf
        if layer is None:
            flat[root + module_path + (leaf_name,)] = convert(root + module_path + (leaf_name,), value)
        elif scan_layers:
            path = root + (name_map.layers_name,) + module_path + (leaf_name,)
            stacked.setdefault(path, {})[layer] = convert(path, value)
        else:
            path = root + (name_map.layers_name, str(layer)) + module_path + (leaf_name,)
            flat[path] = convert(path, value)
    for path, by_layer in stacked.items():
        shapes = {i: tuple(array.shape) for i, array in by_layer.items()}
        if len(set(shapes.values())) > 1:
            common = max(set(shapes.values()), key=list(shapes.values()).count)
            odd = sorted(f"layer {i}: {shape}" for i, shape in shapes.items() if shape != common)
            raise ValueError(f"mis-shaped layer tensors for {'/'.join(path)}: {odd}, the other layers have {common}.")
        if len(by_layer) == name_map.num_layers:
            flat[path] = _stack([by_layer[i] for i in range(name_map.num_layers)])
    return {"params": unflatten_dict(flat)}, unused


def _layer_of(value: Any, index: int) -> Any:
    """Layer ``index`` of a scanned stack (a ``QuantizedArray`` stays quantized)."""
    if quantization.is_quantized(value):
        return jax.tree.map(lambda x: x[index], value).replace(stack_shape=value.stack_shape[1:])
    return value[index]


def params_to_hf_tensors(variables: Mapping, name_map: NameMap, head: str, scan_layers: bool) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of ``variables``, named as ``head``'s transformers class names them; a quantized
    kernel stays a ``QuantizedArray`` (in the torch layout)."""
    tensors = {}
    for path, value in flatten_dict(dict(variables["params"])).items():
        path = tuple(str(p) for p in path)
        value = value if quantization.is_quantized(value) else np.asarray(value)
        prefix, relative = "", path
        if head != "base" and path[0] == name_map.base_prefix:
            prefix, relative = name_map.base_prefix + ".", path[1:]
        layer_values: list[tuple[str, np.ndarray]]
        if relative[0] == name_map.layers_name and scan_layers:
            rest = relative[1:]
            layer_values = [(f"{name_map.layers_name}.{i}.", _layer_of(value, i)) for i in range(value.shape[0])]
        elif relative[0] == name_map.layers_name:
            rest = relative[2:]
            layer_values = [(f"{name_map.layers_name}.{relative[1]}.", value)]
        else:
            rest = relative
            layer_values = [("", value)]
        module_path, leaf = rest[:-1], rest[-1]
        kind = name_map.module_kind(module_path[-1])
        tensor_name = leaf if kind == "raw" else {v: k for k, v in _LEAF_NAMES[kind].items()}[leaf]
        for layer_prefix, array in layer_values:
            array = array.T if _transposed(kind, leaf, array) else array
            name = prefix + layer_prefix + ".".join(module_path) + "." + tensor_name
            tensors[name] = array if quantization.is_quantized(array) else np.ascontiguousarray(array)
    return tensors
