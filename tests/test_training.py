"""The functional training step: optimizer, schedules, accumulation, seeds, precision, donation, losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft import training
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification


def gpt2_config(dropout: float = 0.1):
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                                   eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                   initializer_range=0.2)  # larger than GPT-2's 0.02, so LoRA can move the logits


@pytest.fixture(scope="module")
def gpt2_lora():
    base = AutoModelForCausalLM.from_config(gpt2_config(), seed=0)
    return jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False))


@pytest.fixture(scope="module")
def gpt2_lora_no_dropout():
    base = AutoModelForCausalLM.from_config(gpt2_config(dropout=0.0), seed=0)
    return jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, init_lora_weights=False))


@pytest.fixture(scope="module")
def bert_lora():
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     vocab_size=64, num_labels=3, max_position_embeddings=32)
    base = AutoModelForSequenceClassification.from_config(config, seed=0)
    return jaxpeft.get_peft_model(base, jaxpeft.LoraConfig(r=4, bias="lora_only"))


def token_batch(size=8, length=12, seed=0):
    ids = np.random.default_rng(seed).integers(1, 64, (size, length))
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((size, length), jnp.int32)}


def setup(model, optimizer, seed=0):
    _, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    return training.init_train_state(model.params, model.trainable_mask, optimizer, seed=seed), frozen


def run(model, optimizer, schedule=None, steps=5, seed=0, batch=None, **step_options):
    state, frozen = setup(model, optimizer, seed)
    step = training.make_train_step(training.peft_loss_fn(model), optimizer, frozen, schedule=schedule,
                                    **step_options)
    history = []
    for _ in range(steps):
        state, metrics = step(state, token_batch() if batch is None else batch)
        history.append(jax.device_get(metrics))
    return state, frozen, history


# ----- training runs -----

TOTAL_STEPS, WARMUP_STEPS, PEAK_LR = 20, 2, 3e-2


@pytest.fixture(scope="module")
def gpt2_step(gpt2_lora):
    """One compiled step shared by the tests below: AdamW, warmup + linear decay, weight decay, clipping."""
    optimizer, schedule = training.make_optimizer(PEAK_LR, total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS,
                                                  weight_decay=0.01, max_grad_norm=1.0)
    _, frozen = jaxpeft.partition(gpt2_lora.params, gpt2_lora.trainable_mask)
    step = training.make_train_step(training.peft_loss_fn(gpt2_lora), optimizer, frozen, schedule=schedule)
    return step, optimizer, frozen


def run_losses(step, state, steps):
    losses = []
    for _ in range(steps):
        state, metrics = step(state, token_batch())
        losses.append(float(metrics["loss"]))
    return losses


def test_loss_decreases_and_only_trainable_leaves_change(gpt2_lora, gpt2_step):
    step, optimizer, frozen = gpt2_step
    before = jax.tree_util.tree_map(np.array, gpt2_lora.params)
    state = training.init_train_state(gpt2_lora.params, gpt2_lora.trainable_mask, optimizer, seed=0)
    first_leaf = jax.tree_util.tree_leaves(state.trainable)[0]
    history = []
    for _ in range(TOTAL_STEPS):
        state, metrics = step(state, token_batch())
        history.append(jax.device_get(metrics))
    assert first_leaf.is_deleted()  # the state was donated ...
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(gpt2_lora.params))  # ... not the model
    assert gpt2_lora(input_ids=[[1, 2, 3]]).logits.shape == (1, 3, 64)
    losses = [float(m["loss"]) for m in history]
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    assert all(m["is_finite"] for m in history) and [int(m["step"]) for m in history] == list(range(TOTAL_STEPS))
    assert int(state.step) == TOTAL_STEPS
    # the learning rate logged at each step: linear warmup over 2 steps, then linear decay to 0 at step 20
    want = [PEAK_LR * s / WARMUP_STEPS if s < WARMUP_STEPS else PEAK_LR * (TOTAL_STEPS - s) / (TOTAL_STEPS - 2)
            for s in range(TOTAL_STEPS)]
    np.testing.assert_allclose([float(m["learning_rate"]) for m in history], want, rtol=1e-5, atol=1e-9)
    after = jax.tree_util.tree_map(np.asarray, training.full_params(state, frozen))
    flat_before, flat_after = jaxpeft.tree.flatten(before), jaxpeft.tree.flatten(after)
    flat_mask = jaxpeft.tree.flatten(gpt2_lora.trainable_mask)
    assert flat_before.keys() == flat_after.keys()
    changed = {path for path in flat_before if not np.array_equal(flat_before[path], flat_after[path])}
    trainable = {path for path, trains in flat_mask.items() if trains}
    assert changed == trainable and any("lora_A" in path for path in changed)
    for path, leaf in jaxpeft.tree.flatten(gpt2_lora.params).items():  # the model's own tree is untouched
        np.testing.assert_array_equal(np.asarray(leaf), flat_before[path])


def test_same_seed_same_run_bit_for_bit(gpt2_lora, gpt2_step):
    step, optimizer, _ = gpt2_step
    runs = [run_losses(step, training.init_train_state(gpt2_lora.params, gpt2_lora.trainable_mask, optimizer,
                                                        seed=seed), 3) for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # dropout is on: another seed draws other masks


def test_resumed_state_continues_the_same_run(gpt2_lora, gpt2_step):
    step, optimizer, _ = gpt2_step
    state = training.init_train_state(gpt2_lora.params, gpt2_lora.trainable_mask, optimizer, seed=1)
    state, _ = step(state, token_batch())
    restored = jax.tree_util.tree_map(lambda x: jnp.array(np.asarray(x)), state)  # as if read back from disk
    _, first = step(state, token_batch())
    _, second = step(restored, token_batch())
    assert float(first["loss"]) == float(second["loss"]) and int(first["step"]) == 1


def test_gradient_accumulation_equals_one_big_batch(gpt2_lora_no_dropout):
    with jax.default_matmul_precision("highest"):  # on GPUs float32 matmuls may otherwise round like TF32
        check_accumulation(gpt2_lora_no_dropout)


def check_accumulation(model):
    batch = token_batch(size=8)
    trainable, frozen = jaxpeft.partition(model.params, model.trainable_mask)
    apply_fn = model.apply_fn

    def reference_loss(trainable):  # the whole batch at once, written out here
        logits = apply_fn(jaxpeft.combine(trainable, frozen), **batch, deterministic=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:]).mean()

    loss, grads = jax.jit(jax.value_and_grad(reference_loss))(trainable)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, trainable, grads)
    state = training.init_train_state(model.params, model.trainable_mask, optax.sgd(0.5))
    step = training.make_train_step(training.peft_loss_fn(model), optax.sgd(0.5), frozen, grad_accum_steps=4)
    state, metrics = step(state, batch)
    got = jax.tree_util.tree_leaves(state.trainable)
    for want_leaf, got_leaf in zip(jax.tree_util.tree_leaves(expected), got, strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


# ----- optimizer -----


def test_schedule_values_match_the_formulas():
    lr, warmup, total = 1e-3, 4, 20
    for name, after in {
        "linear": lambda s: lr * (total - s) / (total - warmup),
        "cosine": lambda s: lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
        "constant": lambda s: lr,
    }.items():
        schedule = training.make_schedule(lr, total_steps=total, warmup_steps=warmup, schedule=name)
        for s in (0, 1, 3, 4, 7, 12, 19, 20):
            want = lr * s / warmup if s < warmup else after(s)
            assert math.isclose(float(schedule(s)), want, rel_tol=1e-5, abs_tol=1e-9), (name, s)
    no_warmup = training.make_schedule(lr, total_steps=total, schedule="cosine")
    assert math.isclose(float(no_warmup(0)), lr, rel_tol=1e-6)


def test_decay_rule_names():
    no_decay = [("params", "bert", "embeddings", "LayerNorm", "scale"),
                ("params", "bert", "embeddings", "LayerNorm", "bias"),
                ("params", "h", "0", "ln_1", "scale"),
                ("params", "model", "layers", "0", "input_layernorm", "scale"),
                ("params", "model", "norm", "scale"),
                ("params", "classifier", "modules_to_save", "default", "bias"),
                ("params", "h", "0", "attn", "c_attn", "bias"),
                ("params", "h", "0", "attn", "c_attn", "bitfit_bias", "default"),
                ("params", "h", "0", "mlp", "adapter_up_bias", "default")]
    decay = [("params", "h", "0", "attn", "c_attn", "lora_A", "default"),
             ("params", "h", "0", "attn", "c_attn", "lora_B", "normal"),
             ("params", "classifier", "modules_to_save", "normal", "kernel"),
             ("params", "h", "0", "attn", "c_attn", "ia3_l", "default"),
             ("params", "wte", "embedding"),
             ("params", "prompt_embeddings", "default")]
    assert [training.decays(p) for p in no_decay] == [False] * len(no_decay)
    assert [training.decays(p) for p in decay] == [True] * len(decay)


def test_weight_decay_skips_biases_and_norms(bert_lora):
    """With a zero gradient AdamW's update is exactly ``-lr * weight_decay * param`` where decay applies."""
    optimizer, _ = training.make_optimizer(0.1, total_steps=10, schedule="constant", weight_decay=0.5)
    state, frozen = setup(bert_lora, optimizer)
    step = training.make_train_step(lambda params, batch, rng: 0.0 * batch.sum(), optimizer, frozen)
    old = jax.tree_util.tree_map(np.array, state.trainable)
    state, _ = step(state, jnp.ones(2))
    flat_old, flat_new = jaxpeft.tree.flatten(old), jaxpeft.tree.flatten(state.trainable)
    names = {path[-1] if "modules_to_save" in path else path[-2] for path, v in flat_old.items() if v is not None}
    assert {"bias", "kernel", "lora_A", "lora_B"} <= names  # bias="lora_only" trains the adapted layers' biases
    for path, value in flat_old.items():
        if value is None:
            continue
        if path[-1] == "bias" or path[-2] == "bias":
            np.testing.assert_array_equal(flat_new[path], value, err_msg=str(path))
        else:
            np.testing.assert_allclose(flat_new[path], value * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=str(path))


