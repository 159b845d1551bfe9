"""Where a module multiplies its own parameters, read from the jaxpr of one of its calls.

Any JAX model multiplies its weights with ``jnp.einsum`` (any equation), ``jnp.dot``, ``jnp.matmul``, ``@``,
``lax.dot_general``, a convolution or ``lax.ragged_dot``; all of them become one of three contraction primitives
in a jaxpr. ``trace_call`` turns one call of a module method into a jaxpr whose constants are the arrays the call
closed over, among them the module's own parameters (found by identity). ``run`` then evaluates that jaxpr and
follows each parameter through the steps that only change how it is laid out: a cast, a transpose, unit axes added
or dropped, one entry or a static range of an axis taken (``w[e]``, ``w[:, :n]``). Those steps give a *view* of the
parameter (``ParamView``); a contraction whose weight operand is such a view is reported to a callback
(``on_contraction``), which may compute the contraction itself, e.g. adding a low-rank update, or just record which
parameter axes it contracts (``"in"``), keeps (``"out"``) or pairs with the input's (``"batch"``).

Leaves that follow a parameter are kept in the parameter's own axis order (``keepdims``: an axis a leaf does not
have is 1), so ``operand_view`` can lay a leaf out like any view of the parameter.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

CONTRACTIONS = ("dot_general", "conv_general_dilated", "ragged_dot_general")
LAYOUT_ONLY = ("convert_element_type", "copy", "copy_p", "transpose", "squeeze", "expand_dims", "reshape",
               "broadcast_in_dim", "slice", "dynamic_slice")
INLINED = ("pjit", "jit", "closed_call", "core_call")  # sub-jaxprs evaluated in place
REMAT = ("remat2", "checkpoint")


@dataclasses.dataclass(frozen=True)
class ParamView:
    """An array of a jaxpr that is parameter ``param`` laid out another way.

    Attributes:
        param: the parameter's name in the module.
        axes: for each axis of the array, the parameter axis it is, or None for an added unit axis.
        picks: ``(parameter axis, index)`` for each parameter axis fixed to one entry (the index an int or a traced
            scalar), in the order they were taken.
        ranges: ``(parameter axis, start, stop)`` for kept axes cut to a range (a static one, or one traced entry
            that a later step may drop).
    """

    param: str
    axes: tuple[int | None, ...]
    picks: tuple[tuple[int, Any], ...] = ()
    ranges: tuple[tuple[int, int, int], ...] = ()

    def range_of(self, axis: int) -> tuple[Any, Any] | None:
        return next(((start, stop) for a, start, stop in self.ranges if a == axis), None)


# ----------------------------------------------------------------------------------- layout-only steps


def _cut(view: ParamView, axis_of_array: int, start: Any, size: int) -> ParamView:
    """The view with array axis ``axis_of_array`` cut to ``size`` entries from ``start`` (an int, or a traced scalar
    when ``size`` is 1)."""
    param_axis = view.axes[axis_of_array]
    offset = (view.range_of(param_axis) or (0, 0))[0]
    kept = tuple(r for r in view.ranges if r[0] != param_axis)
    return dataclasses.replace(view, ranges=kept + ((param_axis, offset + start, offset + start + size),))


def _pick_dropped(view: ParamView, dropped: Sequence[int]) -> ParamView:
    """The view with array axes ``dropped`` (each of size 1) removed: a parameter axis cut to one entry becomes a
    pick of that entry."""
    picks, ranges = list(view.picks), list(view.ranges)
    for axis in dropped:
        param_axis = view.axes[axis]
        if param_axis is None:
            continue
        cut = view.range_of(param_axis)
        ranges = [r for r in ranges if r[0] != param_axis]
        picks.append((param_axis, 0 if cut is None else cut[0]))  # no cut: a parameter axis of size 1
    axes = tuple(a for i, a in enumerate(view.axes) if i not in set(dropped))
    return ParamView(view.param, axes, tuple(picks), tuple(ranges))


def _reshaped(view: ParamView, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> ParamView | None:
    """A reshape that only adds or drops unit axes keeps the view; any other reshape ends it."""
    if [n for n in old_shape if n != 1] != [n for n in new_shape if n != 1]:
        return None
    narrowed = _pick_dropped(view, [i for i, n in enumerate(old_shape) if n == 1])
    kept = iter(narrowed.axes)
    return dataclasses.replace(narrowed, axes=tuple(None if n == 1 else next(kept) for n in new_shape))


def _dynamic_slice(view: ParamView, eqn, invals, shape) -> ParamView | None:
    for axis, (size, full, start) in enumerate(zip(eqn.params["slice_sizes"], shape, invals[1:], strict=True)):
        if size == full:
            continue
        if size != 1 or view.axes[axis] is None:
            return None  # a traced range of more than one entry: not a layout step
        view = _cut(view, axis, start, 1)
    return view


def layout_view(eqn, view: ParamView, invals: Sequence[Any]) -> ParamView | None:
    """The view of ``eqn``'s output when its first operand is ``view`` and ``eqn`` only changes the layout (None:
    the output is not a view of the parameter)."""
    name = eqn.primitive.name
    shape = tuple(eqn.invars[0].aval.shape)
    if name in ("convert_element_type", "copy", "copy_p"):
        return view
    if name == "transpose":
        return dataclasses.replace(view, axes=tuple(view.axes[p] for p in eqn.params["permutation"]))
    if name == "squeeze":
        return _pick_dropped(view, eqn.params["dimensions"])
    if name in ("reshape", "expand_dims"):
        return _reshaped(view, shape, tuple(eqn.outvars[0].aval.shape))
    if name == "broadcast_in_dim":
        out_shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        if any(out_shape[i] != 1 for i in range(len(out_shape)) if i not in kept) or any(
                out_shape[d] != shape[j] for j, d in enumerate(kept)):
            return None
        axes = [None] * len(out_shape)
        for j, d in enumerate(kept):
            axes[d] = view.axes[j]
        return dataclasses.replace(view, axes=tuple(axes))
    if name == "slice":
        if eqn.params["strides"] not in (None, (1,) * len(shape)):
            return None
        for axis, (start, stop, full) in enumerate(zip(eqn.params["start_indices"], eqn.params["limit_indices"],
                                                       shape, strict=True)):
            if (start, stop) != (0, full) and view.axes[axis] is not None:
                view = _cut(view, axis, start, stop - start)
        return view
    if name == "dynamic_slice":
        return _dynamic_slice(view, eqn, invals, shape)
    return None


# ----------------------------------------------------------------------------------------- contractions


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A contraction whose weight operand is a view of a parameter.

    Attributes:
        eqn: the jaxpr equation (``dot_general``, ``conv_general_dilated`` or ``ragged_dot_general``).
        weight: the position of the weight among the equation's operands (0 or 1).
        view: how the weight operand is the parameter.
        roles: ``{parameter axis: "in" | "out" | "batch"}``: contracted with the input, kept in the output, or
            paired with an axis of the input (picked axes are ``"batch"`` too: one adapter per entry).
    """

    eqn: Any
    weight: int
    view: ParamView
    roles: dict[int, str]


