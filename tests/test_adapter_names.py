"""Adapter names are checked wherever they enter, saves never leave their folder, bad adapter tensors never load.

Every refused call is checked to write nothing: the whole temporary tree (the target folder, its parent and its
siblings) is compared byte for byte before and after.
"""

import copy
import dataclasses
import os
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import jaxpeft
from jaxpeft import hf_format, tree, weighted_adapter
from jaxpeft.core import AdapterError, AdapterMix, check_adapter_name
from jaxpeft.models import AutoModelForSequenceClassification

CONFIG = jaxpeft.LoraConfig(r=2, target_modules=["query", "value"])
INPUTS = {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}
IDS = np.array([[1, 5, 9, 2], [1, 7, 3, 2]])
ABSOLUTE = "<an absolute path inside the test's tree>"  # replaced by the real path in each test

# (name, words of the error)
BAD_NAMES = [
    pytest.param(3, "must be a str, not int", id="int"),
    pytest.param(None, "must be a str, not NoneType", id="None"),
    pytest.param(b"x", "must be a str, not bytes", id="bytes"),
    pytest.param("", "is empty", id="empty"),
    pytest.param(".", "names a folder itself or its parent", id="dot"),
    pytest.param("..", "names a folder itself or its parent", id="dotdot"),
    pytest.param("../../x", "contains the path separator '/'", id="parent-path"),
    pytest.param("a/b", "contains the path separator '/'", id="slash"),
    pytest.param("a\\b", "contains the path separator '\\\\'", id="backslash"),
    pytest.param(ABSOLUTE, "contains the path separator '/'", id="absolute"),
    pytest.param("a\x00b", "control or invisible character U+0000", id="NUL"),
    pytest.param("a\nb", "control or invisible character U+000A", id="newline"),
    pytest.param("\u202eabc", "control or invisible character U+202E", id="right-to-left-override"),
    pytest.param(" x", "begins or ends with a space", id="space"),
    pytest.param("__base__", "is reserved", id="reserved"),
    pytest.param("x" * 201, "is 201 bytes long", id="too-long"),
]
VALID_NAMES = ["my-adapter_2", "é", "v1.2"]


# ----- the model, a saved adapter, and what "nothing changed" means -----

@pytest.fixture(scope="module")
def base():
    return AutoModelForSequenceClassification.from_config(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2))


@pytest.fixture(scope="module")
def model(base):
    return jaxpeft.get_peft_model(base, dataclasses.replace(CONFIG, init_lora_weights=False))


@pytest.fixture(scope="module")
def root(tmp_path_factory, model):
    """A tree with a saved default adapter in ``parent/target`` and a sibling file beside ``target``."""
    root = tmp_path_factory.mktemp("names")
    model.save_pretrained(root / "parent" / "target")
    (root / "parent" / "sibling.txt").write_text("keep me")
    return root


def _snapshot(folder) -> dict[str, bytes | str | None]:
    """Every path under ``folder``: a file's bytes, a link's target, None for a folder."""
    found: dict[str, bytes | str | None] = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[relative] = "-> " + os.readlink(path)
            else:
                found[relative] = None if os.path.isdir(path) else pathlib.Path(path).read_bytes()
    return found


def _state(peft_model) -> tuple:
    """What a failed call must leave as it was (the params by identity: the tree is never changed in place)."""
    return (id(peft_model.params), dict(peft_model.peft_config), dict(peft_model.adapter_folders),
            peft_model.active_adapter)


def _with_copy_of_default(params, name):
    """``params`` plus a copy of the default adapter's leaves under ``name``, as if a name had slipped through."""
    flat = tree.flatten(params)
    for path, leaf in list(flat.items()):
        for i, key in enumerate(path[:-1]):
            if key in tree.ADAPTER_KEYS:
                if path[i + 1] == "default":
                    flat[path[:i + 1] + (name,) + path[i + 2:]] = leaf
                break
    return tree.unflatten_like(flat, params)


def _tampered(peft_model, name):
    """A shallow copy of ``peft_model`` holding the default adapter also under ``name``, never checked."""
    clone = copy.copy(peft_model)
    clone.peft_config = {**peft_model.peft_config, name: peft_model.peft_config["default"]}
    clone.params = _with_copy_of_default(peft_model.params, name)
    clone._runners = {}
    return clone


# ----- every entry point, every bad name -----