def test_gradient_clipping_bounds_what_the_optimizer_sees(gpt2_lora_no_dropout):
    model = gpt2_lora_no_dropout
    optimizer, _ = training.make_optimizer(1e-3, total_steps=10, max_grad_norm=1e-3)
    state, frozen = setup(model, optimizer)
    loss_fn = training.peft_loss_fn(model)
    big_loss = lambda params, batch, rng: 1e3 * loss_fn(params, batch, rng)  # noqa: E731
    step = training.make_train_step(big_loss, optimizer, frozen)
    state, metrics = step(state, token_batch())
    assert float(metrics["grad_norm"]) > 1.0  # reported before clipping
    first_moment = state.opt_state[1][0].mu  # AdamW's mu after one step: (1 - b1) * clipped gradient
    np.testing.assert_allclose(optax.tree.norm(first_moment), 0.1 * 1e-3, rtol=1e-4)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="schedule="):
        training.make_optimizer(1e-3, total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        training.make_optimizer(1e-3, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="max_grad_norm"):
        training.make_optimizer(1e-3, total_steps=10, max_grad_norm=0.0)


# ----- the step's guards: non-finite losses, precision, donation -----


def quadratic_setup(donate=True):
    params = {"w": jnp.ones(3), "lora": jnp.full(3, 0.5)}
    mask = {"w": False, "lora": True}
    state = training.init_train_state(params, mask, optax.sgd(0.1))
    loss_fn = lambda p, batch, rng: jnp.sum((p["w"] * p["lora"] - batch) ** 2)  # noqa: E731
    step = training.make_train_step(loss_fn, optax.sgd(0.1), jaxpeft.partition(params, mask)[1], donate=donate)
    return state, step


def test_non_finite_loss_is_flagged_and_changes_nothing():
    state, step = quadratic_setup()
    state, good = step(state, jnp.zeros(3))
    kept = np.array(state.trainable["lora"])
    state, bad = step(state, jnp.array([0.0, jnp.nan, 0.0]))
    assert bool(good["is_finite"]) and not bool(bad["is_finite"]) and int(bad["step"]) == 1
    assert int(state.step) == 1
    np.testing.assert_array_equal(state.trainable["lora"], kept)


def test_a_step_told_not_to_proceed_changes_nothing_so_the_flag_can_be_read_later():
    state, step = quadratic_setup()
    state, bad = step(state, jnp.array([0.0, jnp.nan, 0.0]))
    kept = np.array(state.trainable["lora"])
    state, after = step(state, jnp.zeros(3), bad["is_finite"])  # dispatched before anyone read bad's flag
    assert not bool(bad["is_finite"]) and not bool(after["is_finite"]) and bool(jnp.isfinite(after["loss"]))
    assert int(state.step) == 0
    np.testing.assert_array_equal(state.trainable["lora"], kept)
    state, good = step(state, jnp.zeros(3), True)
    assert bool(good["is_finite"]) and int(state.step) == 1


def test_donation_deletes_the_old_state_only_when_asked():
    for donate in (True, False):
        state, step = quadratic_setup(donate)
        old_leaf = state.trainable["lora"]
        new_state, _ = step(state, jnp.zeros(3))
        assert old_leaf.is_deleted() is donate
        assert not new_state.trainable["lora"].is_deleted()


def test_lowered_step_takes_the_frozen_weights_as_arguments_and_runs_as_the_step():
    state, step = quadratic_setup(donate=False)
    compiled = step.lower(state, jnp.zeros(3)).compile()
    # The frozen "w" (3 floats) is an argument of the compiled step, not a constant baked into it.
    frozen_bytes, state_bytes = 3 * 4, sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
    assert compiled.memory_analysis().argument_size_in_bytes >= frozen_bytes + state_bytes
    assert "3xf32" in step.lower(state, jnp.zeros(3)).as_text()
    frozen = jaxpeft.partition({"w": jnp.ones(3), "lora": jnp.full(3, 0.5)}, {"w": False, "lora": True})[1]
    lowered_state, _ = compiled(state, frozen, jnp.full(3, 2.0), jnp.asarray(True))
    np.testing.assert_allclose(lowered_state.trainable["lora"], 0.5 - 0.1 * 2 * (0.5 - 2.0))  # w = 1: d(l - 2)^2
    np.testing.assert_allclose(step(state, jnp.full(3, 2.0))[0].trainable["lora"], lowered_state.trainable["lora"])


def test_bf16_compute_keeps_float32_adapters(gpt2_lora_no_dropout):
    model = gpt2_lora_no_dropout
    optimizer, _ = training.make_optimizer(1e-3, total_steps=10)
    state32, _, history32 = run(model, optimizer, steps=1)
    state16, _, history16 = run(model, optimizer, steps=1, compute_dtype="bfloat16")
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves((state16.trainable, state16.opt_state))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype("float32")}
    np.testing.assert_allclose(history16[0]["loss"], history32[0]["loss"], rtol=2e-2)
    assert float(history16[0]["loss"]) != float(history32[0]["loss"])  # the base really ran in bfloat16
    np.testing.assert_allclose(history16[0]["grad_norm"], history32[0]["grad_norm"], rtol=0.1)


