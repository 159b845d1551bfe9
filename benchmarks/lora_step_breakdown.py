"""Where a LoRA training step's time goes, as multiples of the base model's forward pass (with its logits), on one
SmolLM2-135M-shaped Llama (random weights; ``--layers`` of its 30), float32, LoRA r=16 on all seven projections.

    python benchmarks/lora_step_breakdown.py                  # 30 layers, 4 x 256 tokens, chunked loss
    python benchmarks/lora_step_breakdown.py --layers 4 --loss full
    python benchmarks/lora_step_breakdown.py --shape tiny     # the tiny Llama of cpu_targets.py, 8 x 128 tokens

``--shape tiny`` is the 4-layer Llama of ``cpu_targets.py`` (hidden 256, vocab 8192) with the same adapters.

Rows, each jitted and timed as the median of ``--rounds`` rounds in which every row runs twice and its second call
is timed, after two warm-up calls (the rows take turns, so the device's drift between minutes is shared out):

- ``base forward`` / ``adapted forward``: the logits, without and with the adapters;
- ``base layers`` / ``adapted layers``: the last hidden states only (no output head);
- ``adapted layers, gradient``: the gradient of the adapters through the layers alone (a fixed random projection of
  the hidden states as the loss): the layers' backward pass;
- ``loss``: the causal-LM loss (``training.peft_loss_fn``, ``--loss chunked``: the head a chunk at a time);
- ``loss, gradient``: its gradient with respect to the adapters;
- ``training step``: ``training.make_train_step`` (the gradient and AdamW).

Each row also gives its FLOPs (XLA's cost analysis), their ratio to the base forward's, the rate it ran at, and the
time it would take at the speed of one plain matmul: the floor of that row on this device.

The plan's targets: adapted forward <= 1.1x and training step <= 2.1x the base forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_targets  # noqa: E402

import jaxpeft  # noqa: E402
from jaxpeft import losses, training  # noqa: E402
from jaxpeft.models import AutoModelForCausalLM  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# shape: (layers, batch size, tokens per row) unless given
SHAPE_DEFAULTS = {"smollm2": (30, 4, 256), "tiny": (4, 8, 128)}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shape`` and the ``--layers``, ``--batch-size`` and ``--seq`` that default to the shape's."""
    parser.add_argument("--shape", choices=tuple(SHAPE_DEFAULTS), default="smollm2")
    parser.add_argument("--layers", type=int, help="30 (smollm2) or 4 (tiny) unless given")
    parser.add_argument("--batch-size", type=int, help="4 (smollm2) or 8 (tiny) unless given")
    parser.add_argument("--seq", type=int, help="256 (smollm2) or 128 (tiny) unless given")


def parse_shape_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    for name, default in zip(("layers", "batch_size", "seq"), SHAPE_DEFAULTS[args.shape], strict=True):
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    return args


def llama_config(layers: int, shape: str = "smollm2") -> transformers.LlamaConfig:
    if shape == "tiny":
        return cpu_targets.llama_config(layers)
    return transformers.LlamaConfig(**SMOLLM2, num_hidden_layers=layers, bos_token_id=0, eos_token_id=0)


def llama_lora(layers: int, shape: str = "smollm2", **model_options):
    """``(config, base, model)``: a Llama of ``shape`` (``"smollm2"``: SmolLM2-135M's, ``"tiny"``: cpu_targets.py's)
    with ``layers`` layers (random weights; ``model_options`` go to ``from_config``, float32 and scanned unless
    given), and it with LoRA r=16 on all seven projections."""
    config = llama_config(layers, shape)
    base = AutoModelForCausalLM.from_config(config, **{"dtype": "float32", "scan_layers": True, "seed": 0,
                                                       **model_options})
    lora = jaxpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return config, base, jaxpeft.get_peft_model(base, lora)


