"""Every order of derivative, forward and reverse, for the ops that are bilinear in (data,
weights): dense, conv2d and brgemm, through two JAX primitives made of the op's own kernel
passes.

Such an op is ``y = act(F(x, w) + bias)`` with three kernel passes: the forward F, and its
two adjoints, backward-data ``Bx(g, w)`` (of ``x -> F(x, w)``) and weight-update
``Bw(x, g)`` (of ``w -> F(x, w)``). The op's tangent map and its backward are

    tangent    T(x, w; dx, dw, db) = F(dx, w) + F(x, dw) + db        (float32)
    cotangent  C(x, w; g)          = (Bx(g, w), Bw(x, g), sum g)     (the inputs' dtypes)

and every derivative and transpose of either is again T or C, with other arguments:

    jvp T:   T(x, w; ex', ew', eb') + T(dx, dw; ex, ew)    (primes: the tangents' tangents)
    jvp C:   C(x, w; eg) + C(ex, ew; g)                    (without the sum)
    T^T:     in (dx, dw, db): C(x, w; ct);   in (x, w): C(dx, dw; ct)
    C^T:     in g: T(x, w; cdx, cdw, cdb);   in (x, w): C(cdx, cdw; g)

(``<Bw(x, g), c> = <F(x, c), g> = <x, Bx(g, c)>`` and its mirror give the last lines.)
So an op is a ``jax.custom_jvp`` whose tangent is ``act'(.) * T``: ``jax.jvp`` runs T (two
forward calls), ``jax.grad`` transposes it into one C (the op's backward passes; dense's
dx and dkernel in one call, skipped where the input is not differentiated), and Hessians,
grad of grad and Hessian-vector products run further T and C calls.

A bilinear op gives its passes as ``maps``, a hashable object (a primitive parameter) with

- ``maps.forward(x, w, bias, dtype)``: F(x, w) (+ bias, float32 or None) in `dtype`;
- ``maps.backward(x, w, g, want_dx, want_dw, want_db, b_dtype)``: (Bx(g, w) in x's dtype,
  Bw(x, g) in w's, the bias gradient in b_dtype), None where not wanted; g is float32 (or
  the dtype of whatever C transposes).

both on one problem. Under vmap the primitives take `lead` leading dims that broadcast like
NumPy's (size 1: shared, e.g. unbatched weights) and run the maps under jax.vmap, so the
kernel calls' own batching rules apply (shared weights fold into the minibatch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax._src import dispatch as _dispatch
from jax.interpreters import ad, batching, mlir

from . import _activations

_F32 = jnp.float32


# ------------------------------------------------------------------ the public side


def tangent(maps, x, w, dx, dw, db, lead=0, dtype=_F32):
    """T(x, w; dx, dw, db) in `dtype` (float32 unless it transposes C in a bfloat16 g);
    None tangents are zero (None if all are)."""
    present = (dx is not None, dw is not None, db is not None)
    if not any(present):
        return None
    return tangent_p.bind(x, w, *(t for t in (dx, dw, db) if t is not None), maps=maps,
                          present=present, lead=lead, dtype=jnp.dtype(dtype))


def cotangent(maps, x, w, g, wants, b_dtype, lead=0):
    """C(x, w; g): (dx, dw, db), None where not in `wants`."""
    if not any(wants):
        return (None,) * 3
    outs = iter(cotangent_p.bind(x, w, g, maps=maps, wants=tuple(wants), b_dtype=jnp.dtype(b_dtype),
                                 lead=lead))
    return tuple(next(outs) if want else None for want in wants)


def op_jvp(op, maps, act, out_dtype, x, w, bias, dx, dw, dbias, extra=None):
    """The (primal, tangent) of an op ``act(F(x, w) + bias [+ more])``: `op(act, dtype)`
    is the op itself on the primals (so that it is differentiable again), `extra` a float32
    tangent of the pre-activation from terms outside F (e.g. brgemm's beta * dc)."""
    y, z = _activations.forward_with_residuals(op, act, out_dtype)
    # Without an activation (or another term) the tangent is T itself, in y's dtype: the
    # kernel rounds it once, and jax.grad's cotangent reaches C as it came.
    direct = act == "none" and extra is None
    dz = tangent(maps, x, w, dx, dw, dbias, dtype=y.dtype if direct else _F32)
    if extra is not None:
        dz = extra if dz is None else dz + extra
    if dz is None:
        return y, jnp.zeros_like(y)
    out = y.astype(_F32) if _activations.needs_output(act) else None
    return y, _activations.grad_from(act, jnp.broadcast_to(dz, y.shape), out, z).astype(y.dtype)


def given(t):
    """A custom_jvp tangent, None where it is a symbolic zero (not differentiated)."""
    return None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t


# ------------------------------------------------------------------ helpers


def _zero_tangent(out):
    return ad.Zero(jax.typeof(out).to_tangent_aval())


def _zero(t):
    return t is None or type(t) is ad.Zero


def _value(v, like):
    """v, or zeros shaped like `like` (an array or an undefined primal) where v is zero or
    undefined: a placeholder in an operand slot the call does not read."""
    if _zero(v) or ad.is_undefined_primal(v):
        aval = like.aval
        return jnp.zeros(aval.shape, aval.dtype)
    return v


def _unbroadcast(v, shape):
    """v summed down to `shape` over the leading dims where `shape` has 1 (shared)."""
    if v is None:
        return None
    axes = tuple(i for i, (s, t) in enumerate(zip(shape, v.shape)) if s == 1 and t != 1)
    return v.sum(axes, keepdims=True) if axes else v


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _over_lead(fn, lead, args):
    """fn on one problem, mapped over `lead` leading dims of args (None: absent), a size-1
    dim shared by every problem."""
    if lead == 0:
        return fn(*args)
    size = max(a.shape[0] for a in args if a is not None)
    axes = [None if a is None or (a.shape[0] == 1 and size != 1) else 0 for a in args]
    args = [a[0] if a is not None and ax is None else a for a, ax in zip(args, axes)]
    return jax.vmap(lambda *a: _over_lead(fn, lead - 1, a), in_axes=axes)(*args)


def _split(ts, present):
    ts = iter(ts)
    return tuple(next(ts) if p else None for p in present)


# ------------------------------------------------------------------ T


def _tangent_impl(x, w, *ts, maps, present, lead, dtype):
    def one(x, w, dx, dw, db):
        if dx is not None and dw is not None:  # a sum: in float32, rounded once
            out = maps.forward(dx, w, None if db is None else db.astype(_F32), _F32)
            return (out + maps.forward(x, dw, None, _F32)).astype(dtype)
        if dx is not None or dw is not None:
            u, v = (dx, w) if dx is not None else (x, dw)
            return maps.forward(u, v, None if db is None else db.astype(_F32), dtype)
        shape = jax.eval_shape(lambda x, w: maps.forward(x, w, None, _F32), x, w).shape  # the bias alone
        return jnp.broadcast_to(db.astype(dtype), shape)

    return _over_lead(one, lead, (x, w) + _split(ts, present))


def _tangent_jvp(primals, tangents, *, maps, present, lead, dtype):
    x, w, *ts = primals
    ex, ew, *ets = (None if _zero(t) else t for t in tangents)
    dx, dw, db = _split(ts, present)
    edx, edw, edb = _split(ets, present)
    out = tangent_p.bind(*primals, maps=maps, present=present, lead=lead, dtype=dtype)
    # d[F(dx, w) + F(x, dw)] = F(edx, w) + F(x, edw) + F(ex, dw) + F(dx, ew)
    t = _add(tangent(maps, x, w, edx, edw, edb, lead, dtype),
             tangent(maps, _value(dx, x), _value(dw, w), None if dw is None else ex,
                     None if dx is None else ew, None, lead, dtype))
    return out, _zero_tangent(out) if t is None else jnp.broadcast_to(t, out.shape)


def _tangent_transpose(ct, x, w, *ts, maps, present, lead, dtype):
    dx, dw, db = _split(ts, present)
    lin = ad.is_undefined_primal
    if type(ct) is ad.Zero:
        return [None] * (2 + len(ts))
    # The tangent slots: C(x, w; ct). The primal slots (linear where T itself is being
    # differentiated): x pairs with dw in F(x, dw), w with dx in F(dx, w).
    cdx, cdw, cdb = cotangent(maps, _value(x, x), _value(w, w), ct, (lin(dx), lin(dw), lin(db)),
                              db.aval.dtype if lin(db) else _F32, lead)
    cx, cw, _ = cotangent(maps, _value(dx, x), _value(dw, w), ct,
                          (lin(x) and dw is not None and not lin(dw), lin(w) and dx is not None and not lin(dx),
                           False), _F32, lead)
    shape = lambda v: v.aval.shape  # noqa: E731
    outs = [_unbroadcast(cx, shape(x)) if lin(x) else None, _unbroadcast(cw, shape(w)) if lin(w) else None]
    for t, c in zip((dx, dw, db), (cdx, cdw, cdb)):
        if t is not None:
            outs.append(_unbroadcast(c, shape(t)) if lin(t) else None)
    return [ad.Zero(v.aval) if o is None and lin(v) else o for o, v in zip(outs, (x, w) + tuple(ts))]


# ------------------------------------------------------------------ C


def _cotangent_impl(x, w, g, *, maps, wants, b_dtype, lead):
    def one(x, w, g):
        return [o for o in maps.backward(x, w, g, *wants, b_dtype) if o is not None]

    return _over_lead(one, lead, (x, w, g))


def _cotangent_jvp(primals, tangents, *, maps, wants, b_dtype, lead):
    x, w, g = primals
    ex, ew, eg = (None if _zero(t) else t for t in tangents)
    outs = cotangent_p.bind(x, w, g, maps=maps, wants=wants, b_dtype=b_dtype, lead=lead)
    # d Bx(g, w) = Bx(eg, w) + Bx(g, ew);  d Bw(x, g) = Bw(x, eg) + Bw(ex, g)
    first = (None,) * 3 if eg is None else cotangent(maps, x, w, eg, wants, b_dtype, lead)
    want_dx, want_dw, _ = wants
    second = cotangent(maps, _value(ex, x), _value(ew, w), g,
                       (want_dx and ew is not None, want_dw and ex is not None, False), b_dtype, lead)
    ts = [_add(a, b) for a, b, want in zip(first, second, wants) if want]
    return outs, [_zero_tangent(o) if t is None else jnp.broadcast_to(t, o.shape)
                  for o, t in zip(outs, ts)]


def _cotangent_transpose(cts, x, w, g, *, maps, wants, b_dtype, lead):
    lin = ad.is_undefined_primal
    cts = iter(cts)
    cdx, cdw, cdb = (None if not want else (lambda c: None if _zero(c) else c)(next(cts)) for want in wants)
    if lin(g):
        cg = tangent(maps, _value(x, x), _value(w, w), cdx, cdw, cdb, lead, g.aval.dtype)
        return [None, None, ad.Zero(g.aval) if cg is None else _unbroadcast(cg, g.aval.shape)]
    # x -> Bw(x, g) has the adjoint c -> Bx(g, c); w -> Bx(g, w) has c -> Bw(c, g).
    cx, cw, _ = cotangent(maps, _value(cdx, x), _value(cdw, w), g,
                          (lin(x) and cdw is not None, lin(w) and cdx is not None, False), b_dtype, lead)
    return [(ad.Zero(v.aval) if c is None else _unbroadcast(c, v.aval.shape)) if lin(v) else None
            for v, c in ((x, cx), (w, cw))] + [None]


# ------------------------------------------------------------------ registration


@functools.lru_cache(maxsize=None)
def _abstract(impl, avals, params):
    out = jax.eval_shape(functools.partial(impl, **dict(params)), *avals)
    return jax.tree.map(lambda s: jax.core.ShapedArray(s.shape, s.dtype), out)


def _batch(prim, args, dims, *, lead, **params):
    # A new leading problem dim: size 1 (shared) on the unbatched operands.
    args = [a[None] if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    out = prim.bind(*args, lead=lead + 1, **params)
    return out, [0] * len(out) if prim.multiple_results else 0


def _primitive(name, impl, jvp, transpose, multiple_results):
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(impl)
    prim.def_abstract_eval(lambda *avals, **params: _abstract(
        impl, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals), tuple(sorted(params.items()))))
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = functools.partial(_batch, prim)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=multiple_results))
    # The lowering holds the kernel calls' custom_partitioning, which needs the devices:
    # jit passes them only for primitives in this set (no public API for it yet).
    _dispatch.prim_requires_devices_during_lowering.add(prim)
    return prim


tangent_p = _primitive("jax_brgemm_tangent", _tangent_impl, _tangent_jvp, _tangent_transpose, False)
cotangent_p = _primitive("jax_brgemm_cotangent", _cotangent_impl, _cotangent_jvp, _cotangent_transpose, True)
