"""jax_brgemm.optimize: any JAX program's convolutions, matmuls and max pooling on the kernel.

`optimize(fun)` traces `fun` to a jaxpr for the arguments it is called with (cached by
their abstract signature, as `jax.jit` does) and evaluates that jaxpr under `jax.jit`
with every `conv_general_dilated` and `dot_general` the rules in `_rules` serve replaced
by this project's ops, which carry their own `custom_vjp`: `jax.grad(optimize(f))` runs
the backward passes on the kernel too. Everything else is bound as it was. A bias add, a
per-channel affine (an eval-mode BatchNorm) and an activation that follow a served op are
fused into its call when nothing else reads the intermediates. Softmax attention
(`_attention_pattern`) and training-mode batch norm with its residual add and relu
(`_batch_norm_pattern`) become one op call each.

Nested jaxprs are rewritten where they hold something served: `jit` bodies are inlined,
`custom_jvp` / `custom_vjp` functions keep their derivative rules, and `checkpoint`,
`scan`, `while` and `cond` are rebuilt through their public APIs.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from . import _attention_pattern, _batch_norm_pattern, _rules

_OPTIONS = {
    "min_macs": "ops with fewer multiply-adds stay in XLA (default: %s)" % ", ".join(
        f"{op} {n}" for op, n in _rules.DEFAULT_MIN_MACS.items()),
    "conv": "serve convolutions (default True)",
    "matmul": "serve dot_general (default True)",
    "fuse": "fuse bias, per-channel affine and activation into the served op (default True)",
    "attention": "serve softmax attention (dot_general, softmax, dot_general) as one op (default True)",
    "pool": "serve 2-D max pooling (reduce_window_max) (default True)",
    "batch_norm": "serve training-mode batch norm (statistics, normalisation, residual add, relu) as one op "
                  "(default True)",
}


@dataclass(frozen=True)
class Options:
    min_macs: int | None = None  # None: each op family's measured default
    conv: bool = True
    matmul: bool = True
    fuse: bool = True
    attention: bool = True
    pool: bool = True
    batch_norm: bool = True

    @staticmethod
    def parse(options: dict) -> "Options":
        for name, value in options.items():
            if name not in _OPTIONS:
                known = ", ".join(sorted(_OPTIONS))
                raise ValueError(f"optimize: unknown option {name!r}; the options are {known}")
            if name == "min_macs":
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise ValueError(f"optimize: option min_macs must be an int >= 0, got {value!r}")
            elif not isinstance(value, bool):
                raise ValueError(f"optimize: option {name} must be True or False, got {value!r}")
        return Options(**options)


# ------------------------------------------------------------------ what each op becomes


@dataclass
class Decision:
    """One convolution, matmul, attention or training-mode batch norm of the program and
    what became of it."""

    primitive: str          # "conv_general_dilated", "dot_general", "reduce_window_max", "attention", "batch_norm"
    where: str              # the path of nested jaxprs ("" at the top)
    lhs: tuple
    rhs: tuple
    dtype: str
    op: str | None          # the op that serves it, or None when it stays in XLA
    fused: tuple = ()       # the epilogue fused into the call ("bias", "scale", "relu", ...)
    reason: str = ""        # why it stays in XLA
    macs: int = 0           # a batch norm's: its elements (one multiply-add each in the apply)

    @property
    def served(self) -> bool:
        return self.op is not None


@dataclass
class Explanation:
    """Every convolution and matmul of a program: printed as a table, or read as data."""

    decisions: list = field(default_factory=list)
    trace_seconds: float = 0.0

    @property
    def served(self):
        return [d for d in self.decisions if d.served]

    @property
    def kept(self):
        return [d for d in self.decisions if not d.served]

    def __str__(self):
        rows = [("where", "op", "lhs", "rhs", "dtype", "MACs", "served by / why not")]
        for d in self.decisions:
            what = d.op + "".join(f" + {f}" for f in d.fused) if d.served else f"XLA: {d.reason}"
            rows.append((d.where or "-", d.primitive, "x".join(map(str, d.lhs)),
                         "x".join(map(str, d.rhs)), d.dtype, _rules._count(d.macs), what))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.served)} of {len(self.decisions)} served by jax_brgemm")
        return "\n".join(lines)

    __repr__ = __str__


# ------------------------------------------------------------------ planning one jaxpr

_AFFINE = {"add", "sub", "mul"}
_ACTIVATIONS = {"tanh": "tanh", "logistic": "sigmoid"}


@dataclass
class Fused:
    """A served op and the epilogue eqns folded into its call; run at the last of them."""

    plan: Any
    op_eqn: Any
    affine: list            # [(kind, operand var or literal)] in order
    activation: str | None
    end: int                # index of the eqn whose output the call produces
    skipped: tuple          # indices of the epilogue eqns (not bound)
    decision: Decision


def _aval(v):
    return v.aval


def _is_literal(v):
    return isinstance(v, core.Literal)


def _uses(jaxpr):
    counts: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not _is_literal(v):
                counts[v] = counts.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not _is_literal(v):
            counts[v] = counts.get(v, 0) + 2  # an output is never fused away
    return counts


def _rule(eqn, options):
    lhs, rhs = (_aval(v) for v in eqn.invars[:2])
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        if not options.conv:
            return _rules.Refusal("conv=False")
        return _rules.conv_rule(lhs.shape, lhs.dtype, rhs.shape, rhs.dtype,
                                min_macs=_min_macs(options, "conv"), **eqn.params)
    if not options.matmul:
        return _rules.Refusal("matmul=False")
    return _rules.dot_rule(lhs.shape, lhs.dtype, rhs.shape, rhs.dtype,
                           min_macs=_min_macs(options, "dot"), **eqn.params)


def _min_macs(options, op):
    return _rules.DEFAULT_MIN_MACS[op] if options.min_macs is None else options.min_macs


def _channel_operand(v, out_aval, channel_axis, producers):
    """The per-channel vector a binary epilogue op adds or multiplies, as ("var", var) or
    ("scalar", value), or None when it varies along other axes."""
    if _is_literal(v):
        return ("scalar", v.val) if np.ndim(v.val) == 0 else None
    channels = out_aval.shape[channel_axis]

    def per_channel(dims, shape):
        return all(size == 1 or (d == channel_axis and size == channels) for d, size in zip(dims, shape))

    shape = _aval(v).shape
    if len(shape) == 0 or (len(shape) == len(out_aval.shape) and per_channel(range(len(shape)), shape)):
        return ("var", v)
    eqn = producers.get(v)
    if eqn is not None and eqn.primitive.name == "broadcast_in_dim":
        src = eqn.invars[0]
        if not _is_literal(src) and per_channel(eqn.params["broadcast_dimensions"], _aval(src).shape):
            return ("var", src)
    return None


def _activation_of(eqn, v):
    """The activation name when `eqn` applies one to `v` alone, else None."""
    name = eqn.primitive.name
    if name in _ACTIVATIONS and eqn.invars[0] is v:
        return _ACTIVATIONS[name]
    if name == "max":
        a, b = eqn.invars
        other = b if a is v else a if b is v else None
        if other is not None and _is_literal(other) and np.ndim(other.val) == 0 and other.val == 0:
            return "relu"
    if name == "custom_jvp_call" and eqn.invars == [v] and _is_relu(_open(eqn.params["call_jaxpr"])):
        return "relu"  # jax.nn.relu: max(x, 0) with the derivative 0 at 0, as the kernel's
    return None


def _is_relu(jaxpr):
    """Whether a one-input jaxpr computes max(x, 0) (through nested jit wrappers)."""
    while len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name in ("pjit", "jit"):
        jaxpr = _open(jaxpr.eqns[0].params["jaxpr"])
    if len(jaxpr.invars) != 1 or len(jaxpr.eqns) != 1:
        return False
    (eqn,) = jaxpr.eqns
    return _activation_of(eqn, jaxpr.invars[0]) == "relu" and jaxpr.outvars == eqn.outvars


def _plan_epilogue(jaxpr, i, plan, uses, consumers, producers, options):
    """The affine ops and activation after eqn i that can be fused into its call."""
    out = jaxpr.eqns[i].outvars[0]
    out_aval = _aval(out)
    affine, activation, skipped, end, v = [], None, [], i, out
    axis = plan.channel_axis
    while options.fuse and axis is not None and uses.get(v, 0) == 1 and v in consumers:
        j, eqn = consumers[v]
        name = eqn.primitive.name
        if activation is None and (act := _activation_of(eqn, v)) is not None:
            if _aval(eqn.outvars[0]).dtype != out_aval.dtype:
                break
            activation, skipped, end, v = act, skipped + [j], j, eqn.outvars[0]
            break
        if name not in _AFFINE or _aval(eqn.outvars[0]).shape != out_aval.shape \
                or _aval(eqn.outvars[0]).dtype != out_aval.dtype:
            break
        a, b = eqn.invars
        if name == "sub" and a is not v:
            break
        other = b if a is v else a
        operand = _channel_operand(other, out_aval, axis, producers)
        if operand is None:
            break
        affine.append((name, operand))
        skipped, end, v = skipped + [j], j, eqn.outvars[0]
    return affine, activation, tuple(skipped), end


def plan_jaxpr(jaxpr, options, where=""):
    """{eqn index: Fused | AttentionMatch | BatchNormMatch} for the served ops of one jaxpr
    (each run at that index), the indices not to bind there (replaced, or deferred until a
    BatchNormMatch's call), and the Decisions (nested jaxprs included)."""
    uses = _uses(jaxpr)
    producers, consumers, readers = {}, {}, {}
    for j, eqn in enumerate(jaxpr.eqns):
        for v in eqn.outvars:
            producers[v] = eqn
        for v in eqn.invars:
            if not _is_literal(v):
                readers.setdefault(v, []).append((j, eqn))
                if uses.get(v) == 1:
                    consumers[v] = (j, eqn)
    served, skip, decisions = {}, set(), []
    deferred = set()  # eqns a batch norm's call moves after itself
    for i, eqn in enumerate(jaxpr.eqns):
        if i in skip:
            continue
        name = eqn.primitive.name
        if name == "reduce_sum":
            found = _batch_norm_pattern.match(jaxpr, i, readers, producers, skip | deferred | set(served),
                                              _activation_of, _min_macs(options, "batch_norm"))
            if found is not None:
                x = _aval(found.x)
                decision = Decision("batch_norm", where, tuple(x.shape), (x.shape[-1],), str(x.dtype), None,
                                    macs=int(np.prod(x.shape)))
                decisions.append(decision)
                if isinstance(found, _batch_norm_pattern.Refused) or not options.batch_norm:
                    decision.reason = "batch_norm=False" if options.batch_norm is False else found.reason
                    continue
                decision.op, decision.fused = "nn.batch_norm", found.fused
                served[found.end] = found
                skip.update(found.pattern)
                deferred.update(found.deferred)
                continue
        if name == "dot_general" and options.attention and options.matmul:
            found = _attention_pattern.match(jaxpr, i, readers, producers, _min_macs(options, "attention"))
            if found is not None:
                q, k = (_aval(v) for v in eqn.invars[:2])
                decision = Decision("attention", where, tuple(q.shape), tuple(k.shape), str(q.dtype),
                                    "nn.dot_product_attention", ("softmax",), macs=found.macs)
                decisions.append(decision)
                served[found.pv_index] = found
                skip.update(found.pattern)
                continue
        if name == "reduce_window_max":
            x = _aval(eqn.invars[0])
            plan = (_rules.pool_rule(x.shape, x.dtype, min_macs=_min_macs(options, "pool"), **eqn.params)
                    if options.pool else _rules.Refusal("pool=False"))
            decision = Decision(name, where, tuple(x.shape), tuple(eqn.params["window_dimensions"]),
                                str(x.dtype), None, macs=getattr(plan, "macs", 0))
            decisions.append(decision)
            if isinstance(plan, _rules.Refusal):
                decision.reason = plan.reason
            else:
                decision.op = plan.op
                served[i] = Fused(plan, eqn, [], None, i, (), decision)
            continue
        if name in ("conv_general_dilated", "dot_general"):
            lhs, rhs = (_aval(v) for v in eqn.invars[:2])
            plan = _rule(eqn, options)
            decision = Decision(name, where, tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), None)
            decisions.append(decision)
            if isinstance(plan, _rules.Refusal):
                decision.reason = plan.reason
                decision.macs = _macs(eqn)
                continue
            affine, activation, skipped, end = _plan_epilogue(jaxpr, i, plan, uses, consumers,
                                                              producers, options)
            decision.op, decision.macs = plan.op, plan.macs
            decision.fused = _fused_names(affine, activation)
            served[end] = Fused(plan, eqn, affine, activation, end, skipped, decision)
            skip.add(i)
            skip.update(s for s in skipped if s != end)
        else:
            for sub_where, sub in _subjaxprs(eqn, where):
                decisions.extend(plan_jaxpr(sub, options, sub_where)[2])
    return served, skip, decisions


