"""A new LoRA adapter made from a weighted combination of existing ones (HF PEFT's ``add_weighted_adapter``).

Three ways to combine adapters ``i`` with weights ``w_i`` and scalings ``s_i`` (``lora_alpha / r``), as in HF PEFT:

- ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` and ``B = [B_1, B_2, ...]`` along the rank: the update is
  exactly ``sum_i w_i s_i A_i B_i``, at rank ``sum_i r_i``.
- ``"linear"``: ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i`` (same rank needed):
  cheap, but the cross terms make it only an approximation.
- ``"svd"``: the exact weighted sum of the updates, truncated to ``svd_rank`` (default: the largest rank) by an SVD;
  ``svd_clamp`` clamps the factors at that quantile of their entries.

The new adapter's config is the first adapter's with ``r`` and ``lora_alpha`` set to the new rank (scaling 1, or
``sqrt(r)`` with rsLoRA, as in HF PEFT) and the union of the target modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import core
from jaxpeft.methods.lora import LoraConfig, delta_weight
from jaxpeft.tree import SAVED_MODULES_KEY, flatten, unflatten_like

COMBINATION_TYPES = ("svd", "linear", "cat")
_LEAVES = ("lora_A", "lora_B", "lora_scaling")


def _rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def combined_config(configs: Sequence[LoraConfig], combination_type: str, svd_rank: int | None) -> LoraConfig:
    """The config of the combined adapter (HF PEFT's rules), after checking the adapters can be combined.

    Example:
        >>> import jaxpeft
        >>> from jaxpeft.weighted_adapter import combined_config
        >>> a = jaxpeft.LoraConfig(r=4, target_modules=["q"])
        >>> b = jaxpeft.LoraConfig(r=2, target_modules=["v"])
        >>> config = combined_config([a, b], "cat", None)
        >>> config.r, config.lora_alpha, config.target_modules
        (6, 6, ['q', 'v'])
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is unknown; use one of {', '.join(COMBINATION_TYPES)}")
    for config in configs:
        if not isinstance(config, LoraConfig):
            raise core.AdapterError(f"add_weighted_adapter combines LoRA adapters, not {config.peft_type}")
        if config.use_dora:
            raise core.AdapterError("add_weighted_adapter cannot combine DoRA adapters (their magnitude vectors do "
                                    "not add up); merge them one by one instead")
        if config.trainable_token_indices is not None:
            raise core.AdapterError("add_weighted_adapter cannot combine adapters with trainable_token_indices (their "
                                    "embedding rows do not add up); merge them one by one instead")
    ranks = [_rank(config) for config in configs]
    combination_type = "linear" if len(configs) == 1 else combination_type
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise core.AdapterError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use "
                                    "'cat' or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    targets = [config.target_modules for config in configs]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise core.AdapterError("the adapters mix target_modules given as a regex string and as a list; give them "
                                "in one form to combine them")
    if isinstance(targets[0], str):
        new_targets = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(set().union(*targets))
    return dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
                               rank_pattern={}, alpha_pattern={}, init_lora_weights=True, inference_mode=False)


def _combine_layer(combination_type: str, parts: list[tuple[float, dict]], new_a: jax.Array, new_b: jax.Array,
                   svd_clamp: float | None, svd_full_matrices: bool) -> tuple[jax.Array, jax.Array]:
    """The combined ``(lora_A, lora_B)`` of one layer from ``[(weight, {lora_A, lora_B, lora_scaling})]``."""
    stack = parts[0][1]["lora_scaling"].shape

    def per_stack(scaling, like):  # scaling (*stack,) broadcast against a stacked factor
        return scaling.reshape(stack + (1,) * (like.ndim - len(stack)))

    if combination_type == "cat":
        a = jnp.concatenate([weight * per_stack(leaves["lora_scaling"], leaves["lora_A"]) * leaves["lora_A"]
                             for weight, leaves in parts], axis=-1)
        b = jnp.concatenate([leaves["lora_B"] for _, leaves in parts], axis=len(stack))
        pad = new_a.shape[-1] - a.shape[-1]  # adapters absent from this layer leave zero rank slots
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(b, [(0, 0)] * len(stack) + [(0, pad)] + [(0, 0)] * (b.ndim - len(stack) - 1))
        return a, b
    if combination_type == "linear":
        a, b = jnp.zeros_like(new_a), jnp.zeros_like(new_b)
        for weight, leaves in parts:
            weighted = weight * leaves["lora_scaling"]
            root = jnp.sqrt(jnp.abs(weighted))
            a = a + per_stack(jnp.where(weighted >= 0, root, -root), a) * leaves["lora_A"]
            b = b + per_stack(root, b) * leaves["lora_B"]
        return a, b
    delta = sum(weight * delta_weight(leaves["lora_A"], leaves["lora_B"], leaves["lora_scaling"])
                for weight, leaves in parts)
    in_shape, out_shape = new_a.shape[len(stack):-1], new_b.shape[len(stack) + 1:]
    rank = new_a.shape[-1]
    # torch's layout: the update as [out, in] per layer; lora_B = U S, lora_A = V^T.
    matrix = jnp.swapaxes(delta.reshape(stack + (int(np.prod(in_shape)), int(np.prod(out_shape)))), -1, -2)
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=svd_full_matrices)
    u = u[..., :rank] * s[..., None, :rank]
    vh = vh[..., :rank, :]
    if svd_clamp is not None:
        flat = jnp.concatenate([u.reshape(stack + (-1,)), vh.reshape(stack + (-1,))], axis=-1)
        high = jnp.quantile(flat, svd_clamp, axis=-1)[..., None, None]
        u, vh = jnp.clip(u, -high, high), jnp.clip(vh, -high, high)
    a = jnp.swapaxes(vh, -1, -2).reshape(stack + in_shape + (rank,))
    b = jnp.swapaxes(u, -1, -2).reshape(stack + (rank,) + out_shape)
    return a, b


