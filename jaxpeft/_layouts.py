"""Tensor layouts between jaxpeft leaves and HF PEFT's torch tensors.

A layout is ``(torch shape, to_hf, from_hf)``: the torch tensor's shape and two numpy functions that turn one
layer's leaf (without stack axes) into the tensor and back. Methods name their tensors with these (the
``torch_tensors`` hook of ``jaxpeft.method.Method``); ``jaxpeft.hf_format`` applies them.
"""

from __future__ import annotations

import math

import numpy as np


def transpose_layout(jax_shape, perm):
    inverse = tuple(np.argsort(perm))
    return (tuple(jax_shape[p] for p in perm), lambda x: np.transpose(x, perm), lambda t: np.transpose(t, inverse))


def matrix_layout(jax_shape, rows: int, transpose: bool):
    """jax ``(*row axes, *col axes)`` -> torch ``[cols, rows]`` (transpose) or ``[rows, cols]``."""
    n_rows = math.prod(jax_shape[:rows])
    n_cols = math.prod(jax_shape[rows:])
    if transpose:
        return ((n_cols, n_rows), lambda x: x.reshape(n_rows, n_cols).T,
                lambda t: t.T.reshape(jax_shape))
    return (n_rows, n_cols), lambda x: x.reshape(n_rows, n_cols), lambda t: t.reshape(jax_shape)


def reshape_layout(jax_shape: tuple[int, ...], hf_shape: tuple[int, ...]):
    return tuple(hf_shape), lambda x: x.reshape(hf_shape), lambda t: t.reshape(jax_shape)


def kernel_layout(kind: str, jax_shape: tuple[int, ...], n_in: int, conv1d: bool):
    """(torch shape, to_hf, from_hf) of one layer's kernel (``weight`` in torch)."""
    if kind == "embed":
        return tuple(jax_shape), lambda x: x, lambda t: t
    if kind == "conv":  # (*window, in, out) -> [out, in, *window]
        n = len(jax_shape)
        return transpose_layout(jax_shape, (n - 1, n - 2, *range(n - 2)))
    return matrix_layout(jax_shape, n_in, transpose=not conv1d)


def plain_layout(jax_shape: tuple[int, ...], flat: bool):
    if flat:  # a bias of DenseGeneral with several output axes is one vector in torch
        return reshape_layout(jax_shape, (math.prod(jax_shape),))
    return tuple(jax_shape), lambda x: x, lambda t: t