def test_batch_not_divisible_by_accumulation_steps():
    state, _ = quadratic_setup()
    params = {"w": jnp.ones(3), "lora": jnp.ones(3)}
    frozen = jaxpeft.partition(params, {"w": False, "lora": True})[1]
    step = training.make_train_step(lambda p, b, rng: jnp.sum(p["lora"]) * b.mean(), optax.sgd(0.1), frozen,
                                    grad_accum_steps=4)
    with pytest.raises(ValueError, match="grad_accum_steps=4 must divide"):
        step(state, jnp.ones((6, 3)))


# ----- losses -----


def test_causal_lm_loss_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 3:] = -100
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 7),
                                             torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    np.testing.assert_allclose(training.causal_lm_loss(jnp.asarray(logits), labels), want.item(), rtol=1e-6)


def test_classification_loss_matches_torch():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(4, 3)).astype(np.float32), rng.integers(0, 3, 4)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(training.classification_loss(jnp.asarray(logits), labels), want.item(), rtol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        training.classification_loss(jnp.zeros((4, 3)), np.zeros(3, int))


def test_eval_step_for_a_classifier(bert_lora):
    optimizer, _ = training.make_optimizer(1e-3, total_steps=10)
    state, frozen = setup(bert_lora, optimizer)
    batch = {**token_batch(size=4, length=6), "labels": jnp.array([0, 1, 2, 1])}
    metrics = training.make_eval_step(training.peft_loss_fn(bert_lora), frozen)(state, batch)
    logits = bert_lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)), torch.tensor([0, 1, 2, 1]))
    np.testing.assert_allclose(metrics["loss"], want.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == np.array([0, 1, 2, 1])))


