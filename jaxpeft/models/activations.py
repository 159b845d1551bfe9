"""The activation functions of transformers' ``ACT2FN``, by name, for every model family."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import Array


def _gelu_tanh(x):
    return nn.gelu(x, approximate=True)


def _gelu_erf(x):
    return nn.gelu(x, approximate=False)


def _quick_gelu(x):
    return x * nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "linear": lambda x: x,
}


def check_activation(option: str, name: str) -> None:
    """A one-line error for an activation name transformers has and jaxpeft does not."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{option} {name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")


def activation_function(name: str) -> Callable[[Array], Array]:
    """The JAX function of a transformers activation name (``config.hidden_act`` / ``config.activation``).

    Example:
        >>> import jax.numpy as jnp
        >>> float(activation_function("gelu_pytorch_tanh")(jnp.float32(1.0)))  # doctest: +ELLIPSIS
        0.841...
    """
    check_activation("activation", name)
    return ACTIVATIONS[name]
