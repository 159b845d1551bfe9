"""The task heads shared by the families: a decoder classifier pools the last token that the attention mask keeps,
whatever id pads the sequence."""

import chex
import jax.numpy as jnp
import pytest
import transformers

from jaxpeft.models import AutoModelForSequenceClassification

DECODER = dict(vocab_size=50, num_labels=3, pad_token_id=0, initializer_range=0.5)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, **DECODER),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        **DECODER,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, query_pre_attn_scalar=16, sliding_window=4, **DECODER,
    ),
}  # fmt: skip
TOKENS = [5, 6, 7, 8, 9]
OTHER_PAD = 11  # pads the batch; a real token id, not the config's pad_token_id (0)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def classifier(request):
    return AutoModelForSequenceClassification.from_config(CONFIGS[request.param](), seed=0)


def padded(side: str, pad: int = 3):
    """``TOKENS`` padded with ``OTHER_PAD`` on ``side``: ``(input_ids, attention_mask, position_ids)``."""
    fill = [OTHER_PAD] * pad
    ids = TOKENS + fill if side == "right" else fill + TOKENS
    mask = [int(token_id != OTHER_PAD) for token_id in ids]
    positions = list(range(len(ids))) if side == "right" else [0] * pad + list(range(len(TOKENS)))
    return jnp.array([ids]), jnp.array([mask]), jnp.array([positions])


@pytest.mark.parametrize("side", ["right", "left"])
def test_other_pad_id_is_not_pooled(classifier, side):
    alone = classifier(input_ids=[TOKENS]).logits
    ids, mask, positions = padded(side)
    logits = classifier(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    chex.assert_shape(logits, (1, 3))
    chex.assert_trees_all_close(logits, alone, atol=1e-5)


def test_without_a_mask_the_config_pad_token_rule_holds(classifier):
    alone = classifier(input_ids=[TOKENS]).logits
    config_padded = classifier(input_ids=[TOKENS + [0, 0]]).logits  # transformers' rule: last non-pad token
    chex.assert_trees_all_close(config_padded, alone, atol=1e-5)
    other_padded = classifier(input_ids=[TOKENS + [OTHER_PAD]]).logits  # no mask: the other pad id is a token
    assert not jnp.allclose(other_padded, alone, atol=1e-3)
