"""Finds training-mode batch normalisation in a jaxpr, for `jax_brgemm.optimize`.

The pattern is what ``nnx.BatchNorm`` and ``linen.BatchNorm`` (``use_running_average=False``,
channels last, ``use_fast_variance`` True or False) and ``hk.BatchNorm`` trace to, over the
rows ``R`` (every axis of x but the last):

    mu  = sum_R(x) / n                               (a (C,) vector or its keepdims view)
    var = max(0, sum_R(x^2) / n - mu^2)              fast variance (max optional: Haiku)
        | sum_R((x - mu)^2) / n                      two-pass variance
    y   = (x - mu) * (rsqrt(var + eps) [* scale]) [+ bias]
    out = [relu](y [+ residual])

x may be a float32 upcast of bfloat16 data (the op then reads the bfloat16 source). The
match becomes one `nn.batch_norm` call. Its batch mean and variance replace ``mu`` and
``var`` for every other reader of them (the module's running-average update), so those
eqns stay as they were; the ones among them that precede the call are deferred until after
it (evaluation order is free under jit). Every other intermediate must be read only inside
the pattern, or the stock eqns stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from . import _rules

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_VIEWS = ("reshape", "broadcast_in_dim")


@dataclass
class BatchNormMatch:
    x: object               # the op's input (the bfloat16 source of an upcast x)
    scale: object | None    # vars whose only non-unit dim is the channels
    bias: object | None
    residual: object | None
    epsilon: float
    activation: str | None
    mean: object            # the statistics vars the call also produces
    var: object
    out: object             # the var the call produces
    out_dtype: np.dtype
    end: int                # index of the eqn producing `out`
    pattern: set            # indices of the eqns the call replaces
    deferred: list          # indices of other readers of mean/var before `end`, in order
    elements: int

    @property
    def fused(self):
        return (("residual",) if self.residual is not None else ()) + \
               ((self.activation,) if self.activation else ())


@dataclass
class Refused:
    """A batch norm that stays in XLA, and why."""

    x: object
    reason: str


def _literal(v):
    return isinstance(v, core.Literal)


def _scalar_value(v):
    """The value of a scalar literal, else None."""
    if _literal(v) and np.ndim(v.val) == 0:
        return float(v.val)
    return None


def _source(v, producers):
    """v, or the bfloat16 array a float32 v was upcast from."""
    eqn = producers.get(v)
    if eqn is not None and eqn.primitive.name == "convert_element_type" and not _literal(eqn.invars[0]) \
            and np.dtype(eqn.invars[0].aval.dtype) == _BF16 and np.dtype(v.aval.dtype) == _F32:
        return eqn.invars[0]
    return v


def _is_square_of(eqn, v):
    name = eqn.primitive.name
    if name == "square" or (name == "integer_pow" and eqn.params.get("y") == 2):
        return eqn.invars[0] is v
    return name == "mul" and eqn.invars[0] is v and eqn.invars[1] is v


def match(jaxpr, i, readers, producers, claimed, activation_of, min_elements):
    """The BatchNormMatch whose sum over the rows is eqn i, a Refused when eqn i starts a
    batch norm that cannot be served, or None when it starts none."""
    eqn = jaxpr.eqns[i]
    x = eqn.invars[0]
    if _literal(x) or x.aval.ndim < 2 or tuple(eqn.params["axes"]) != tuple(range(x.aval.ndim - 1)):
        return None
    if not jnp.issubdtype(x.aval.dtype, jnp.floating):
        return None
    shape, c = x.aval.shape, x.aval.shape[-1]
    n = math.prod(shape[:-1])
    keep = (1,) * (len(shape) - 1) + (c,)
    pattern = {i}

    def reads(v):
        return readers.get(v, [])

    def views(v):
        """v and the (C,) / keepdims reshapes of it, with their eqn indices."""
        found = [(v, None)]
        for j, e in reads(v):
            if e.primitive.name in _VIEWS and e.outvars[0].aval.shape in (keep, (c,)):
                found.append((e.outvars[0], j))
        return found

    def mean_of(total):
        """The mean n readers after a sum over the rows: sum / n, through a keepdims view."""
        for v, j in views(total):
            for k, e in reads(v):
                if e.primitive.name == "div" and e.invars[0] is v and _scalar_value(e.invars[1]) == n:
                    pattern.update(idx for idx in (j, k) if idx is not None)
                    return e.outvars[0]
        return None

    def row_sum(v):
        """The eqn summing v over the rows, if one does."""
        return next(((j, e) for j, e in reads(v) if e.primitive.name == "reduce_sum"
                     and tuple(e.params["axes"]) == tuple(range(len(shape) - 1))), (None, None))

    mu = mean_of(eqn.outvars[0])
    if mu is None:
        return None
    mu_views = views(mu)
    # x - mu; a module computing in bfloat16 upcasts x once for the statistics and again here.
    source = _source(x, producers)
    subs = [(j, e) for w, _ in mu_views for j, e in reads(w) if e.primitive.name == "sub"
            and e.invars[1] is w and not _literal(e.invars[0]) and _source(e.invars[0], producers) is source]
    var, centred = _fast_variance(x, mu, reads, row_sum, mean_of, pattern)
    if var is None:  # the two-pass form: one of the subs feeds sum((x - mu)^2)
        for j, e in subs:
            sq = [(k, r) for k, r in reads(e.outvars[0]) if _is_square_of(r, e.outvars[0])]
            k2, total = row_sum(sq[0][1].outvars[0]) if sq else (None, None)
            if total is not None:
                view = [idx for w, idx in mu_views if w is e.invars[1] and idx is not None]
                pattern.update((j, sq[0][0], k2, *view))
                var = mean_of(total.outvars[0])
                centred = j
                break
    if var is None:
        return None
    norm = [(j, e) for j, e in subs if j != centred]
    if not norm:
        return None
    d_index, d_eqn = norm[0]
    pattern.add(d_index)
    pattern.update(idx for w, idx in mu_views if w is d_eqn.invars[1] and idx is not None)
    d = d_eqn.outvars[0]

    # rsqrt(var + eps) [* scale], then d * that.
    inv = epsilon = None
    for w, j in views(var):
        for k, e in reads(w):
            if e.primitive.name != "add":
                continue
            eps = _scalar_value(e.invars[1] if e.invars[0] is w else e.invars[0])
            if eps is not None:
                r = [(m, q) for m, q in reads(e.outvars[0]) if q.primitive.name == "rsqrt"]
                if r:
                    epsilon, inv = eps, r[0][1].outvars[0]
                    pattern.update(idx for idx in (j, k, r[0][0]) if idx is not None)
                    break
        if inv is not None:
            break
    if inv is None or epsilon < 0:
        return None

    def mul_of(v, operand):
        """(eqn index, eqn, the other operand) of a product of a view of v, or None."""
        for w, j in views(v):
            for k, e in reads(w):
                if e.primitive.name == "mul" and w in e.invars:
                    other = e.invars[1] if e.invars[0] is w else e.invars[0]
                    if operand(other):
                        pattern.update(idx for idx in (j, k) if idx is not None)
                        return k, e, other
        return None

    scale = None
    found = mul_of(inv, lambda other: other is not d and _channel_vector(other, c, producers) is not None)
    if found is not None:
        scale, inv = _channel_vector(found[2], c, producers), found[1].outvars[0]
    found = mul_of(inv, lambda other: other is d)
    if found is None:
        return None
    end, y = found[0], found[1].outvars[0]

    # The tail: [+ bias] [to bfloat16] [+ residual] [relu], each the only reader of the last.
    outputs = set(v for v in jaxpr.outvars if not _literal(v))

    def only_use(v):
        uses = reads(v)
        if len(uses) == 1 and v not in outputs and uses[0][0] not in claimed:
            return uses[0]
        return None, None

    bias = residual = activation = None
    k, e = only_use(y)
    if e is not None and e.primitive.name == "add":
        other = e.invars[1] if e.invars[0] is y else e.invars[0]
        bias = _channel_vector(other, c, producers)
        if bias is not None:
            pattern.add(k)
            end, y = k, e.outvars[0]
    k, e = only_use(y)
    if e is not None and e.primitive.name == "convert_element_type" and np.dtype(e.params["new_dtype"]) == _BF16:
        pattern.add(k)
        end, y = k, e.outvars[0]
    k, e = only_use(y)
    if e is not None and e.primitive.name == "add":
        other = e.invars[1] if e.invars[0] is y else e.invars[0]
        if not _literal(other) and other.aval.shape == shape and other.aval.dtype == y.aval.dtype:
            residual = other
            pattern.add(k)
            end, y = k, e.outvars[0]
    k, e = only_use(y)
    if e is not None and activation_of(e, y) == "relu" and e.outvars[0].aval.dtype == y.aval.dtype:
        activation = "relu"
        pattern.add(k)
        end, y = k, e.outvars[0]

    m = BatchNormMatch(source, scale, bias, residual, epsilon, activation, mu, var, y,
                       np.dtype(y.aval.dtype), end, pattern, [], n * c)
    reason = _refusal(jaxpr, m, readers, outputs, claimed, min_elements)
    return Refused(source, reason) if reason else m


def _fast_variance(x, mu, reads, row_sum, mean_of, pattern):
    """(var, None) for max(0, mean(x^2) - mu^2) (the max optional), else (None, None)."""
    for j, e in reads(x):
        if not _is_square_of(e, x):
            continue
        k, total = row_sum(e.outvars[0])
        if total is None:
            continue
        found = set(pattern)
        m2 = mean_of(total.outvars[0])
        if m2 is None:
            continue
        for a, sq in reads(mu):
            if not _is_square_of(sq, mu):
                continue
            for b, sub in reads(sq.outvars[0]):
                if sub.primitive.name == "sub" and sub.invars[0] is m2 and sub.invars[1] is sq.outvars[0]:
                    pattern.update((j, k, a, b))
                    var = sub.outvars[0]
                    clamp = [(q, r) for q, r in reads(var) if r.primitive.name == "max"
                             and 0.0 in (_scalar_value(r.invars[0]), _scalar_value(r.invars[1]))]
                    if clamp:
                        pattern.add(clamp[0][0])
                        var = clamp[0][1].outvars[0]
                    return var, None
        pattern.intersection_update(found)
    return None, None


def _channel_vector(v, c, producers):
    """The (C,) parameter behind a per-channel operand (through reshapes, broadcasts and
    upcasts to float32), or None."""
    if _literal(v):
        return None
    while (eqn := producers.get(v)) is not None and not _literal(eqn.invars[0]) and (
            eqn.primitive.name in _VIEWS or _source(v, producers) is not v):
        v = eqn.invars[0]
    s = v.aval.shape
    if len(s) == 0 or s[-1] != c or any(size != 1 for size in s[:-1]):
        return None
    return v if jnp.issubdtype(v.aval.dtype, jnp.floating) else None


def _refusal(jaxpr, m, readers, outputs, claimed, min_elements):
    """Why match m cannot be served ("" when it can); fills m.deferred."""
    kept = {m.mean, m.var, m.out}
    for j in sorted(m.pattern):
        if j in claimed:
            return "overlaps another rewrite"
        for v in jaxpr.eqns[j].outvars:
            if v in kept:
                continue
            if v in outputs or any(k not in m.pattern for k, _ in readers.get(v, [])):
                return "an intermediate of the statistics is read elsewhere"
    for name, v in (("x", m.x), ("scale", m.scale), ("bias", m.bias), ("residual", m.residual)):
        if v is not None and np.dtype(v.aval.dtype) not in _rules.KERNEL_DTYPES:
            return f"{name} is {np.dtype(v.aval.dtype)}"
    if m.out_dtype not in _rules.KERNEL_DTYPES:
        return f"{m.out_dtype} result"
    # Readers of the statistics before the call move after it, with what depends on them.
    tainted, deferred = {m.mean, m.var}, []
    for j in range(min(m.pattern), m.end):
        eqn = jaxpr.eqns[j]
        if j not in m.pattern and any(not _literal(v) and v in tainted for v in eqn.invars):
            if j in claimed:
                return "the statistics feed another rewrite"
            deferred.append(j)
            tainted.update(eqn.outvars)
    if any(v is not None and v in tainted for v in (m.x, m.scale, m.bias, m.residual)):
        return "an operand depends on the statistics"
    if m.elements < min_elements:
        return f"too small: {_rules._count(m.elements)} elements (min_macs={_rules._count(min_elements)})"
    m.deferred = deferred
    return ""


def run(m: BatchNormMatch, read):
    """{var: value} for the output and the statistics of match m, from one nn.batch_norm."""
    from .nn import batch_norm

    x = read(m.x)
    c = x.shape[-1]
    vector = lambda v: None if v is None else read(v).reshape(c)  # noqa: E731
    # The op sums x less a shift; one row of the batch keeps E[d^2] - E[d]^2 from cancelling.
    # momentum 0 makes the "updated running averages" the batch's own mean and variance.
    shift = jax.lax.stop_gradient(x.reshape(-1, c)[0].astype(_F32))
    y, mean, var = batch_norm(x, vector(m.scale), vector(m.bias), shift, jnp.zeros((c,), _F32),
                              use_running_average=False, momentum=0.0, epsilon=m.epsilon,
                              activation=m.activation,
                              residual=None if m.residual is None else read(m.residual),
                              out_dtype=m.out_dtype)
    stat = lambda value, v: value.reshape(v.aval.shape).astype(v.aval.dtype)  # noqa: E731
    return {m.out: y, m.mean: stat(mean, m.mean), m.var: stat(var, m.var)}