def _dot_roles(eqn, weight: int, view: ParamView) -> dict[int, str]:
    (contracting, batch) = eqn.params["dimension_numbers"]
    contracting, batch = contracting[weight], batch[weight]
    roles = {}
    for axis, param_axis in enumerate(view.axes):
        if param_axis is not None:
            roles[param_axis] = "in" if axis in contracting else "batch" if axis in batch else "out"
    return roles


def _conv_roles(eqn, view: ParamView) -> dict[int, str] | None:
    if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
        return None
    kernel_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    roles = {}
    for axis, param_axis in enumerate(view.axes):
        if param_axis is not None:
            roles[param_axis] = "out" if axis == kernel_spec[0] else "in"
    return roles


def _ragged_roles(eqn, view: ParamView) -> dict[int, str]:
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (_, contracting), (_, batch) = numbers.dot_dimension_numbers
    groups = numbers.rhs_group_dimensions
    roles = {}
    for axis, param_axis in enumerate(view.axes):
        if param_axis is not None:
            roles[param_axis] = ("in" if axis in contracting else "batch" if axis in tuple(batch) + tuple(groups)
                                 else "out")
    return roles


def contraction_of(eqn, views: Sequence[ParamView | None]) -> Contraction | None:
    """The contraction ``eqn`` makes of a parameter with an input, or None (not a contraction, no parameter among
    its operands, or two parameters multiplied together)."""
    name = eqn.primitive.name
    if name not in CONTRACTIONS:
        return None
    operand_views = list(views[:2])
    if (operand_views[0] is None) == (operand_views[1] is None):
        return None
    weight = 0 if operand_views[0] is not None else 1
    view = operand_views[weight]
    if name == "dot_general":
        roles = _dot_roles(eqn, weight, view)
    elif name == "conv_general_dilated":
        roles = _conv_roles(eqn, view) if weight == 1 else None
    else:
        roles = _ragged_roles(eqn, view) if weight == 1 else None
    if roles is None:
        return None
    for param_axis, _ in view.picks:
        roles[param_axis] = "batch"
    return Contraction(eqn, weight, view, roles)