def test_prompt_tuning_loss_extends_the_labels():
    base = AutoModelForCausalLM.from_config(gpt2_config(dropout=0.0), seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    batch = token_batch(size=2, length=5)
    loss = jax.jit(training.peft_loss_fn(model))(model.params, batch, None)
    logits = np.asarray(model(**batch).logits)
    assert logits.shape[1] == 8
    labels = np.asarray(jaxpeft.extend_labels(batch["input_ids"], 3)).astype(np.int64)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 64),
                                             torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)


def test_loss_sums_weigh_out_filler_rows_as_torch_sums():
    rng = np.random.default_rng(2)
    weights = np.array([1.0, 1.0, 0.0])  # the third row is a filler copy
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (3, 5))
    labels[1, :2] = -100
    for task, kept_logits, kept_labels in (("causal_lm", logits[:2, :-1], labels[:2, 1:]),
                                           ("token_cls", logits[:2], labels[:2])):
        sums = training.loss_sums(jnp.asarray(logits), labels, task, weights=weights)
        kept_labels = torch.tensor(kept_labels).reshape(-1)
        want = torch.nn.functional.cross_entropy(torch.tensor(kept_logits).reshape(-1, 7), kept_labels,
                                                 ignore_index=-100, reduction="sum")
        scored = kept_labels != -100
        right = (torch.tensor(kept_logits).reshape(-1, 7).argmax(-1) == kept_labels) & scored
        np.testing.assert_allclose(sums["loss_sum"], want.item(), rtol=1e-5)
        assert float(sums["count"]) == int(scored.sum()) and float(sums["correct"]) == int(right.sum())

    class_logits, classes = rng.normal(size=(3, 4)).astype(np.float32), np.array([0, 3, 1])
    class_logits[2] = np.nan  # a weight-0 row cannot spoil the sums
    sums = training.loss_sums(jnp.asarray(class_logits), classes, "seq_cls", weights=weights)
    want = torch.nn.functional.cross_entropy(torch.tensor(class_logits[:2]), torch.tensor(classes[:2]),
                                             reduction="sum")
    np.testing.assert_allclose(sums["loss_sum"], want.item(), rtol=1e-5)
    assert float(sums["count"]) == 2 and float(sums["correct"]) == np.sum(class_logits[:2].argmax(-1) == classes[:2])

    targets = np.array([0.5, -1.0, 3.0], np.float32)  # one output: regression, squared error
    sums = training.loss_sums(jnp.asarray(class_logits[:, :1]), targets, "seq_cls", weights=weights)
    want = torch.nn.functional.mse_loss(torch.tensor(class_logits[:2, 0]), torch.tensor(targets[:2]), reduction="sum")
    np.testing.assert_allclose(sums["loss_sum"], want.item(), rtol=1e-5)
    assert float(sums["correct"]) == 0

    with pytest.raises(ValueError, match="one value per example"):
        training.loss_sums(jnp.asarray(logits), labels, "token_cls", weights=np.ones(2))
    with pytest.raises(ValueError, match="no loss for task 'regression'"):
        training.loss_sums(jnp.asarray(logits), labels, "regression")


