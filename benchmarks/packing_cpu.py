"""Packed against padded causal-LM batches on a real text set of mixed lengths: the BBC News articles, tokenized by
SmolLM2's tokenizer, a LoRA step of a SmolLM2-shaped Llama (fewer layers, random weights: speed does not depend on
the values), the same examples, batch size and row length both ways.

    python benchmarks/packing_cpu.py                     # 4 layers, rows of 1024 tokens, 4 rows a step
    python benchmarks/packing_cpu.py --layers 2 --max-length 512 --steps 6

Padded: each batch is ``--batch-size`` articles padded to a bucketed length (``data.CausalLMCollator``); packed:
``data.pack_examples`` rows of ``--max-length`` tokens (what ``TrainingArguments(packing=True)`` trains on).
Reported: the real (not padding) tokens per second of steady steps, the padding share and the steps an epoch
needs. Both kinds of step run round-robin so that load falls on both alike; the first step of each shape
(compilation) is left out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from lora_step_breakdown import SMOLLM2, TARGETS

import jaxpeft
from jaxpeft import assets, data, training
from jaxpeft.models import AutoModelForCausalLM, load_gguf_tokenizer


def articles(max_length: int, count: int) -> list[dict]:
    tokenizer = load_gguf_tokenizer(assets.smollm2_gguf())
    train, _ = assets.bbc_news()
    return data.tokenize([{"text": text} for text in train[:count]], tokenizer, max_length=max_length, label_key=None)


def batches(features: list[dict], batch_size: int, max_length: int, packed: bool) -> list[dict]:
    if packed:
        features = data.pack_examples(features, max_length)
        collate = data.CausalLMCollator(pad_token_id=0, max_length=max_length, buckets=(max_length,))
    else:
        collate = data.CausalLMCollator(pad_token_id=0, max_length=max_length)
    whole = len(features) // batch_size * batch_size
    return [collate(features[start : start + batch_size]) for start in range(0, whole, batch_size)]


def train_step(layers: int):
    config = transformers.LlamaConfig(**SMOLLM2, num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(config, scan_layers=True, remat_policy="full")
    peft_model = jaxpeft.get_peft_model(model, jaxpeft.LoraConfig(r=16, target_modules=TARGETS))
    optimizer = optax.adamw(1e-4)
    frozen = jaxpeft.partition(peft_model.params, peft_model.trainable_mask)[1]
    state = training.init_train_state(peft_model.params, peft_model.trainable_mask, optimizer)
    return training.make_train_step(training.peft_loss_fn(peft_model), optimizer, frozen), state


def timed(step, state, batch) -> tuple[object, float]:
    batch = {name: jnp.asarray(value) for name, value in batch.items()}
    started = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--articles", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    args = parser.parse_args()
    features = articles(args.max_length, args.articles)
    kinds = {kind: batches(features, args.batch_size, args.max_length, packed=kind == "packed")
             for kind in ("padded", "packed")}
    step, state = train_step(args.layers)
    seconds = {kind: [] for kind in kinds}
    tokens = {kind: [] for kind in kinds}
    seen_shapes = set()
    for index in range(args.steps + 2):
        for kind, rows in kinds.items():
            batch = rows[index % len(rows)]
            state, elapsed = timed(step, state, batch)
            if batch["input_ids"].shape in seen_shapes:
                seconds[kind].append(elapsed)
                tokens[kind].append(int(np.sum(batch["attention_mask"] != 0)))
            seen_shapes.add(batch["input_ids"].shape)
    print(f"backend: {jax.default_backend()}, {args.layers} SmolLM2-shaped layers, {len(features)} BBC News articles, "
          f"rows of <= {args.max_length} tokens, {args.batch_size} rows a step")
    print(f"{'batches':<8} {'steps/epoch':>12} {'padding':>8} {'s/step':>8} {'tokens/s':>9}")
    rates = {}
    for kind, rows in kinds.items():
        padding = 1 - sum(int(np.sum(b["attention_mask"] != 0)) for b in rows) / sum(b["input_ids"].size for b in rows)
        rates[kind] = sum(tokens[kind]) / sum(seconds[kind])
        print(f"{kind:<8} {len(rows):>12} {padding:>8.1%} {statistics.median(seconds[kind]):>8.2f} "
              f"{rates[kind]:>9.0f}")
    print(f"packed / padded tokens/s: {rates['packed'] / rates['padded']:.2f}")


if __name__ == "__main__":
    main()