# ------------------------------------------------------------------------------------------ evaluation


OnContraction = Callable[[Contraction, list], Any]


ClosedJaxpr = jcore.ClosedJaxpr


def bind(eqn, invals: Sequence[Any]) -> list:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _sub_jaxpr(eqn) -> jcore.ClosedJaxpr | jcore.Jaxpr | None:
    if eqn.primitive.name in INLINED + REMAT:
        return eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    return None


def _run_inner(eqn, invals, views, on_contraction, unused) -> list:
    """A jit/remat equation whose operands include a parameter view, evaluated by ``run`` so the view is followed
    inside (a remat keeps its policy)."""
    inner = _sub_jaxpr(eqn)
    jaxpr, consts = (inner.jaxpr, inner.consts) if isinstance(inner, jcore.ClosedJaxpr) else (inner, ())

    def evaluate(*args):
        return _evaluate(jaxpr, consts, args, dict(zip(jaxpr.invars, views, strict=True)), on_contraction, unused)[0]

    if eqn.primitive.name in REMAT:
        evaluate = jax.checkpoint(evaluate, policy=eqn.params.get("policy"),
                                  prevent_cse=eqn.params.get("prevent_cse", True))
    return list(evaluate(*invals))


def _evaluate(jaxpr, consts, args, views: dict, on_contraction: OnContraction | None, unused: list) -> tuple:
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    for var, value in zip(list(jaxpr.constvars) + list(jaxpr.invars), list(consts) + list(args), strict=True):
        env[var] = value
    views = {var: view for var, view in views.items() if view is not None}
    for eqn in jaxpr.eqns:
        invals = [read(var) for var in eqn.invars]
        in_views = [None if isinstance(var, jcore.Literal) else views.get(var) for var in eqn.invars]
        outvals = _step(eqn, invals, in_views, views, on_contraction, unused)
        for var, value in zip(eqn.outvars, outvals, strict=True):
            env[var] = value
    return [read(var) for var in jaxpr.outvars], views


def _step(eqn, invals, in_views, views, on_contraction, unused) -> list:
    """One equation: a contraction of a parameter goes to ``on_contraction``; a layout step carries the view on; a
    jit or remat holding a view is evaluated inside; a view that meets anything else is recorded in ``unused``."""
    if not any(in_views):
        return bind(eqn, invals)
    contraction = contraction_of(eqn, in_views)
    if contraction is not None:
        out = on_contraction(contraction, invals) if on_contraction is not None else None
        return bind(eqn, invals) if out is None else [out]
    if eqn.primitive.name in LAYOUT_ONLY and in_views[0] is not None and not any(in_views[1:]):
        view = layout_view(eqn, in_views[0], invals)
        if view is not None:
            views[eqn.outvars[0]] = view
            return bind(eqn, invals)
    if _sub_jaxpr(eqn) is not None:
        return _run_inner(eqn, invals, in_views, on_contraction, unused)
    unused.extend((view.param, eqn.primitive.name) for view in in_views if view is not None)
    return bind(eqn, invals)


def run(closed: jcore.ClosedJaxpr, args: Sequence[Any], params: Mapping[str, Any],
        on_contraction: OnContraction | None = None) -> tuple[list, list[tuple[str, str]]]:
    """Evaluates ``closed`` on ``args``, following the parameters among its constants (``params``: name -> the
    array, matched by identity). Returns the outputs and ``(parameter, primitive)`` for every use of a parameter
    view that is neither a layout step nor a contraction with an input (e.g. added to something, or scanned over).
    """
    by_identity = {id(value): name for name, value in params.items()}
    views = {var: ParamView(by_identity[id(value)], tuple(range(jnp.ndim(value))))
             for var, value in zip(closed.jaxpr.constvars, closed.consts, strict=True) if id(value) in by_identity}
    unused: list = []
    outs, _ = _evaluate(closed.jaxpr, closed.consts, args, views, on_contraction, unused)
    return outs, unused