def pieces(args, layers: int, **model_options) -> dict[str, tuple]:
    """Each row's ``(jitted function, arguments)`` on a model of ``layers`` layers (``model_options`` to
    ``from_config``); the training step's arguments are ``(state, batch)``."""
    config, base, model = llama_lora(layers, args.shape, **model_options)
    ids = jax.random.randint(jax.random.key(0), (args.batch_size, args.seq), 0, config.vocab_size, jnp.int32)
    batch = {"input_ids": ids}
    base_apply, adapted_apply = base.module.apply, model.apply_fn
    trainable, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    loss_fn = training.peft_loss_fn(model, lm_loss_chunk_size=losses.DEFAULT_CHUNK_SIZE
                                    if args.loss == "chunked" else None)
    projection = jax.random.normal(jax.random.key(1), (args.batch_size, args.seq, config.hidden_size))

    def loss(trainable):
        return loss_fn(jaxpeft.combine(trainable, frozen), batch, None)

    def layers_loss(trainable):
        hidden = adapted_apply(jaxpeft.combine(trainable, frozen), ids, method="hidden_states")
        return jnp.sum(hidden * projection)

    optimizer = optax.adamw(1e-4)
    state = training.init_train_state(model.params, model.trainable_mask, optimizer)
    return {
        "base forward": (jax.jit(lambda p: base_apply(p, ids).logits), (base.params,)),
        "adapted forward": (jax.jit(lambda p: adapted_apply(p, ids).logits), (model.params,)),
        "base layers": (jax.jit(lambda p: base_apply(p, ids, method="hidden_states")), (base.params,)),
        "adapted layers": (jax.jit(lambda p: adapted_apply(p, ids, method="hidden_states")), (model.params,)),
        "adapted layers, gradient": (jax.jit(jax.grad(layers_loss)), (trainable,)),
        "loss": (jax.jit(loss), (trainable,)),
        "loss, gradient": (jax.jit(jax.grad(loss)), (trainable,)),
        "training step": (training.make_train_step(loss_fn, optimizer, frozen, compute_dtype="float32"),
                          (state, batch)),
    }


def runner(name: str, function, arguments):
    """A call of one row with no arguments that waits for its result; the training step's carries its state from
    call to call."""
    if name != "training step":
        return lambda: jax.block_until_ready(function(*arguments))
    state, batch = arguments

    def step():
        nonlocal state
        state, _ = function(state, batch)
        return jax.block_until_ready(state)

    return step


def breakdown(args) -> dict[str, float]:
    """Each row's median seconds. A round runs each row twice and times the second call: the first pays for
    freeing what the previous row left (7% of a forward on a CPU)."""
    runs = {name: runner(name, *row) for name, row in pieces(args, args.layers).items()}
    seconds = cpu_targets.interleaved_seconds(runs, repeats=1, rounds=args.rounds, warmup=2, settle=1)
    return {name: median for name, (median, _) in seconds.items()}


def xla_flops(args) -> dict[str, float]:
    """Each row's FLOPs by XLA's cost analysis at ``args.layers`` layers. The analysis counts a scanned layer once,
    so it runs on unrolled stacks of 1 and 2 layers, and the layers' share is scaled to ``args.layers``; and on the
    full-logits loss, which does the chunked loss's work without its loop over chunks."""
    counts = []
    for layers in (1, 2):
        counts.append({})
        unrolled = pieces(argparse.Namespace(**{**vars(args), "loss": "full"}), layers, scan_layers=False)
        for name, (function, arguments) in unrolled.items():
            analysis = function.lower(*arguments).compile().cost_analysis()
            counts[-1][name] = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    return {name: one + (args.layers - 1) * (counts[1][name] - one) for name, one in counts[0].items()}


def matmul_rate(tokens: int, config: transformers.LlamaConfig, calls: int = 20, rounds: int = 5) -> float:
    """FLOP/s of one plain float32 ``jnp.dot`` at the MLP's shape (tokens x hidden x intermediate), best of ``rounds``
    rounds of ``calls``, in a process that has run nothing else yet: the device's matmul speed."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    x = jax.random.normal(jax.random.key(2), (tokens, hidden))
    w = jax.random.normal(jax.random.key(3), (hidden, intermediate))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(x, w))
    fastest = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(dot(x, w))
        fastest = min(fastest, (time.perf_counter() - start) / calls)
    return 2 * tokens * hidden * intermediate / fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--loss", choices=("chunked", "full"), default="chunked")
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_shape_arguments(parser)
    rate = matmul_rate(args.batch_size * args.seq, llama_config(1, args.shape))
    seconds = breakdown(args)
    flops = xla_flops(args)
    base, base_flops = seconds["base forward"], flops["base forward"]
    print(f"{args.shape} shape, {args.layers} layers, {args.batch_size} x {args.seq} tokens, {args.loss} loss, "
          f"{jax.devices()[0].device_kind} (jax {jax.__version__}); one jnp.dot at the MLP's shape, run first: "
          f"{rate / 1e9:.0f} GFLOP/s")
    print("| what | ms | x base forward | GFLOP | x base forward's FLOPs | GFLOP/s | ms at the jnp.dot's rate |\n"
          "|---|---|---|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value * 1e3:.0f} | {value / base:.2f} | {flops[name] / 1e9:.1f} | "
              f"{flops[name] / base_flops:.2f} | {flops[name] / value / 1e9:.0f} | {flops[name] / rate * 1e3:.0f} |")
    layers = seconds["adapted layers"]
    print(f"adapted layers / base layers: {layers / seconds['base layers']:.2f}; "
          f"their gradient / adapted layers: {seconds['adapted layers, gradient'] / layers:.2f}")


if __name__ == "__main__":
    main()
