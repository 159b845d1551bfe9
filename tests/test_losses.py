"""The chunked causal-LM loss equals the loss of the full logits: values and gradients, on hand-made heads and on
jaxpeft's GPT-2 (tied head, adapted rows), Llama (LoRA on lm_head) and Gemma 2 (soft-capped logits), through
``peft_loss_fn`` and the Trainer."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jaxpeft
from jaxpeft import losses, training
from jaxpeft.losses import chunked_causal_lm_sums
from jaxpeft.models import AutoModelForCausalLM

IDS = jnp.array([[1, 5, 7, 8, 9, 10, 11, 3], [3, 4, 5, 6, 7, 1, 0, 0]])
MASK = jnp.array([[1] * 8, [1] * 6 + [0] * 2])


def test_docstring_example():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _plain(hidden, head, labels, weights=None):
    sums = training.loss_sums(hidden @ head, labels, "causal_lm", weights)
    return sums["loss_sum"] / sums["count"]


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_equals_the_full_logits_loss_and_its_gradients(chunk_size):
    hidden = jax.random.normal(jax.random.key(0), (3, 9, 6))
    head = jax.random.normal(jax.random.key(1), (6, 13))
    labels = jax.random.randint(jax.random.key(2), (3, 9), 0, 13).at[1, 4:].set(-100).at[2].set(-100)
    weights = jnp.array([1.0, 0.5, 1.0])

    def chunked(hidden, head):
        sums = chunked_causal_lm_sums(hidden, labels, lambda h: h @ head, chunk_size=chunk_size, weights=weights)
        return sums["loss_sum"] / sums["count"]

    np.testing.assert_allclose(chunked(hidden, head), _plain(hidden, head, labels, weights), rtol=1e-6)
    for ours, reference in zip(jax.grad(chunked, (0, 1))(hidden, head),
                               jax.grad(lambda h, w: _plain(h, w, labels, weights), (0, 1))(hidden, head), strict=True):
        np.testing.assert_allclose(ours, reference, atol=1e-6)
    full = training.loss_sums(hidden @ head, labels, "causal_lm", weights)
    sums = chunked_causal_lm_sums(hidden, labels, lambda h: h @ head, chunk_size=chunk_size, weights=weights)
    assert float(sums["count"]) == float(full["count"]) == 8 + 0.5 * 3  # 8 labels of row 0, 3 of row 1 at 0.5
    assert float(sums["correct"]) == float(full["correct"])


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The output shape of every ``dot_general`` in a jaxpr and the jaxprs inside it (a scan body counted once)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found += _dot_output_shapes(inner)
    return found


def test_each_chunk_runs_the_head_once_and_a_frozen_head_gets_no_gradient():
    hidden = jax.random.normal(jax.random.key(0), (3, 9, 6))
    head = jax.random.normal(jax.random.key(1), (6, 13))
    labels = jax.random.randint(jax.random.key(2), (3, 9), 0, 13)

    def loss(hidden, head):
        sums = chunked_causal_lm_sums(hidden, labels, lambda h: h @ head, chunk_size=6)  # 2 positions per chunk
        return sums["loss_sum"] / sums["count"]

    for argnums, head_gradients in (((0,), 0), ((0, 1), 1)):
        shapes = _dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums))(hidden, head).jaxpr)
        assert shapes.count((3, 2, 13)) == 1  # a chunk's logits: computed once, never recomputed
        assert shapes.count((3, 2, 6)) == 1  # their gradient carried back to the hidden states
        assert shapes.count((6, 13)) + shapes.count((13, 6)) == head_gradients  # the head's, only where trained
    np.testing.assert_allclose(jax.grad(loss, 1)(hidden, head), jax.grad(lambda w: _plain(hidden, w, labels))(head),
                               atol=1e-6)


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_causal_lm_sums(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), int), lambda h: h, chunk_size=0)
    with pytest.raises(ValueError, match=r"must match, got \(1, 4, 2\) and \(1, 5\)"):
        chunked_causal_lm_sums(jnp.zeros((1, 4, 2)), jnp.zeros((1, 5), int), lambda h: h)
    with pytest.raises(ValueError, match=r"weights as constants .* jax.lax.stop_gradient\(weights\)"):
        jax.grad(lambda w: chunked_causal_lm_sums(jnp.ones((1, 4, 2)), jnp.ones((1, 4), int), lambda h: h,
                                                  weights=w)["loss_sum"])(jnp.ones(1))


MODELS = {
    "gpt2-tied-rows": (transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                               bos_token_id=0, eos_token_id=0),
                       jaxpeft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False,
                                          trainable_token_indices=[1, 5, 7])),
    "llama-lora-head": (transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                                 tie_word_embeddings=False),
                        jaxpeft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)),
    "gemma2-softcap": (transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                 vocab_size=99, final_logit_softcapping=5.0),
                       jaxpeft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_loss_fn_in_chunks_equals_the_full_logits(name):
    config, lora = MODELS[name]
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_config(config, seed=0), lora)
    assert training.runs_head_apart(model)
    trainable, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    batch = {"input_ids": IDS, "attention_mask": MASK}

    def loss_and_grads(chunk_size):
        loss_fn = training.peft_loss_fn(model, lm_loss_chunk_size=chunk_size)
        return jax.jit(jax.value_and_grad(lambda t: loss_fn(jaxpeft.combine(t, frozen), batch, None)))(trainable)

    full_loss, full_grads = loss_and_grads(None)
    loss, grads = loss_and_grads(5)  # 2 positions of each row per chunk: 4 chunks, the last one filled up
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    flat = {path: grad for path, grad in jaxpeft.tree.flatten(grads).items() if grad is not None}
    full_flat = {path: grad for path, grad in jaxpeft.tree.flatten(full_grads).items() if grad is not None}
    assert flat.keys() == full_flat.keys() and len(flat) >= 4
    for path, grad in flat.items():
        np.testing.assert_allclose(grad, full_flat[path], atol=1e-5, err_msg=str(path))


def test_prompt_tuning_keeps_the_full_logits():
    config, _ = MODELS["llama-lora-head"]
    base = AutoModelForCausalLM.from_config(config, seed=0)
    assert training.runs_head_apart(base)
    model = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(num_virtual_tokens=3))
    assert not training.runs_head_apart(model)  # its positions are not the batch's: the plain loss runs
    loss = training.peft_loss_fn(model)(model.params, {"input_ids": IDS}, None)
    assert np.isfinite(float(loss))


def test_trainer_losses_and_eval_loss_equal_the_full_logits_run(tmp_path):
    config, lora = MODELS["llama-lora-head"]
    rows = [{"input_ids": np.asarray(row)[: int(mask.sum())].tolist()} for row, mask in zip(IDS, MASK, strict=True)]
    rows = rows * 4
    results = []
    for chunk_size in (0, 6):
        model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_config(config, seed=0), lora)
        args = jaxpeft.TrainingArguments(str(tmp_path / str(chunk_size)), max_steps=3, per_device_train_batch_size=2,
                                         learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                                         lm_loss_chunk_size=chunk_size)
        trainer = jaxpeft.Trainer(model, args, train_dataset=rows, eval_dataset=rows[:2], task="causal_lm")
        trainer.train()
        losses = [record["loss"] for record in trainer.log_history if "loss" in record]
        results.append((losses, trainer.evaluate()["eval_loss"]))
    (full_losses, full_eval), (losses, eval_loss) = results
    assert len(losses) == 3 and full_losses[0] != full_losses[-1]
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)
    np.testing.assert_allclose(eval_loss, full_eval, rtol=1e-5)
    with pytest.raises(ValueError, match="lm_loss_chunk_size must be >= 0"):
        jaxpeft.TrainingArguments(str(tmp_path), lm_loss_chunk_size=-1)


def _array_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The shapes of every value a jaxpr computes, in the jaxprs inside it too (map, checkpoint, scan bodies)."""
    found = set()
    for eqn in jaxpr.eqns:
        found.update(tuple(var.aval.shape) for var in eqn.outvars if hasattr(var.aval, "shape"))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found |= _array_shapes(inner)
    return found