# ------------------------------------------------------------------------------------------- calls


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, jax.core.Tracer)) or hasattr(value, "__array__") and hasattr(value, "dtype")


@dataclasses.dataclass(frozen=True)
class TracedCall:
    """One method call as a jaxpr: ``closed`` takes the call's array arguments (``arrays``) and returns the leaves
    of its output (``out_tree``)."""

    closed: jcore.ClosedJaxpr
    arrays: list
    out_tree: Any

    def output(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.out_tree, list(leaves))


# True while ``trace_call`` traces a call to a jaxpr: state a call changes then stays inside the trace.
TRACING: contextvars.ContextVar = contextvars.ContextVar("jaxpeft_tracing_call", default=False)


def trace_call(function: Callable, args: tuple, kwargs: dict) -> TracedCall:
    """``function(*args, **kwargs)`` as a jaxpr over the array leaves of its arguments (the others stay as given);
    whatever it closes over (the module's parameters) becomes the jaxpr's constants."""
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    out_trees = []

    def flat_function(*arrays):
        filled = list(leaves)
        for position, array in zip(positions, arrays, strict=True):
            filled[position] = array
        call_args, call_kwargs = jax.tree_util.tree_unflatten(tree, filled)
        out_leaves, out_tree = jax.tree_util.tree_flatten(function(*call_args, **call_kwargs))
        out_trees.append(out_tree)
        return out_leaves

    arrays = [leaves[i] for i in positions]
    token = TRACING.set(True)
    try:
        closed = jax.make_jaxpr(flat_function)(*arrays)
    finally:
        TRACING.reset(token)
    return TracedCall(closed, arrays, out_trees[-1])


# ------------------------------------------------------------------------------------ leaves and views


def operand_view(leaf: jax.Array, view: ParamView, extra: int = 0) -> jax.Array:
    """``leaf``, kept in the parameter's axis order (size 1 where it does not vary, plus ``extra`` trailing axes
    such as the rank), laid out as the view: the same entries picked, ranges cut, axes ordered as the view's and
    unit axes added."""
    ndim = leaf.ndim - extra
    for param_axis, start, stop in view.ranges:
        if leaf.shape[param_axis] == 1:
            continue
        if isinstance(start, int):
            leaf = jax.lax.slice_in_dim(leaf, start, stop, axis=param_axis)
        else:  # one traced entry, kept as a unit axis
            leaf = jax.lax.dynamic_slice_in_dim(leaf, start, 1, axis=param_axis)
    remaining = list(range(ndim))
    for param_axis, index in sorted(view.picks, key=lambda pick: -pick[0]):
        position = remaining.index(param_axis)
        if leaf.shape[position] == 1:
            leaf = jax.lax.index_in_dim(leaf, 0, axis=position, keepdims=False)
        else:
            leaf = jax.lax.dynamic_index_in_dim(leaf, index, axis=position, keepdims=False)
        remaining.pop(position)
    order = [remaining.index(a) for a in view.axes if a is not None]
    leaf = jnp.transpose(leaf, order + list(range(len(remaining), len(remaining) + extra)))
    shape, kept = [], iter(leaf.shape[:len(order)])
    for axis in view.axes:
        shape.append(1 if axis is None else next(kept))
    return leaf.reshape(tuple(shape) + leaf.shape[len(order):])


def keepdims_shape(param_shape: Sequence[int], roles: Mapping[int, str], dropped_role: str) -> tuple[int, ...]:
    """The shape of a leaf that follows a parameter but does not vary along its ``dropped_role`` axes (size 1
    there), e.g. LoRA's A (``"out"`` dropped) and B (``"in"`` dropped).

    Example:
        >>> keepdims_shape((8, 4, 16), {0: "batch", 1: "in", 2: "out"}, "out")
        (8, 4, 1)
    """
    return tuple(1 if roles.get(axis) == dropped_role else size for axis, size in enumerate(param_shape))


