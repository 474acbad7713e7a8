"""Finds softmax attention in a jaxpr, for `jax_brgemm.optimize`.

The pattern is what ``jax.nn.dot_product_attention`` (XLA implementation) and the plain
``einsum -> softmax -> einsum`` both trace to:

    S = dot_general(Q, K)                  one contracting dim (the head dim), one K free dim (keys)
    L = S scaled by scalars, transposed, converted
    P = exp(L - m) / sum_keys(exp(L - m))  m: anything constant along the keys (softmax's shift)
    O = dot_general(P, V)                  contracting P's key dim, the same batch dims as S

Every dim of Q other than the batch and head dims is a query row (several, as grouped-query
attention has, flatten into one), every batch dim a separate problem. Such a match becomes one
`nn.dot_product_attention` call over ``(B, T, 1, H)`` blocks, and every eqn between S and P
(all of whose results are read only inside the pattern) is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from . import _rules

_SCALAR_STEPS = ("mul", "div")
_LAYOUT_STEPS = ("transpose", "convert_element_type", "copy")


@dataclass
class AttentionMatch:
    s_eqn: object
    pv_eqn: object
    pv_index: int
    pattern: set            # indices of the eqns the call replaces (pv_index included)
    scales: list            # ("mul" | "div", literal value or var)
    p_is_lhs: bool
    p_labels: list          # labels of P's dims: ("b", k), ("q", j) or "s"
    macs: int
    extras: list            # ("bias" | "mask", var, labels of its dims (None: size 1), value
                            #  when it is a compile-time constant (a causal mask), else None)


def _literal(v):
    return isinstance(v, core.Literal)


def _scalar(v):
    return (np.ndim(v.val) == 0) if _literal(v) else v.aval.shape == ()


def _floating(v):
    return jnp.issubdtype(v.aval.dtype, jnp.floating)


def match(jaxpr, i, consumers, producers, min_macs):
    """The AttentionMatch whose S is eqn i, or None."""
    s_eqn = jaxpr.eqns[i]
    (lc, rc), (lb, rb) = s_eqn.params["dimension_numbers"]
    q, k = s_eqn.invars[:2]
    if _literal(q) or _literal(k) or len(lc) != 1 or len(rc) != 1:
        return None
    if q.aval.dtype != k.aval.dtype or np.dtype(q.aval.dtype) not in _rules.KERNEL_DTYPES:
        return None
    lfree = [d for d in range(q.aval.ndim) if d not in (*lc, *lb)]
    rfree = [d for d in range(k.aval.ndim) if d not in (*rc, *rb)]
    if len(rfree) != 1 or not lfree:
        return None
    labels = [("b", j) for j in range(len(lb))] + [("q", j) for j in range(len(lfree))] + ["s"]
    outputs = set(v for v in jaxpr.outvars if not _literal(v))

    def only_use(v):
        uses = consumers.get(v, [])
        return uses[0] if len(uses) == 1 and v not in outputs else (None, None)

    # S -> L: scalar scales, transposes and conversions, then an additive bias and masks
    # (jnp.where(mask, L, large negative)), each eqn the only reader of the last.
    v, scales, extras = s_eqn.outvars[0], [], []
    while True:
        j, eqn = only_use(v)
        if eqn is None:
            break
        name = eqn.primitive.name
        if not extras and (name in _SCALAR_STEPS and eqn.invars[0] is v and _scalar(eqn.invars[1]) or
                           name == "mul" and eqn.invars[1] is v and _scalar(eqn.invars[0])):
            scales.append((name, eqn.invars[1] if eqn.invars[0] is v else eqn.invars[0]))
        elif name == "transpose":
            labels = [labels[p] for p in eqn.params["permutation"]]
        elif name == "add":
            other = eqn.invars[1] if eqn.invars[0] is v else eqn.invars[0]
            operand = _labelled_operand(other, labels, v.aval.shape, producers)
            if operand is None or not _floating(other):
                break
            extras.append(("bias",) + operand + (None,))
        elif name == "select_n" and len(eqn.invars) == 3 and eqn.invars[2] is v:
            pred, fill = eqn.invars[0], eqn.invars[1]
            operand = _labelled_operand(pred, labels, v.aval.shape, producers)
            if operand is None or pred.aval.dtype != np.dtype(bool) or not _large_negative(fill, producers):
                break
            extras.append(("mask",) + operand + (_constant(operand[0], producers),))
        elif not (name in _LAYOUT_STEPS and _floating(eqn.outvars[0])):
            break
        v = eqn.outvars[0]
    found = _softmax(v, labels, consumers, only_use)
    if found is None:
        return None
    p, p_labels = found
    pv_index, pv = only_use(p)
    if pv is None or pv.primitive.name != "dot_general":
        return None
    (pc, vc), (pb, vb) = pv.params["dimension_numbers"]
    p_is_lhs = pv.invars[0] is p
    if not p_is_lhs:
        (vc, pc), (vb, pb) = (pc, vc), (pb, vb)
    value = pv.invars[1] if p_is_lhs else pv.invars[0]
    if _literal(value) or value.aval.dtype != q.aval.dtype or len(pc) != 1 or p_labels[pc[0]] != "s":
        return None
    if sorted(p_labels[d] for d in pb) != [("b", j) for j in range(len(lb))]:
        return None
    vfree = [d for d in range(value.aval.ndim) if d not in (*vc, *vb)]
    if len(vfree) != 1 or value.aval.shape[vfree[0]] != q.aval.shape[lc[0]]:
        return None  # the op takes value heads of the query's head size
    pattern = _closure(jaxpr, i, p, pv_index, consumers, outputs)
    if pattern is None:
        return None
    batch = math.prod(q.aval.shape[d] for d in lb)
    rows = math.prod(q.aval.shape[d] for d in lfree)
    macs = 2 * batch * rows * k.aval.shape[rfree[0]] * q.aval.shape[lc[0]]
    if macs < min_macs:
        return None
    return AttentionMatch(s_eqn, pv, pv_index, pattern, scales, p_is_lhs, p_labels, macs, extras)


def _labelled_operand(x, labels, shape, producers):
    """(source var, the label of each of its dims or None where it has size 1) for an operand
    of an elementwise op on the chain (labels `labels`, shape `shape`), looking through one
    broadcast_in_dim; None for a literal or anything else."""
    if _literal(x):
        return None
    eqn = producers.get(x)
    if eqn is not None and eqn.primitive.name == "broadcast_in_dim" and not _literal(eqn.invars[0]):
        src = eqn.invars[0]
        dims = eqn.params["broadcast_dimensions"]
        return src, [None if size == 1 else labels[d] for d, size in zip(dims, src.aval.shape)]
    if len(x.aval.shape) != len(shape):
        return None
    return x, [None if size == 1 else label for size, label in zip(x.aval.shape, labels)]


_MAX_CONSTANT = 1 << 24  # elements evaluated at trace time to recognise a causal mask


def _constant(x, producers):
    """x's value when it depends on no input (iota comparisons: a causal mask), else None."""
    memo = {}

    def value(v):
        if _literal(v):
            return v.val
        if v in memo:
            return memo[v]
        eqn = producers.get(v)
        if eqn is None or math.prod(v.aval.shape) > _MAX_CONSTANT:
            raise LookupError
        ins = [value(u) for u in eqn.invars]
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
        memo.update(zip(eqn.outvars, outs))
        return memo[v]

    try:
        return np.asarray(value(x))
    except (LookupError, TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def _is_causal(mask_blocks, rows, keys):
    """Whether a (nb or 1, 1, rows or 1, keys) constant mask is jnp.tril of ones: query i
    sees keys j <= i (top-left aligned, as is_causal)."""
    if mask_blocks.shape[2:] != (rows, keys):
        return False
    return bool(np.all(mask_blocks == np.tril(np.ones((rows, keys), bool))))


def _large_negative(x, producers):
    """Whether x is a finite scalar fill below -1e30 (broadcast), as jnp.where masking uses:
    exp of it underflows to exactly 0, as the op's own masked logits do."""
    while not _literal(x):
        eqn = producers.get(x)
        if eqn is None or eqn.primitive.name not in ("broadcast_in_dim", "convert_element_type"):
            return False
        x = eqn.invars[0]
    value = np.asarray(x.val, np.float64)
    return value.ndim == 0 and np.isfinite(value) and value < -1e30


def _softmax(v, labels, consumers, only_use):
    """(P, P's labels) when the readers of L = v compute softmax(L) over its "s" dim."""
    # L (through transposes) - m, where m has size 1 along the keys.
    for _, eqn in consumers.get(v, []):
        lt, lt_labels = v, labels
        while eqn is not None and eqn.primitive.name == "transpose" and eqn.invars[0] is lt:
            lt_labels = [lt_labels[p] for p in eqn.params["permutation"]]
            lt = eqn.outvars[0]
            eqn = only_use(lt)[1]
        if eqn is None or eqn.primitive.name != "sub" or eqn.invars[0] is not lt:
            continue
        axis = lt_labels.index("s")
        if not _constant_along(eqn.invars[1], axis, lt.aval.shape):
            continue
        e_eqn = only_use(eqn.outvars[0])[1]
        if e_eqn is None or e_eqn.primitive.name != "exp":
            continue
        e = e_eqn.outvars[0]
        readers = consumers.get(e, [])
        if len(readers) != 2:
            continue
        div = next((r for _, r in readers if r.primitive.name == "div" and r.invars[0] is e), None)
        total = next((r for _, r in readers if r.primitive.name == "reduce_sum"), None)
        if div is None or total is None or tuple(total.params["axes"]) != (axis,):
            continue
        if _keys_broadcast_of(div.invars[1], total.outvars[0], axis, e.aval.shape, consumers):
            return div.outvars[0], lt_labels
    return None


def _constant_along(v, axis, shape):
    """Whether v (an operand of an elementwise op on `shape`) is the same for every key."""
    if _literal(v):
        return np.ndim(v.val) == 0
    s = v.aval.shape
    return len(s) == 0 or (len(s) == len(shape) and s[axis] == 1)


def _keys_broadcast_of(v, total, axis, shape, consumers):
    """Whether v is `total` (the sum over the keys) with a unit key dim put back."""
    if v.aval.shape[axis:axis + 1] != (1,) or len(v.aval.shape) != len(shape):
        return False
    for _, eqn in consumers.get(total, []):
        if eqn.outvars[0] is not v:
            continue
        if eqn.primitive.name == "broadcast_in_dim":
            return tuple(eqn.params["broadcast_dimensions"]) == tuple(d for d in range(len(shape)) if d != axis)
        if eqn.primitive.name == "reshape":
            return True  # the same elements with a unit dim inserted
    return False


def _closure(jaxpr, i, p, pv_index, consumers, outputs):
    """Every eqn from S up to P; None unless all that they produce, P aside, is read only
    among them (so the one call can replace them all)."""
    tainted, pattern = set(jaxpr.eqns[i].outvars), {i}
    for j in range(i + 1, pv_index):
        eqn = jaxpr.eqns[j]
        if any(not _literal(x) and x in tainted for x in eqn.invars):
            pattern.add(j)
            tainted.update(eqn.outvars)
    for v in tainted:
        if v is p:
            continue
        if v in outputs or any(j not in pattern for j, _ in consumers.get(v, [])):
            return None
    pattern.add(pv_index)
    return pattern


def _to_blocks(x, labels, batch_sizes, row_sizes, keys):
    """A bias or mask with the given dim labels as (nb or 1, 1, rows or 1, keys or 1), the
    op's broadcastable layout."""
    order = [("b", j) for j in range(len(batch_sizes))] + [("q", j) for j in range(len(row_sizes))] + ["s"]
    sizes = list(batch_sizes) + list(row_sizes) + [keys]
    present = [label for label in labels if label is not None]
    x = x.reshape([size for size, label in zip(x.shape, labels) if label is not None])
    x = jnp.transpose(x, [present.index(label) for label in order if label in present])
    x = x.reshape([sizes[n] if label in present else 1 for n, label in enumerate(order)])
    nb = len(batch_sizes)
    parts = [order[:nb], order[nb:-1]]
    shape = []
    for part in parts:  # a group of dims flattens where any of them varies
        if any(label in present for label in part):
            shape.append([sizes[order.index(label)] for label in part])
        else:
            shape.append([1] * len(part))
    x = jnp.broadcast_to(x, shape[0] + shape[1] + [x.shape[-1]])
    return x.reshape(math.prod(shape[0]), 1, math.prod(shape[1]), x.shape[-1])


def run(m: AttentionMatch, read):
    """The attention of match m as one nn.dot_product_attention call, in the layout of the
    eqn it replaces."""
    from .nn import dot_product_attention

    (lc, rc), (lb, rb) = m.s_eqn.params["dimension_numbers"]
    q, k = (read(x) for x in m.s_eqn.invars[:2])
    lfree = [d for d in range(q.ndim) if d not in (*lc, *lb)]
    rfree = [d for d in range(k.ndim) if d not in (*rc, *rb)]
    batch_sizes = [q.shape[d] for d in lb]
    row_sizes = [q.shape[d] for d in lfree]
    nb, h = math.prod(batch_sizes), q.shape[lc[0]]
    query = jnp.transpose(q, (*lb, *lfree, *lc)).reshape(nb, -1, 1, h)
    key = jnp.transpose(k, (*rb, *rfree, *rc)).reshape(nb, -1, 1, h)

    (pc, vc), (pb, vb) = m.pv_eqn.params["dimension_numbers"]
    if not m.p_is_lhs:
        (vc, pc), (vb, pb) = (pc, vc), (pb, vb)
    value_var = m.pv_eqn.invars[1] if m.p_is_lhs else m.pv_eqn.invars[0]
    value = read(value_var)
    # V's batch dims in S's batch order (P's batch labels say which is which).
    v_batch = [vd for _, vd in sorted((m.p_labels[pd][1], vd) for pd, vd in zip(pb, vb))]
    vfree = [d for d in range(value.ndim) if d not in (*vc, *vb)]
    value = jnp.transpose(value, (*v_batch, *vc, *vfree)).reshape(nb, -1, 1, h)

    scale, traced = 1.0, []
    for kind, x in m.scales:
        if _literal(x):
            scale = scale * float(x.val) if kind == "mul" else scale / float(x.val)
        else:
            traced.append((kind, read(x)))
    for kind, x in traced:  # a traced scale scales the queries
        query = (query * x if kind == "mul" else query / x).astype(query.dtype)
    args = {"bias": None, "mask": None, "is_causal": False}
    keys = k.shape[rfree[0]]
    for kind, var, var_labels, constant in m.extras:
        if constant is not None:
            with jax.ensure_compile_time_eval():
                blocks = np.asarray(_to_blocks(jnp.asarray(constant), var_labels, batch_sizes, row_sizes, keys))
            if _is_causal(blocks, math.prod(row_sizes), keys):
                args["is_causal"] = True  # blocks above the diagonal are skipped, not masked
                continue
        x = _to_blocks(read(var), var_labels, batch_sizes, row_sizes, keys)
        if kind == "bias":
            args["bias"] = x if args["bias"] is None else args["bias"] + x
        else:
            args["mask"] = x if args["mask"] is None else jnp.logical_and(args["mask"], x)
    out = dot_product_attention(query, key, value, scale=scale, **args)  # (nb, rows, 1, h)
    out = out.reshape(*batch_sizes, *row_sizes, h)
    # dot_general's output: batch dims (in P's order), then lhs free, then rhs free dims.
    ours = [("b", j) for j in range(len(lb))] + [("q", j) for j in range(len(lfree))] + ["h"]
    p_free = [m.p_labels[d] for d in range(len(m.p_labels)) if d not in (*pb, *pc)]
    batch_order = [m.p_labels[d] for d in pb]
    want = batch_order + (p_free + ["h"] if m.p_is_lhs else ["h"] + p_free)
    out = jnp.transpose(out, [ours.index(label) for label in want])
    return out.astype(m.pv_eqn.outvars[0].aval.dtype)