def _new_name_calls(base, model, target):
    """Calls that take a new adapter name."""
    return {
        "get_peft_model": lambda name: jaxpeft.get_peft_model(base, CONFIG, adapter_name=name),
        "PeftModel": lambda name: jaxpeft.PeftModel(base, CONFIG, adapter_name=name),
        "add_adapter": lambda name: model.add_adapter(name, CONFIG),
        "load_adapter": lambda name: model.load_adapter(target, name),
        "from_pretrained": lambda name: jaxpeft.PeftModel.from_pretrained(base, target, adapter_name=name),
        "add_weighted_adapter": lambda name: model.add_weighted_adapter(["default"], [1.0], name,
                                                                        combination_type="linear"),
        "init_adapters": lambda name: jaxpeft.init_adapters(jax.random.key(0), CONFIG, base.apply_fn, base.params,
                                                            adapter_name=name, **INPUTS),
        "save_adapter": lambda name: jaxpeft.save_adapter(target, model.params, CONFIG, base.apply_fn,
                                                          adapter_name=name, **INPUTS),
        "save_adapter of a slipped-through name": lambda name: jaxpeft.save_adapter(
            target, _with_copy_of_default(model.params, name), CONFIG, base.apply_fn, adapter_name=name, **INPUTS),
        "save_pretrained of a slipped-through name": lambda name: _tampered(model, name).save_pretrained(target),
        "functional load_adapter": lambda name: jaxpeft.load_adapter(target, base.apply_fn, base.params,
                                                                     adapter_name=name, **INPUTS),
        "functional add_weighted_adapter": lambda name: weighted_adapter.add_weighted_adapter(
            model.params, model.peft_config, ["default"], [1.0], name, base.apply_fn, combination_type="linear",
            **INPUTS),
        "adapter_folder": lambda name: hf_format.adapter_folder(target, name),
        "rewrite": lambda name: jaxpeft.rewrite(base.apply_fn, {name: CONFIG}),
        "AdapterMix.of": lambda name: AdapterMix.of(["default", name]),
        "mixed batch": lambda name: model(IDS, adapter_names=["default", name]),
        "check_adapter_name": check_adapter_name,
    }


def _existing_name_calls(model, target):
    """Calls that look an adapter up: a bad name there is no adapter."""
    return {
        "set_adapter": lambda name: model.set_adapter(name),
        "delete_adapter": lambda name: model.delete_adapter(name),
        "save_pretrained": lambda name: model.save_pretrained(target, selected_adapters=[name]),
        "merge_and_unload": lambda name: model.merge_and_unload(name),
    }


NEW_NAME_CALLS = list(_new_name_calls(None, None, None))
EXISTING_NAME_CALLS = list(_existing_name_calls(None, None))
_SLIPPED_THROUGH = ("save_adapter of a slipped-through name", "save_pretrained of a slipped-through name")


def _refused_without_a_trace(root, model, call, name, error_type, words):
    before, state = _snapshot(root), _state(model)
    with pytest.raises(error_type) as error:
        call(name)
    message = str(error.value)
    assert words in message and "\n" not in message
    assert _snapshot(root) == before
    assert _state(model) == state


def _applicable(calls, excluded):
    """(call, name, words) for every call and bad name, but the pairs ``excluded(call, name)`` says do not apply."""
    return [pytest.param(call, *bad.values, id=f"{call}-{bad.id}") for call in calls for bad in BAD_NAMES
            if not excluded(call, bad.values[0])]


def _not_a_new_name_case(call_name, name):
    # a name that is not a str cannot slip into the params' tree of names; '__base__' is the mixed batch's base model
    return (call_name in _SLIPPED_THROUGH and not isinstance(name, str)) or (
        call_name in ("AdapterMix.of", "mixed batch") and name == "__base__")


@pytest.mark.parametrize(("call_name", "name", "words"), _applicable(NEW_NAME_CALLS, _not_a_new_name_case))
def test_bad_new_names_are_refused_and_nothing_is_written(base, model, root, call_name, name, words):
    target = root / "parent" / "target"
    name = str(root / "x") if name == ABSOLUTE else name
    error_type = AdapterError
    if call_name in ("AdapterMix.of", "mixed batch") and not isinstance(name, str):
        error_type, words = TypeError, "one adapter name (or '__base__') per example"
    _refused_without_a_trace(root, model, _new_name_calls(base, model, target)[call_name], name, error_type, words)


@pytest.mark.parametrize(("call_name", "name", "words"), _applicable(
    EXISTING_NAME_CALLS, lambda call, name: call == "merge_and_unload" and name is None))  # None: the active one
def test_bad_names_of_existing_adapters_are_no_adapter(model, root, call_name, name, words):
    del words
    name = str(root / "x") if name == ABSOLUTE else name
    calls = _existing_name_calls(model, root / "parent" / "target")
    _refused_without_a_trace(root, model, calls[call_name], name, AdapterError, "no adapter named")


def test_every_refusal_says_what_names_are_allowed():
    for param in BAD_NAMES:
        name = "/x" if param.values[0] == ABSOLUTE else param.values[0]
        with pytest.raises(AdapterError, match="an adapter name is a non-empty str of at most 200 bytes without "
                                               r"path separators.*e\.g\. 'default', 'my-adapter_2'"):
            check_adapter_name(name)


# ----- writers: inside the folder, off the default adapter's files -----