def low_rank_dot(contraction: Contraction, invals: Sequence[Any], a: jax.Array, b: jax.Array,
                 hidden_scale: Any = None) -> jax.Array:
    """The ``dot_general`` of ``contraction`` with its weight replaced by the low-rank ``A B``: ``a`` is
    ``keepdims`` over the output axes plus a trailing rank, ``b`` over the input axes plus the rank. The input
    meets A over the contracted axes (pairing batch axes), the rank-sized result (times ``hidden_scale``) meets B;
    the result is laid out as the contraction's own output. Both products run as (batched) 2-D matmuls over all
    rows: XLA's CPU backend runs those, and their gradients, far faster than dots with several contracting axes."""
    if contraction.eqn.primitive.name == "ragged_dot_general":
        return _low_rank_ragged(contraction, invals, a, b, hidden_scale)
    x = invals[1 - contraction.weight]
    x_contract, w_contract, x_batch, w_batch, w_free = _dims(contraction)
    x_free = [axis for axis in range(x.ndim) if axis not in x_contract and axis not in x_batch]
    batch_shape = tuple(x.shape[axis] for axis in x_batch)
    free_shape = tuple(x.shape[axis] for axis in x_free)
    n_batch, n_rows, n_in = math.prod(batch_shape), math.prod(free_shape), math.prod(x.shape[i] for i in x_contract)
    rows = jnp.transpose(x, list(x_batch) + x_free + list(x_contract)).reshape(n_batch, n_rows, n_in)
    ndim = len(contraction.view.axes)
    a_view = operand_view(a, contraction.view, extra=1)  # the weight's free axes are 1
    a_rows = jnp.transpose(a_view, list(w_batch) + list(w_contract) + w_free + [ndim]).reshape(n_batch, n_in, -1)
    b_view = operand_view(b, contraction.view, extra=1)  # the contracted axes are 1
    out_shape = tuple(b_view.shape[axis] for axis in w_free)
    b_rows = jnp.transpose(b_view, list(w_batch) + list(w_contract) + [ndim] + w_free).reshape(
        n_batch, -1, math.prod(out_shape))
    hidden = _rows_matmul(rows, a_rows.astype(x.dtype))
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    out = _rows_matmul(hidden, b_rows.astype(hidden.dtype)).reshape(batch_shape + free_shape + out_shape)
    if contraction.weight == 0:  # the contraction's output is (batch, weight's free axes, input's free axes)
        n_b, n_x = len(batch_shape), len(free_shape)
        out = jnp.transpose(out, list(range(n_b)) + list(range(n_b + n_x, out.ndim)) + list(range(n_b, n_b + n_x)))
    return out


def _ragged_axes(contraction: Contraction) -> tuple[int, int] | None:
    """(the weight's contracted axis, its output axis) of a ``ragged_dot_general`` that a low-rank pair can take
    apart: the input's last axis contracted with one weight axis, one output axis, no batch axes; else None."""
    numbers = contraction.eqn.params["ragged_dot_dimension_numbers"]
    (x_contract, w_contract), (x_batch, _) = numbers.dot_dimension_numbers
    ndim = len(contraction.view.axes)
    outs = [axis for axis in range(ndim) if axis not in w_contract and axis not in numbers.rhs_group_dimensions]
    x_ndim = contraction.eqn.invars[0].aval.ndim
    if contraction.weight != 1 or x_batch or len(w_contract) != 1 or len(outs) != 1 or tuple(x_contract) != (
            x_ndim - 1,):
        return None
    return w_contract[0], outs[0]


def _low_rank_ragged(contraction: Contraction, invals: Sequence[Any], a: jax.Array, b: jax.Array,
                     hidden_scale: Any) -> jax.Array:
    """``low_rank_dot`` for a grouped matmul (experts): the same ``ragged_dot_general`` twice, the rank in place of
    the weight's output axis (with A), then of its contracted axis (with B)."""
    w_in, w_out = _ragged_axes(contraction)
    x, group_sizes = invals[0], invals[2]

    def ranked(leaf: jax.Array, axis: int) -> jax.Array:  # the rank moved into the place of a unit axis
        return jnp.squeeze(jnp.moveaxis(operand_view(leaf, contraction.view, extra=1), -1, axis), axis + 1)

    hidden = bind(contraction.eqn, [x, ranked(a, w_out).astype(x.dtype), group_sizes])[0]
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    return bind(contraction.eqn, [hidden, ranked(b, w_in).astype(hidden.dtype), group_sizes])[0]


def factorable(contraction: Contraction) -> bool:
    """Whether ``low_rank_dot`` can run the contraction with a low-rank weight."""
    name = contraction.eqn.primitive.name
    return name == "dot_general" or name == "ragged_dot_general" and _ragged_axes(contraction) is not None


def _rows_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    """``(n, rows, k) @ (n, k, m)``, as one 2-D matmul when ``n`` is 1."""
    if x.shape[0] == 1:
        return (x[0] @ y[0])[None]
    return jnp.matmul(x, y)