def test_perplexity_runs_the_head_in_chunks_and_equals_the_full_logits_by_hand(monkeypatch):
    from jaxpeft import evaluation

    config, lora = MODELS["llama-lora-head"]
    model = jaxpeft.get_peft_model(AutoModelForCausalLM.from_config(config, seed=0), lora)
    shifted = np.asarray(model(IDS, MASK).logits, np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    scored = np.asarray(MASK)[:, 1:] == 1
    nll = -np.take_along_axis(log_probs[:, :-1], np.asarray(IDS)[:, 1:, None], -1)[..., 0][scored]
    monkeypatch.setattr(losses, "DEFAULT_CHUNK_SIZE", 4)  # 2 positions of each row per chunk
    value = evaluation.perplexity(model, [{"input_ids": IDS, "attention_mask": MASK}])
    np.testing.assert_allclose(value, np.exp(nll.mean()), rtol=1e-5)

    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": jnp.where(MASK == 1, IDS, -100)}
    jaxpr = jax.make_jaxpr(evaluation._causal_lm_sums_fn(model))(model.params, batch, None).jaxpr
    shapes = _array_shapes(jaxpr)
    vocab = config.vocab_size
    assert (2, 2, vocab) in shapes  # one chunk's logits
    assert not {shape for shape in shapes if len(shape) == 3 and shape[-1] == vocab and shape[1] > 2}
