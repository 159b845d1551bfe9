"""LoRA+: the update factors follow HF PEFT's parameter groups, and the Trainer's steps equal AdamW with B's learning
rate multiplied by the ratio (a hand-built reference with optax.multi_transform)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jaxpeft
from jaxpeft import optimizers
from jaxpeft.models import AutoModelForCausalLM

LLAMA = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                 tie_word_embeddings=False)
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def test_groups_match_hf_peft_parameter_groups():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    config = dict(r=2, target_modules=TARGETS, use_dora=False, bias="lora_only", modules_to_save=["lm_head"])
    reference = peft.get_peft_model(transformers.LlamaForCausalLM(LLAMA), peft.LoraConfig(**config))
    torch_optimizer = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0)
    torch_sizes = {}
    for group in torch_optimizer.param_groups:
        torch_sizes[group["lr"]] = torch_sizes.get(group["lr"], 0) + sum(p.numel() for p in group["params"])

    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_config(LLAMA), jaxpeft.LoraConfig(**config))
    trainable = jaxpeft.partition(model.params, model.trainable_mask)[0]
    factors = optimizers.loraplus_factors(trainable, 8.0, 1e-6 / 1e-3)
    jax_sizes = {}
    for leaf, factor in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(factors), strict=True):
        lr = round(1e-3 * float(factor), 12)
        jax_sizes[lr] = jax_sizes.get(lr, 0) + leaf.size
    assert {round(lr, 12): size for lr, size in torch_sizes.items() if size} == jax_sizes
    assert len(jax_sizes) == 3  # A, B (and the lora_only biases), the embedding's LoRA factors


def test_trainer_steps_equal_adamw_with_a_faster_b(tmp_path):
    base = AutoModelForCausalLM.from_config(LLAMA, seed=0)
    config = jaxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    data = [{"input_ids": [int(i) for i in np.random.default_rng(seed).integers(3, 64, 8)]} for seed in range(8)]
    model = jaxpeft.get_peft_model(base, config)
    start = jaxpeft.partition(model.params, model.trainable_mask)[0]
    args = jaxpeft.TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
                                     lr_scheduler_type="constant", max_grad_norm=0, save_strategy="no",
                                     disable_tqdm=True, loraplus_lr_ratio=4.0)
    jaxpeft.Trainer(model=model, args=args, train_dataset=data, task="causal_lm").train()
    trained = jaxpeft.partition(model.params, model.trainable_mask)[0]

    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "B" if "lora_B" in str(path) else "A", start)
    reference = optax.multi_transform({"A": optax.adamw(1e-2, weight_decay=0.0),
                                       "B": optax.adamw(4e-2, weight_decay=0.0)}, labels)
    loss_fn = jaxpeft.training.peft_loss_fn(model, "causal_lm")
    frozen = jaxpeft.partition(model.params, model.trainable_mask)[1]
    batch = jaxpeft.data.CausalLMCollator(pad_token_id=0)(data)
    params, state = start, reference.init(start)
    gradient = jax.jit(jax.grad(lambda p: loss_fn(jaxpeft.combine(p, frozen), batch, None)))  # one compile
    for _ in range(2):
        grads = gradient(params)
        updates, state = reference.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for got, want in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(trained),
                                                          jax.tree_util.tree_leaves(start), strict=True)]
    assert min(moved) > 0