def _dims(contraction: Contraction):
    """(input's contracted axes, weight's contracted axes, input's batch axes, weight's batch axes, weight's free
    axes) of a ``dot_general`` contraction."""
    weight = contraction.weight
    (contracting, batch) = contraction.eqn.params["dimension_numbers"]
    w_contract, w_batch = contracting[weight], batch[weight]
    w_free = [a for a in range(len(contraction.view.axes)) if a not in w_contract and a not in w_batch]
    return contracting[1 - weight], w_contract, batch[1 - weight], w_batch, w_free


def output_scale(contraction: Contraction, leaf: jax.Array, out_ndim: int) -> jax.Array:
    """``leaf`` (the parameter's axis order, size 1 along the contracted axes) laid out to multiply the
    contraction's output: its batch axes, then the input's free axes (size 1), then the weight's free axes, or the
    weight's before the input's when the weight is the first operand."""
    _, w_contract, _, w_batch, w_free = _dims(contraction)
    seen = operand_view(leaf, contraction.view)
    kept = jnp.transpose(seen, list(w_batch) + w_free + list(w_contract))
    kept = kept.reshape(kept.shape[:len(w_batch) + len(w_free)])  # the contracted axes are 1
    n_x_free = out_ndim - len(w_batch) - len(w_free)
    batch_shape, free_shape = kept.shape[:len(w_batch)], kept.shape[len(w_batch):]
    middle = (1,) * n_x_free
    shape = (batch_shape + middle + free_shape if contraction.weight == 1 else batch_shape + free_shape + middle)
    return kept.reshape(shape)


def input_scale(contraction: Contraction, leaf: jax.Array, x_ndim: int) -> jax.Array:
    """``leaf`` (the parameter's axis order, size 1 along the kept axes) laid out to multiply the contraction's
    input: each contracted or batch axis of the input takes the size of the weight's axis it meets, the others 1."""
    x_contract, w_contract, x_batch, w_batch, _ = _dims(contraction)
    seen = operand_view(leaf, contraction.view)
    partner = dict(zip(list(x_contract) + list(x_batch), list(w_contract) + list(w_batch), strict=True))
    order = [partner[axis] for axis in range(x_ndim) if axis in partner]
    kept = jnp.transpose(seen, order + [a for a in range(seen.ndim) if a not in order])
    return kept.reshape(tuple(kept.shape[order.index(partner[a])] if a in partner else 1 for a in range(x_ndim)))


def call_through(function: Callable, args: tuple, kwargs: dict, params: Mapping[str, Any],
                 on_contraction: OnContraction | None = None, replaced: Mapping[str, Any] | None = None) -> Any:
    """``function(*args, **kwargs)`` evaluated through its jaxpr: each contraction of one of ``params`` (name ->
    the array the call closes over) goes to ``on_contraction``, and each parameter in ``replaced`` (name -> new
    value) is replaced wherever the call uses it."""
    return evaluate_traced(trace_call(function, args, kwargs), params, on_contraction, replaced)


def evaluate_traced(traced: TracedCall, params: Mapping[str, Any], on_contraction: OnContraction | None = None,
                    replaced: Mapping[str, Any] | None = None) -> Any:
    """``call_through`` for a call traced already (``trace_call``)."""
    consts = list(traced.closed.consts)
    for name, value in (replaced or {}).items():
        consts = [value if const is params[name] else const for const in consts]
    followed = {name: value for name, value in params.items() if name not in (replaced or {})}
    outs, _ = run(ClosedJaxpr(traced.closed.jaxpr, consts), traced.arrays, followed, on_contraction)
    return traced.output(outs)


def factorable_roles(traced: TracedCall, params: Mapping[str, Any]) -> dict[str, list[dict[int, str]]]:
    """For each of ``params`` that the call uses only in contractions with an input that ``low_rank_dot`` can run
    (through layout steps), the roles of its axes in each; found by an abstract pass that computes nothing."""
    roles: dict[str, list] = {}
    others: set[str] = set()

    def note(contraction: Contraction, invals) -> None:
        if factorable(contraction):
            roles.setdefault(contraction.view.param, []).append(contraction.roles)
        else:
            others.add(contraction.view.param)

    def evaluate(*arrays):
        outs, unused = run(traced.closed, arrays, params, note)
        others.update(name for name, _ in unused)
        return outs

    jax.eval_shape(evaluate, *traced.arrays)
    return {name: found for name, found in roles.items() if name not in others}