def _macs(eqn):
    lhs, rhs, out = _aval(eqn.invars[0]), _aval(eqn.invars[1]), _aval(eqn.outvars[0])
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        return int(np.prod(out.shape)) * int(np.prod([lhs.shape[d] for d in lc]))
    dn = eqn.params["dimension_numbers"]
    taps_in = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[1:]]))
    return int(np.prod(out.shape)) * taps_in


def _fused_names(affine, activation):
    names = []
    for kind, _ in affine:
        name = "scale" if kind == "mul" else "bias"
        if not names or names[-1] != name:
            names.append(name)
    return tuple(names) + ((activation,) if activation else ())


def _subjaxprs(eqn, where):
    """(path, open jaxpr) of the jaxprs nested in eqn that `_bind` rewrites."""
    name = eqn.primitive.name
    prefix = f"{where}/{name}" if where else name
    for key in _SUBJAXPR_PARAMS.get(name, ()):
        value = eqn.params[key]
        for k, sub in enumerate(value if isinstance(value, (tuple, list)) else (value,)):
            yield (f"{prefix}[{k}]" if isinstance(value, (tuple, list)) else prefix), _open(sub)


_SUBJAXPR_PARAMS = {
    "pjit": ("jaxpr",), "jit": ("jaxpr",), "closed_call": ("call_jaxpr",),
    "custom_jvp_call": ("call_jaxpr",), "custom_vjp_call": ("call_jaxpr",),
    "remat2": ("jaxpr",), "checkpoint": ("jaxpr",), "scan": ("jaxpr",),
    "while": ("cond_jaxpr", "body_jaxpr"), "cond": ("branches",),
}


