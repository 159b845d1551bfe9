"""Small linen models for the core tests: an MLP, and a transformer with scanned, rematerialised layers whose
attention uses DenseGeneral (and the same transformer unscanned, with Hugging Face style layer names)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VOCAB, HIDDEN, HEADS, LAYERS, CLASSES = 50, 16, 2, 3, 3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12, name="fc1")(x))
        x = nn.relu(nn.Dense(12, name="fc2")(x))
        return nn.Dense(3, name="out")(x)


class SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        head_dim = HIDDEN // HEADS
        q = nn.DenseGeneral((HEADS, head_dim), name="query")(x)
        k = nn.DenseGeneral((HEADS, head_dim), name="key")(x)
        v = nn.DenseGeneral((HEADS, head_dim), name="value")(x)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(HIDDEN, axis=(-2, -1), name="output")(context)


class Block(nn.Module):
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.LayerNorm(name="ln1")(x + SelfAttention(name="attention")(x))
        h = nn.gelu(nn.Dense(2 * HIDDEN, name="intermediate")(x))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.LayerNorm(name="ln2")(x + nn.Dense(HIDDEN, name="mlp_out")(h))


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block(name="block")(x), None


class Transformer(nn.Module):
    """Embedding, LAYERS blocks, mean pooling, a classifier. ``scan=True`` stacks the blocks with nn.scan+nn.remat."""

    scan: bool = True

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        x = nn.Embed(VOCAB, HIDDEN, name="embed")(ids)
        if self.scan:
            stack = nn.scan(nn.remat(ScannedBlock), variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True}, length=LAYERS)
            x, _ = stack(name="layer")(x, None)
        else:
            x = LayerList(name="layer")(x)
        return nn.Dense(CLASSES, name="classifier")(x.mean(axis=1))


class LayerList(nn.Module):
    """Unscanned blocks named "0", "1", ... so paths read ``layer.0.block.attention.query`` as in HF."""

    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x, _ = ScannedBlock(name=str(i))(x, None)
        return x


def unscanned_params(scanned: dict) -> dict:
    """The scanned transformer's parameters laid out for ``Transformer(scan=False)``."""
    params = {k: v for k, v in scanned["params"].items() if k != "layer"}
    params["layer"] = {str(i): jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], scanned["params"]["layer"])
                       for i in range(LAYERS)}
    return {"params": params}


def sample_ids(batch: int = 2, length: int = 5, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)