UNSAFE_SUB_FOLDERS = [
    pytest.param("adapter_config.json", "would replace the default adapter's adapter_config.json", id="config"),
    pytest.param("Adapter_Model.SAFETENSORS", "would replace the default adapter's Adapter_Model.SAFETENSORS",
                 id="weights-in-other-case"),
    pytest.param("adapter_model.bin", "would replace the default adapter's adapter_model.bin", id="torch-weights"),
    pytest.param("out_link", "which is not a folder inside", id="link-outside"),
    pytest.param("self_link", "which is not a folder inside", id="link-to-itself"),
    pytest.param("notes.txt", "a file of that name is in the way", id="existing-file"),
]


@pytest.fixture(scope="module")
def linked_root(tmp_path_factory, model):
    """A saved default adapter in ``target`` with a file, a link to a folder outside and a link to itself."""
    root = tmp_path_factory.mktemp("links")
    target, outside = root / "target", root / "outside"
    model.save_pretrained(target)
    outside.mkdir()
    (outside / "keep.txt").write_text("keep me")
    (target / "notes.txt").write_text("keep me too")
    os.symlink(outside, target / "out_link")
    os.symlink(target, target / "self_link")
    return root


@pytest.mark.parametrize(("name", "words"), UNSAFE_SUB_FOLDERS)
def test_writers_never_leave_the_folder_nor_touch_the_default_files(base, model, linked_root, name, words):
    target = linked_root / "target"
    tampered = _tampered(model, name)  # the name itself is fine: the folder it would take is not
    assert check_adapter_name(name) == name
    calls = {
        "save_pretrained": lambda name: tampered.save_pretrained(target),  # default first: checked before it too
        "save_adapter": lambda name: jaxpeft.save_adapter(target, tampered.params, CONFIG, base.apply_fn,
                                                          adapter_name=name, **INPUTS),
    }
    for call in calls.values():
        _refused_without_a_trace(linked_root, tampered, call, name, AdapterError, words)


# ----- good names still work -----

def test_valid_names_save_in_their_sub_folders_and_load_back(base, tmp_path):
    trained = dataclasses.replace(CONFIG, init_lora_weights=False)
    peft_model = jaxpeft.get_peft_model(base, trained)
    for seed, name in enumerate(VALID_NAMES, start=1):
        peft_model.add_adapter(name, trained, seed=seed)
    peft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([hf_format.CONFIG_NAME, hf_format.WEIGHTS_NAME, *VALID_NAMES])
    reloaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    for name in VALID_NAMES:
        assert sorted(os.listdir(tmp_path / name)) == [hf_format.CONFIG_NAME, hf_format.WEIGHTS_NAME]
        reloaded.load_adapter(tmp_path / name, name)
    ids, mix = np.concatenate([IDS, IDS]), ["default", *VALID_NAMES]
    np.testing.assert_allclose(reloaded(ids, adapter_names=mix).logits, peft_model(ids, adapter_names=mix).logits,
                               atol=1e-6)
    reloaded.set_adapter("é")
    reloaded.delete_adapter("é")
    assert list(reloaded.peft_config) == ["default", "my-adapter_2", "v1.2"]


# ----- adapter files: finite floating-point tensors only, and nothing half-loaded -----

def _spoil(values: np.ndarray, how: str) -> np.ndarray:
    if how in ("nan", "inf"):
        spoiled = values.copy()
        spoiled.flat[0] = np.nan if how == "nan" else -np.inf
        return spoiled
    return values.astype(np.int64 if how == "int" else bool)


@pytest.mark.parametrize(("how", "words"), [("nan", "holds NaN or infinite values"),
                                            ("inf", "holds NaN or infinite values"),
                                            ("int", "holds I64 values, not floating point ones"),
                                            ("bool", "holds BOOL values, not floating point ones")])
def test_adapter_tensors_that_are_not_finite_floats_are_refused(base, model, tmp_path, how, words):
    model.save_pretrained(tmp_path)
    weights = tmp_path / hf_format.WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(weights)
    key = sorted(tensors)[-1]
    tensors[key] = _spoil(tensors[key], how)
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    calls = {
        "load_adapter": lambda name: model.load_adapter(tmp_path, name),
        "from_pretrained": lambda name: jaxpeft.PeftModel.from_pretrained(base, tmp_path, adapter_name=name),
        "functional load_adapter": lambda name: jaxpeft.load_adapter(tmp_path, base.apply_fn, base.params,
                                                                     adapter_name=name, **INPUTS),
    }
    for call in calls.values():
        _refused_without_a_trace(tmp_path, model, call, "spoiled", AdapterError,
                                 f"{weights}: tensor {key!r} {words}; the adapter was not loaded")
    assert "spoiled" not in model.peft_config


def test_bfloat16_adapter_files_load(base, model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / hf_format.WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(weights)
    safetensors.torch.save_file({key: torch.from_numpy(value).to(torch.bfloat16) for key, value in tensors.items()},
                                weights, metadata={"format": "pt"})
    reloaded = jaxpeft.PeftModel.from_pretrained(base, tmp_path)
    loaded = tree.flatten(reloaded.params)
    for path, leaf in tree.flatten(model.params).items():
        if "lora_A" in path or "lora_B" in path:
            np.testing.assert_allclose(loaded[path], leaf, rtol=1e-2, atol=1e-3)