def _open(j):
    return j.jaxpr if isinstance(j, core.ClosedJaxpr) else j


def _closed(j):
    return j if isinstance(j, core.ClosedJaxpr) else core.ClosedJaxpr(j, ())


# ------------------------------------------------------------------ evaluation


def _has_served(jaxpr, options):
    return any(d.served for d in plan_jaxpr(jaxpr, options)[2])


def eval_jaxpr(jaxpr, consts, args, options):
    """Evaluates an open jaxpr with the served ops replaced."""
    served, skip, _ = plan_jaxpr(jaxpr, options)
    env = {}

    def read(v):
        return v.val if _is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x

    def step(i):
        eqn = jaxpr.eqns[i]
        if i in served:
            fused = served[i]
            if isinstance(fused, _batch_norm_pattern.BatchNormMatch):
                env.update(_batch_norm_pattern.run(fused, read))
                for j in fused.deferred:  # the readers of its statistics, now computed
                    step(j)
                return
            if isinstance(fused, _attention_pattern.AttentionMatch):
                outs = [_attention_pattern.run(fused, read)]
            else:
                outs = [_run_fused(fused, read)]
        elif i in skip:
            return
        else:
            outs = _bind(eqn, [read(v) for v in eqn.invars], options)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, core.DropVar):
                env[v] = x

    deferred = {j for m in served.values() if isinstance(m, _batch_norm_pattern.BatchNormMatch)
                for j in m.deferred}
    for i in range(len(jaxpr.eqns)):
        if i not in deferred:
            step(i)
    return [read(v) for v in jaxpr.outvars]


