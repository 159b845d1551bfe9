"""The GPU benchmark of the performance plan: LoRA training throughput of jaxpeft against torch PEFT, in one run.

For GPT-2 124M (16 x 1024 tokens) and a Llama-3.2-1B-shaped model (8 x 2048), random weights from config, bf16,
LoRA r=16, alpha=32, dropout 0 on every linear layer of the blocks, AdamW on the LoRA parameters, causal-LM loss
on random tokens, one row per engine:

- ``jaxpeft-lora``: ``training.make_train_step`` (jitted, state donated) on a ``get_peft_model`` model built with
  ``dtype`` and ``param_dtype`` bfloat16 and ``scan_layers=True``, ``compute_dtype="bfloat16"``; adapters, their
  gradients and AdamW state in float32.
- ``jaxpeft-full``: full fine-tuning of the same model: float32 weights and AdamW state, bf16 compute.
- ``torch-eager`` / ``torch-compile``: ``peft.get_peft_model`` on transformers' model in bf16 with SDPA attention,
  ``torch.optim.AdamW(fused=True)`` on the LoRA parameters; the second calls the model through ``torch.compile``.

Each engine runs in its own process (their memory peaks do not mix, and jax's allocator does not starve torch).
Timing: 3 warm-up steps, then the mean of ``--steps`` steps, synchronised once at the end (jax: ``block_until_ready``
on the last state; torch: ``torch.cuda.synchronize``). Peak memory: jax ``memory_stats()["peak_bytes_in_use"]``,
torch ``torch.cuda.max_memory_allocated()``. TFLOP/s by the convention of the plan: per token 4 x (non-embedding
parameters) + 8 x layers x seq x hidden (forward and activation gradients); the full fine-tuning row adds the
weight gradients (6 x instead of 4 x). Torch rows are skipped with a note when torch, peft or CUDA is missing.

    python benchmarks/gpu_lora.py [--models gpt2-124m,llama-1b] [--steps 20] [--remat-policy dots]
    python benchmarks/gpu_lora.py --tiny   # shrunken shapes, runs end to end on a CPU (torch rows too)
    python benchmarks/gpu_lora.py --cpu --models smollm2-135m --engines jaxpeft-lora,torch-eager,torch-compile

``--cpu`` measures on the CPU in float32 (the SmolLM2-135M shape, 4 x 256 tokens, is the CPU comparison of the
plan): every engine and torch run there, ``peak GiB`` is the process's peak resident memory (``ru_maxrss``),
and the jaxpeft step uses the Trainer's defaults (chunked loss, attention chosen by backend).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ENGINES = ("jaxpeft-lora", "jaxpeft-full", "torch-eager", "torch-compile")
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RANK, ALPHA, LEARNING_RATE = 16, 32, 1e-4
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (the H200 has the same)
RESULT_PREFIX = "RESULT "

# name: (family, shape keywords of the full model, its tiny stand-in, batch, seq, tiny batch, tiny seq)
MODELS = {
    "gpt2-124m": (
        "gpt2",
        dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
        dict(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=64),
        16, 1024, 2, 64,
    ),
    "llama-1b": (
        "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
             max_position_embeddings=131072, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
             max_position_embeddings=64),
        8, 2048, 2, 64,
    ),
    "smollm2-135m": (
        "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=100000.0),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=64),
        4, 256, 2, 64,
    ),
}  # fmt: skip


def model_setup(name: str, tiny: bool):
    """``(family, transformers config, batch, seq)`` of a benchmark model."""
    import transformers

    family, full, small, batch, seq, tiny_batch, tiny_seq = MODELS[name]
    if family == "gpt2":
        config = transformers.GPT2Config(**(small if tiny else full), resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.LlamaConfig(**(small if tiny else full), bos_token_id=0, eos_token_id=0)
    return family, config, (tiny_batch if tiny else batch), (tiny_seq if tiny else seq)


def shape_of(family: str, config) -> tuple[int, int, int]:
    """``(non-embedding parameters, layers, hidden)`` of a config."""
    if family == "gpt2":
        hidden, layers = config.n_embd, config.n_layer
        # c_attn 3h^2+3h, attn c_proj h^2+h, c_fc 4h^2+4h, mlp c_proj 4h^2+h, two layer norms 4h; then ln_f.
        return layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden, layers, hidden
    hidden, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = 2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * inner + 2 * hidden
    return layers * per_layer + hidden, layers, hidden


def flops_per_token(family: str, config, seq: int, full_fine_tuning: bool) -> float:
    """The plan's convention: 4 x non-embedding parameters + 8 x layers x seq x hidden (6 x for full fine-tuning,
    whose weight gradients are work too)."""
    params, layers, hidden = shape_of(family, config)
    return (6 if full_fine_tuning else 4) * params + 8 * layers * seq * hidden


# ----- workers (each in its own process) -----


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jaxpeft(name: str, full_fine_tuning: bool, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxpeft
    from jaxpeft import training
    from jaxpeft.models import AutoModelForCausalLM

    if jax.default_backend() == "cpu" and not (args.tiny or args.cpu):
        return {"skipped": "jax sees no accelerator (the full shapes are for a GPU; --tiny checks the script on a CPU)"}
    family, config, batch_size, seq = model_setup(name, args.tiny)
    remat = None if args.remat_policy == "none" else args.remat_policy
    dtype = "float32" if args.cpu else "bfloat16"
    base = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                            param_dtype="float32" if full_fine_tuning else dtype,
                                            scan_layers=True, remat_policy=remat, seed=0)
    optimizer = optax.adamw(LEARNING_RATE)
    if full_fine_tuning:
        module = base.module
        params, mask = base.params, jax.tree_util.tree_map(lambda _: True, base.params)

        def loss_fn(params, batch, rng):
            return training.causal_lm_loss(module.apply(params, batch["input_ids"]).logits, batch["input_ids"])
    else:
        lora = jaxpeft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[family],
                                  task_type="CAUSAL_LM")
        model = jaxpeft.get_peft_model(base, lora)
        params, mask = model.params, model.trainable_mask
        loss_fn = training.peft_loss_fn(model)
    state = training.init_train_state(params, mask, optimizer)
    trainable_count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.trainable))
    _, frozen = jaxpeft.partition(params, mask)
    del params, mask, base  # full fine-tuning: the state holds the only copy of the weights
    if not full_fine_tuning:
        del model
    step = training.make_train_step(loss_fn, optimizer, frozen, compute_dtype=dtype)
    batch = {"input_ids": jax.random.randint(jax.random.key(0), (batch_size, seq), 0, config.vocab_size, jnp.int32)}

    start = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    peak = peak_rss_bytes() if args.cpu else stats.get("peak_bytes_in_use")
    return {"step_s": step_s, "warmup_s": warmup_s, "peak_bytes": peak,
            "loss": float(metrics["loss"]), "trainable": int(trainable_count),
            "device": f"{jax.devices()[0].device_kind} (jax {jax.__version__})"}


def run_torch(name: str, compiled: bool, args) -> dict:
    try:
        import peft
        import torch
        import transformers
    except ImportError as error:
        return {"skipped": f"{error.name} is not installed"}
    if not torch.cuda.is_available() and not (args.tiny or args.cpu):
        return {"skipped": "CUDA is not available to torch"}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    family, config, batch_size, seq = model_setup(name, args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if args.cpu else torch.bfloat16, attn_implementation="sdpa"
        )
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[family],
                           fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, config.vocab_size, (batch_size, seq), device=device)

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else (peak_rss_bytes() if args.cpu else None)
    kind = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    return {"step_s": step_s, "warmup_s": warmup_s, "peak_bytes": peak, "loss": loss.item(),
            "trainable": sum(p.numel() for p in trainable),
            "device": f"{kind} (torch {torch.__version__}, peft {peft.__version__})"}


def worker(engine: str, name: str, args) -> None:
    if engine.startswith("jaxpeft"):
        result = run_jaxpeft(name, engine == "jaxpeft-full", args)
    else:
        result = run_torch(name, engine == "torch-compile", args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----- the table -----


def run_engine(engine: str, name: str, args) -> dict:
    """Runs one engine on one model in a fresh process; its result, or ``{"failed": reason}``."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--models", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--remat-policy", args.remat_policy]
    command += ["--tiny"] if args.tiny else []
    command += ["--cpu"] if args.cpu else []
    env = dict(os.environ)
    if engine.startswith("torch") and (args.tiny or args.cpu):
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # the torch rows run on the CPU like jax's
    if args.tiny or args.cpu:
        env.setdefault("JAX_PLATFORMS", "cpu")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within {args.timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"failed": f"exit {done.returncode}: {lines[-1][:200] if lines else 'no output'}"}


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--remat-policy", default="none",
                        help="jaxpeft rows: rematerialise each layer (none, dots, full, ...; see jaxpeft.models)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="the device's bf16 peak")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per engine and model")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a check of the script on any machine")
    parser.add_argument("--cpu", action="store_true",
                        help="measure on the CPU in float32 (peak GiB: resident memory), e.g. --models smollm2-135m")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names, engines = args.models.split(","), args.engines.split(",")
    for value, known, what in ((names, MODELS, "--models"), (engines, ENGINES, "--engines")):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"{what} has unknown {unknown}; choose from {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        worker(args.worker, names[0], args)
        return

    print(f"LoRA r={RANK}, alpha={ALPHA}, dropout 0 on every linear layer of the blocks; AdamW; "
          f"{'float32 on the CPU' if args.cpu else 'bf16'}; "
          f"{args.warmup} warm-up steps, mean of {args.steps}; jaxpeft remat_policy={args.remat_policy}"
          + ("; TINY shapes (a check of the script, not a measurement)" if args.tiny else ""))
    print("\n| model | engine | batch x seq | trained params | tokens/s | step ms | peak GiB | TFLOP/s | % of peak "
          "| vs torch.compile | first steps s | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes, devices, results = [], set(), {}
    for name in names:
        family, config, batch_size, seq = model_setup(name, args.tiny)
        tokens = batch_size * seq
        for engine in engines:
            results[name, engine] = run_engine(engine, name, args)
        compiled = results.get((name, "torch-compile"), {})
        for engine in engines:
            result = results[name, engine]
            if "skipped" in result or "failed" in result:
                notes.append(f"{name} {engine}: {result.get('skipped') or result.get('failed')}")
                print(f"| {name} | {engine} | {batch_size} x {seq} | - | - | - | - | - | - | - | - | - |")
                continue
            devices.add(result["device"])
            rate = tokens / result["step_s"]
            tflops = flops_per_token(family, config, seq, engine == "jaxpeft-full") * rate / 1e12
            versus = f"{compiled['step_s'] / result['step_s']:.2f}" if "step_s" in compiled else "-"
            print(f"| {name} | {engine} | {batch_size} x {seq} | {result['trainable']:,} | {rate:,.0f} | "
                  f"{1e3 * result['step_s']:.1f} | "
                  f"{gib(result['peak_bytes'])} | {tflops:.3g} | {100 * tflops / args.peak_tflops:.3g} | {versus} | "
                  f"{result['warmup_s']:.1f} | {result['loss']:.3f} |", flush=True)
    print()
    for device in sorted(devices):
        print(f"device: {device}")
    print("'vs torch.compile': tokens/s over those of torch PEFT + torch.compile on the same model; 'first steps s': "
          "the warm-up steps, compilation included; TFLOP/s of jaxpeft-full count its weight gradients too")
    for note in notes:
        print(f"note: {note}")
    print_targets(names, results, args)


def print_targets(names, results, args) -> None:
    """The plan's GPU targets, PASS/MISS, where both sides ran."""
    lines = []
    for name in names:
        ours, theirs = results.get((name, "jaxpeft-lora"), {}), results.get((name, "torch-compile"), {})
        if "step_s" in ours and "step_s" in theirs:
            speedup, target = theirs["step_s"] / ours["step_s"], 1.2 if args.cpu else 1.5
            lines.append(f"{name}: jaxpeft LoRA / torch.compile tokens/s = {speedup:.2f} (target >= {target}: "
                         f"{'PASS' if speedup >= target else 'MISS'})")
            if ours["peak_bytes"] is not None and theirs["peak_bytes"] is not None:
                ratio = ours["peak_bytes"] / theirs["peak_bytes"]
                lines.append(f"{name}: jaxpeft LoRA / torch.compile peak memory = {ratio:.2f} (target <= 1.0: "
                             f"{'PASS' if ratio <= 1.0 else 'MISS'})")
        if name == "llama-1b" and "step_s" in ours:
            family, config, batch_size, seq = model_setup(name, args.tiny)
            share = flops_per_token(family, config, seq, False) * batch_size * seq / ours["step_s"] / 1e12
            share /= args.peak_tflops
            lines.append(f"{name}: jaxpeft LoRA at {100 * share:.1f}% of peak (target >= 40%: "
                         f"{'PASS' if share >= 0.4 else 'MISS'})")
    if lines:
        print("\ntargets" + (" (tiny shapes: not meaningful)" if args.tiny else "") + ":")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    main()