def add_weighted_adapter(variables: Any, configs: dict[str, LoraConfig], adapters: Sequence[str],
                         weights: Sequence[float], adapter_name: str, apply_fn: Callable, *sample_args,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, **sample_kwargs) -> tuple[Any, LoraConfig]:
    """Adds adapter ``adapter_name``, the weighted combination of ``adapters``: returns ``(variables, config)``.

    ``configs`` maps adapter names to their configs; ``apply_fn(variables, *sample_args, **sample_kwargs)`` is
    traced once to place the new adapter (as ``init_adapters``). A module in the ``modules_to_save`` of one of the
    adapters keeps that adapter's trained copy; two adapters with copies of the same module are an error (HF PEFT's
    rule). See the module docstring for the combination types.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxpeft
        >>> from jaxpeft.weighted_adapter import add_weighted_adapter
        >>> model, x = nn.Dense(3), jnp.ones((1, 4))
        >>> variables = model.init(jax.random.key(0), x)
        >>> configs = {n: jaxpeft.LoraConfig(r=2, target_modules=".*", init_lora_weights=False) for n in "ab"}
        >>> for i, n in enumerate("ab"):
        ...     variables = jaxpeft.init_adapters(jax.random.key(i), configs[n], model.apply, variables, x,
        ...                                       adapter_name=n)
        >>> variables, config = add_weighted_adapter(variables, configs, ["a", "b"], [1.0, 1.0], "ab", model.apply,
        ...                                          x, combination_type="cat")
        >>> apply = jaxpeft.rewrite(model.apply, {**configs, "ab": config})
        >>> delta = lambda n: apply(variables, x, adapter_name=n) - model.apply(variables, x)
        >>> bool(jnp.allclose(delta("ab"), delta("a") + delta("b"), atol=1e-5))
        True
    """
    core.check_adapter_name(adapter_name)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights")
    for name in adapters:
        if not isinstance(name, str) or name not in configs:
            raise core.AdapterError(f"no adapter named {name!r}; adapters: {sorted(configs)}")
    if adapter_name in configs:
        raise core.AdapterError(f"an adapter named {adapter_name!r} already exists; choose another name")
    new_config = combined_config([configs[name] for name in adapters], combination_type, svd_rank)
    combination_type = "linear" if len(adapters) == 1 else combination_type
    flat = flatten(variables["params"])
    saved_by: dict[tuple, str] = {}
    for path in flat:
        for i in range(len(path) - 1):
            if path[i] == SAVED_MODULES_KEY and path[i + 1] in adapters:
                owner = saved_by.setdefault(path[:i], path[i + 1])
                if owner != path[i + 1]:
                    raise core.AdapterError(f"adapters {owner!r} and {path[i + 1]!r} both keep a trained copy of "
                                            f"{'.'.join(path[:i])} (modules_to_save); they cannot be combined")
    saved = sorted({".".join(p) for p in saved_by})
    new_config = dataclasses.replace(new_config, modules_to_save=saved or None)
    built = core.init_adapters(jax.random.key(0), dataclasses.replace(new_config, modules_to_save=None), apply_fn,
                               variables, *sample_args, adapter_name=adapter_name, **sample_kwargs)
    flat = flatten(built["params"])
    groups = {name: core.layer_groups(variables, name, _LEAVES) for name in adapters}
    for path, new_leaves in core.layer_groups(built, adapter_name, _LEAVES).items():
        parts = [(weight, {k: jnp.asarray(v, jnp.float32) for k, v in groups[name][path].items()})
                 for name, weight in zip(adapters, weights, strict=True) if path in groups[name]]
        if not parts:
            continue
        new_a, new_b = (jnp.asarray(new_leaves[k], jnp.float32) for k in ("lora_A", "lora_B"))
        a, b = _combine_layer(combination_type, parts, new_a, new_b, svd_clamp, svd_full_matrices)
        active = new_leaves["lora_scaling"] != 0  # stacked layers the new adapter leaves alone stay zero
        flat[path + ("lora_A", adapter_name)] = jnp.where(active.reshape(active.shape + (1,) * (a.ndim - active.ndim)),
                                                          a, 0).astype(new_leaves["lora_A"].dtype)
        flat[path + ("lora_B", adapter_name)] = jnp.where(active.reshape(active.shape + (1,) * (b.ndim - active.ndim)),
                                                          b, 0).astype(new_leaves["lora_B"].dtype)
    for module_path, owner in saved_by.items():
        marker = module_path + (SAVED_MODULES_KEY, owner)
        for path, leaf in list(flat.items()):
            if path[:len(marker)] == marker:
                flat[module_path + (SAVED_MODULES_KEY, adapter_name) + path[len(marker):]] = leaf
    params = unflatten_like(flat, built["params"])
    return ({**built, "params": params} if isinstance(built, dict) else built.copy({"params": params})), new_config