def _run_fused(fused: Fused, read):
    eqn, plan = fused.op_eqn, fused.plan
    if isinstance(plan, _rules.PoolPlan):
        return _rules.run_pool(plan, read(eqn.invars[0]))
    lhs, rhs = (read(v) for v in eqn.invars[:2])
    out_aval = _aval(eqn.outvars[0])
    channels = out_aval.shape[plan.channel_axis] if plan.channel_axis is not None else None
    scale = shift = None
    for kind, operand in fused.affine:
        value = operand[1] if operand[0] == "scalar" else read(operand[1])
        vec = jnp.broadcast_to(jnp.asarray(value, jnp.float32).reshape(-1), (channels,))
        if kind == "mul":
            scale = vec if scale is None else scale * vec
            shift = None if shift is None else shift * vec
        else:
            vec = -vec if kind == "sub" else vec
            shift = vec if shift is None else shift + vec
    run = _rules.run_conv if eqn.primitive.name == "conv_general_dilated" else _rules.run_dot
    return run(plan, lhs, rhs, scale=scale, bias=shift, activation=fused.activation)


def _bind_as_is(primitive, invals, params):
    return primitive.bind(*invals, **primitive.get_bind_params(params))


def _bind(eqn, invals, options):
    """Binds eqn, with its nested jaxprs rewritten where they hold something served."""
    name, params = eqn.primitive.name, eqn.params
    nested = [sub for _, sub in _subjaxprs(eqn, "")]
    if not nested or not any(_has_served(sub, options) for sub in nested):
        return _bind_as_is(eqn.primitive, invals, params)
    run = functools.partial(_eval_closed, options=options)
    if name in ("pjit", "jit", "closed_call"):
        inner = _closed(params["jaxpr" if "jaxpr" in params else "call_jaxpr"])
        return run(inner, invals)
    if name in ("custom_jvp_call", "custom_vjp_call"):
        inner = _closed(params["call_jaxpr"])
        new = jax.make_jaxpr(lambda *a: run(inner, a))(*invals)
        return _bind_as_is(eqn.primitive, invals, {**params, "call_jaxpr": new})
    if name in ("remat2", "checkpoint"):
        inner = _closed(params["jaxpr"])
        return jax.checkpoint(lambda *a: run(inner, a), prevent_cse=params["prevent_cse"],
                              policy=params["policy"])(*invals)
    if name == "scan":
        inner, nc, ncarry = params["jaxpr"], params["num_consts"], params["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

        def body(carry, x):
            out = run(inner, [*consts, *carry, *x])
            return out[:ncarry], out[ncarry:]

        carry, ys = jax.lax.scan(body, list(carry), list(xs), length=params["length"],
                                 reverse=params["reverse"], unroll=params["unroll"])
        return [*carry, *ys]
    if name == "while":
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        cond_j, body_j = params["cond_jaxpr"], params["body_jaxpr"]
        return jax.lax.while_loop(lambda c: run(cond_j, [*cconsts, *c])[0],
                                  lambda c: run(body_j, [*bconsts, *c]), list(init))
    if name == "cond":
        index, ops = invals[0], invals[1:]
        branches = [functools.partial(lambda b, *a: run(b, a), b) for b in params["branches"]]
        return jax.lax.switch(index, branches, *ops)
    return _bind_as_is(eqn.primitive, invals, params)


def _eval_closed(closed, args, options):
    closed = _closed(closed)
    return eval_jaxpr(closed.jaxpr, closed.consts, list(args), options)


def inline_jits(closed):
    """The same program with every nested jit inlined (recursively), so patterns that cross a
    jit boundary, such as jnp.where's inside attention's masking, are seen whole."""
    if not any(e.primitive.name in ("pjit", "jit") for e in closed.jaxpr.eqns):
        return closed

    def run(jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda v: v.val if _is_literal(v) else env[v]  # noqa: E731
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if eqn.primitive.name in ("pjit", "jit"):
                inner = _closed(eqn.params["jaxpr"])
                outs = run(inner.jaxpr, inner.consts, invals)
            else:
                outs = _bind_as_is(eqn.primitive, invals, eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, core.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    avals = [v.aval for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: run(closed.jaxpr, closed.consts, a))(*avals)


def rewrite_call(fun, arrays, options):
    """``fun(*arrays)`` evaluated once through the rewrite, with no cache and no jit: for
    callers that close over traced values (flax_layers' modules) and run inside the caller's
    own trace."""
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*arrays)
    closed = inline_jits(closed)
    flat = eval_jaxpr(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(arrays), options)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat)


# ------------------------------------------------------------------ the transform


def _is_array(x):
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _variable_types():
    try:
        from flax import nnx
    except ImportError:
        return ()
    return (nnx.Variable,)


try:
    from flax.errors import TraceContextError
except ImportError:  # flax is optional
    class TraceContextError(Exception):
        pass


class Optimized:
    """`fun` with its convolutions and matmuls on the kernel (see `optimize`).

    Calls go through one `jax.jit` whose static argument is the arguments' structure and
    non-array leaves, so a cached call costs what a jitted call does, plus splitting the
    arguments' leaves; the trace rewrites fun's jaxpr once per signature."""

    def __init__(self, fun: Callable, options: Options):
        self.fun, self.options = fun, options
        self._run = jax.jit(self._rewritten, static_argnums=0)
        functools.update_wrapper(self, fun)

    @staticmethod
    def _split(args, kwargs):
        """(static key: structure, non-array leaves and where the arrays go; the arrays)."""
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = tuple(i for i, x in enumerate(leaves) if _is_array(x))
        static = tuple((i, _hashable(x)) for i, x in enumerate(leaves) if not _is_array(x))
        return (treedef, static, dynamic), [leaves[i] for i in dynamic]

    def _trace(self, key, dyn):
        """fun's jaxpr over the array leaves (nested jits inlined) and its output structure.
        fun's outputs come with the values it assigned to argument leaves (NNX state), by
        leaf index."""
        treedef, static, dynamic = key

        def flat_fun(*dyn):
            full = [None] * (len(static) + len(dynamic))
            for i, x in static:
                full[i] = x.value if isinstance(x, _ById) else x
            for i, x in zip(dynamic, dyn):
                full[i] = x
            args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
            out = self.fun(*args, **kwargs)
            after, after_def = jax.tree_util.tree_flatten((args, kwargs))
            writes = {}
            if after_def == treedef:
                writes = {i: after[i] for i in dynamic if after[i] is not full[i]}
            return out, writes

        closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*dyn)
        return inline_jits(closed), jax.tree_util.tree_structure(out_shape)

    def _rewritten(self, key, *dyn):
        closed, out_tree = self._trace(key, dyn)
        flat = eval_jaxpr(closed.jaxpr, closed.consts, list(dyn), self.options)
        return jax.tree_util.tree_unflatten(out_tree, flat)

    def __call__(self, *args, **kwargs):
        key, dyn = self._split(args, kwargs)
        out, writes = self._run(key, *dyn)
        if writes:
            _write_back((args, kwargs), writes)
        return out

    def explain(self, *args, **kwargs) -> Explanation:
        """The table of this function's convolutions and matmuls for these arguments: what
        serves each, or why it stays in XLA (`.decisions` has them as data; trace_seconds is
        the time to trace and plan, which a first call also pays)."""
        start = time.perf_counter()
        key, dyn = self._split(args, kwargs)
        closed, _ = self._trace(key, dyn)
        decisions = plan_jaxpr(closed.jaxpr, self.options)[2]
        return Explanation(decisions, time.perf_counter() - start)

    def __get__(self, obj, objtype=None):  # a decorated method binds like a function
        return self if obj is None else functools.partial(self, obj)