def test_peft_outputs_fn_scores_the_batch_as_the_loss_and_drops_virtual_positions():
    base = AutoModelForCausalLM.from_config(gpt2_config(dropout=0.0), seed=0)
    model = jaxpeft.get_peft_model(base, jaxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    batch = {**token_batch(size=3, length=5), "labels": token_batch(size=3, length=5, seed=1)["input_ids"]}
    sums, logits = training.peft_outputs_fn(model)(model.params, batch, None, weights=jnp.array([1.0, 1.0, 0.0]))
    full = np.asarray(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    np.testing.assert_allclose(logits, full[:, 3:], atol=1e-5)  # the batch's own positions
    labels = np.asarray(jaxpeft.extend_labels(batch["labels"], 3)).astype(np.int64)[:2]
    want = torch.nn.functional.cross_entropy(torch.tensor(full[:2, :-1]).reshape(-1, 64),
                                             torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100,
                                             reduction="sum")
    np.testing.assert_allclose(sums["loss_sum"], want.item(), rtol=1e-5)
    assert float(sums["count"]) == 2 * 5  # the last virtual position scores the first token, as HF PEFT
    with pytest.raises(ValueError, match="needs 'labels' for the seq_cls loss"):
        training.peft_outputs_fn(model, "seq_cls")(model.params, token_batch(size=1), None)