def _write_back(tree, new_values: dict):
    """Stores the values fun assigned to argument leaves (NNX Variables) back into the
    caller's objects, as nnx.jit does."""
    var_types = _variable_types()
    if not var_types:
        return
    index = 0
    for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, var_types)):
        if isinstance(node, var_types):
            value_leaves, value_def = jax.tree_util.tree_flatten(node.get_value())
            positions = range(index, index + len(value_leaves))
            if any(p in new_values for p in positions):
                new = [new_values.get(p, old) for p, old in zip(positions, value_leaves)]
                try:
                    node.set_value(jax.tree_util.tree_unflatten(value_def, new))
                except TraceContextError:
                    pass  # a Variable of an outer trace: dropped, as jax.jit drops it
            index += len(value_leaves)
        else:
            index += 1


class _ById:
    """An unhashable static leaf, compared by identity (a new object traces again)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.value is self.value


def _hashable(x):
    try:
        hash(x)
        return x
    except TypeError:
        return _ById(x)


def optimize(fun: Callable | None = None, **options):
    """Puts `fun`'s convolutions and matmuls on the brgemm kernel; a function transform.

    ``jax_brgemm.optimize(f)(*args)`` equals ``f(*args)`` up to float32 reassociation. It
    traces ``f`` to a jaxpr for the arguments' abstract signature (cached, like ``jax.jit``)
    and runs it under ``jax.jit`` with every ``lax.conv_general_dilated`` and
    ``lax.dot_general`` the kernel serves replaced by ``jax_brgemm.nn`` ops (with their own
    ``custom_vjp``, so ``jax.grad(optimize(f))`` runs the backward passes on the kernel), a
    following bias add, per-channel affine and activation fused into the call. What the
    kernel cannot serve stays as it was. Works as a decorator, with or without options, and
    composes with ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``nnx.jit`` and sharding.

    Arguments may be any pytree; array leaves are traced and every other leaf (a function,
    a string, an int in an Equinox module) is static, as in ``equinox.filter_jit``. Flax NNX
    modules may be passed: state that ``f`` writes (BatchNorm statistics, RNG counts) is
    written back, as ``nnx.jit`` does.

    2-D max pooling (``reduce_window_max`` over H, W of NHWC or NCHW, as ``flax``'s
    ``max_pool`` traces) becomes ``nn.max_pool``; training-mode batch norm (with a following
    residual add and relu) becomes ``nn.batch_norm``.

    Options: ``min_macs`` (ops with fewer multiply-adds stay in XLA; pooling counts window
    taps, a batch norm its elements), ``conv``, ``matmul``, ``fuse``, ``attention``, ``pool``
    and ``batch_norm`` (booleans). ``optimize(f).explain(*args)`` shows what serves each op.
    """
    opts = Options.parse(options)
    if fun is None:
        return lambda f: Optimized(f, opts)
    if not callable(fun):
        raise TypeError(f"optimize: fun must be callable, got {type(fun).__name__}")
    return Optimized(fun, opts)


def explain(fun: Callable, *args, **kwargs) -> Explanation:
    """``optimize(fun).explain(*args, **kwargs)``; `fun` may already be optimized."""
    target = fun if isinstance(fun, Optimized) else Optimized(fun, Options())
    return target.explain(*args, **kwargs)
