"""Data parallelism for the custom calls: each device runs the kernel on its batch shard.

An FFI custom call is opaque to XLA's partitioner, which would otherwise gather every
sharded input onto every device. `batch_partitioned` wraps a call with
`jax.experimental.custom_partitioning` (jax.ffi.register_ffi_target_as_batch_partitionable
does not fit: it needs every operand to carry the batch dims, and weights do not):

- arguments marked batched keep their sharding along the batch dim (dim 0 unless said
  otherwise); every other dimension, and every unbatched argument (weights), is replicated;
- "batch" outputs come back sharded like the batch; "sum" outputs (weight gradients: sums
  over the batch) are per-shard partial sums that the lowering all-reduces with psum.

Under `jax.shard_map` the ops already see local shards, so nothing is needed there. Under a
mesh with Explicit axes (``jax.make_mesh``'s default), shardings are part of the array
types and custom_partitioning cannot type its results: there the call runs under
`jax.shard_map` over the axes that shard the batch, with the same split and psums.
custom_partitioning has no batching or differentiation rules, so it wraps only the raw FFI
call: custom_vjp and custom_vmap sit outside it.

A call may name a second factor, heads (attention's tensor parallelism): arguments and
outputs with a heads dim keep the split the first such argument has along it, so a head's
queries, keys and values stay on one device. Grouped K/V heads (fewer than the query heads,
contiguous groups) split the same way where the split divides them, and a single K/V head
is replicated; a split that divides some carrier unevenly is not taken (the heads are
gathered, as XLA would).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def batch_partitioned(impl: Callable, batched: Sequence[bool], outputs: Sequence[str],
                      heads: Sequence | None = None, out_heads: Sequence | None = None) -> Callable:
    """Returns impl(*arrays) made shardable along the batch of its batched arguments.

    Args:
      impl: a function of arrays only (static attributes closed over) returning one array
        (len(outputs) == 1) or a tuple of arrays.
      batched: per argument, False (replicated), True (dim 0 is the batch) or the batch's
        dim as an int. An argument whose batch dim has size 1 while the batch is larger is
        a broadcast, and is replicated.
      outputs: per output, "batch" (dim 0 is the batch) or the batch's dim as an int, "sum"
        (a sum over the batch) or "replicated" (e.g. an empty placeholder result).
      heads, out_heads: per argument / output, the dim of its heads or None (default: no
        heads factor). A heads dim of size 1 is a broadcast.
    """
    dims = tuple(None if b is False else (0 if b is True else int(b)) for b in batched)
    outputs = tuple(0 if kind == "batch" else kind for kind in outputs)
    assert all(isinstance(k, int) or k in ("sum", "replicated") for k in outputs), outputs
    heads = (None,) * len(dims) if heads is None else tuple(heads)
    out_heads = (None,) * len(outputs) if out_heads is None else tuple(out_heads)
    assert len(heads) == len(dims) and len(out_heads) == len(outputs)

    def wrapped(*args):
        really = _Factors(_batch_carriers(args, dims), _heads_carriers(args, heads))
        if all(d is None for d in really.batch + really.heads):
            return impl(*args)
        explicit = _explicit_axes(args, really)
        if explicit is not None:
            results = jax.eval_shape(impl, *args)
            results = (results,) if len(outputs) == 1 else tuple(results)
            heads_out, heads_sums = _heads_carriers(results, out_heads), _heads_sums(results, out_heads)
            return _shard_mapped(impl, really, outputs, heads_out, heads_sums, *explicit)(*args)
        if _explicit_mesh(args) is not None:  # the types say nothing is split
            return impl(*args)
        results = jax.eval_shape(impl, *args)
        results = (results,) if len(outputs) == 1 else tuple(results)
        heads_out, heads_sums = _heads_carriers(results, out_heads), _heads_sums(results, out_heads)
        sizes = tuple(None if h is None else a.shape[h] for a, h in zip(args + results, really.heads + heads_out))
        op = _partitioned(impl, really, outputs, heads_out, heads_sums, tuple(a.ndim for a in args),
                          tuple(len(r.shape) for r in results), _heads_factors(sizes))
        return op(*args)

    return wrapped


class _Factors(NamedTuple):
    """Per argument, the dim of its batch (None: none) and of its heads."""

    batch: tuple
    heads: tuple


def align_to_batch(operands: Sequence, batch_dims: Sequence, heads: Sequence | None = None):
    """Under a mesh whose axes are all Explicit: `operands` (arrays or None) resharded so
    that those with the batch (its dim per `batch_dims`, None: none; size-1 dims are
    broadcasts) are split like the first one whose type splits it, and the rest (weights)
    are replicated; likewise the heads where `heads` names their dims. The ops call this
    before their custom_vjp, whose cotangents must have their primals' types: the kernel's
    are split like the batch, weight sums replicated. Elsewhere the operands come back
    unchanged."""
    operands = tuple(operands)
    mesh = _explicit_mesh(operands)
    if mesh is None:
        return operands
    heads = (None,) * len(operands) if heads is None else tuple(heads)
    really = _Factors(_batch_carriers(operands, batch_dims), _heads_carriers(operands, heads))
    found = _explicit_axes(operands, really)
    axes = (None, None) if found is None else found[1:]
    return tuple(None if a is None else jax.reshard(a, NamedSharding(mesh, _spec((b, axes[0]), (h, axes[1]))))
                 for a, b, h in zip(operands, really.batch, really.heads))


def _batch_carriers(args, dims):
    """Per argument (None: absent), its batch dim from `dims` where it really carries the
    batch, else None: the batch is the largest size along those dims, and a size-1 dim
    (or a batch of 1) is a broadcast."""
    sizes = [a.shape[d] if a is not None and d is not None and a.ndim > d else None
             for a, d in zip(args, dims)]
    batch = max((s for s in sizes if s is not None), default=1)
    return tuple(d if s == batch and batch > 1 else None for d, s in zip(dims, sizes))


def _heads_carriers(args, dims):
    """Per argument, its heads dim from `dims` where it has more than one head, else None."""
    return tuple(d if a is not None and d is not None and a.ndim > d and a.shape[d] > 1 else None
                 for a, d in zip(args, dims))


def _heads_sums(results, out_heads):
    """Per output, whether it has one head where it names a heads dim: the gradient of an
    operand broadcast over the heads (a single K/V head, a bias shared by all heads), a sum
    over them, which each heads shard holds in part."""
    return tuple(h is not None and len(r.shape) > h and r.shape[h] == 1 for r, h in zip(results, out_heads))


def _heads_factors(sizes):
    """Shardy's factors for each heads dim (sizes: per argument then output, None: none):
    "h" where all have the same count; with grouped K/V heads (K dividing the N query
    heads, contiguous groups) the query heads are the compound "(h g)" and K/V's "h", so a
    split of the query heads carries over to theirs. Returns (labels, factor sizes)."""
    counts = sorted({s for s in sizes if s is not None})
    if len(counts) == 2 and counts[1] % counts[0] == 0:
        kv, full = counts
        labels = tuple(None if s is None else ("h" if s == kv else "(h g)") for s in sizes)
        return labels, (("g", full // kv),)
    full = counts[-1] if counts else None
    return tuple("h" if s is not None and s == full else None for s in sizes), ()


def _spec(*placed):
    """The PartitionSpec of an array whose dims are split as given: (dim, axes) pairs, a
    None dim or axes meaning no split."""
    placed = [(d, axes) for d, axes in placed if d is not None and axes is not None]
    entries = [None] * (max((d for d, _ in placed), default=-1) + 1)
    for d, axes in placed:
        entries[d] = axes
    return P(*entries)


def _split_size(mesh, axes):
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _heads_axes(mesh, axes, arg_shapes, heads_dims):
    """`axes` if splitting every heads carrier over them is even (else None: not split)."""
    if axes is None:
        return None
    size = _split_size(mesh, axes)
    ok = all(shape.shape[d] % size == 0 for shape, d in zip(arg_shapes, heads_dims) if d is not None)
    return axes if ok else None


def _psum_sums(result, outputs, axes, heads_sums=None, heads_axes=None):
    """result with its "sum" outputs all-reduced over the batch `axes` and those of
    `heads_sums` over `heads_axes` (per-shard partial sums; None: not split)."""
    single = len(outputs) == 1
    parts = (result,) if single else tuple(result)
    heads_sums = heads_sums or (False,) * len(parts)
    names = lambda axes: () if axes is None else (axes if isinstance(axes, tuple) else (axes,))  # noqa: E731
    reduced = []
    for x, kind, over_heads in zip(parts, outputs, heads_sums):
        over = (names(axes) if kind == "sum" else ()) + (names(heads_axes) if over_heads else ())
        reduced.append(jax.lax.psum(x, over) if over else x)
    return reduced[0] if single else tuple(reduced)


def _explicit_axes(args, really):
    """(mesh, batch axes, heads axes) when an argument's type splits its batch (or heads) dim
    over Explicit mesh axes; else None (no mesh, Auto axes: custom_partitioning handles
    those). Heads whose split would be uneven are not split."""
    found = [_explicit_axes_of(args, really.batch), _explicit_axes_of(args, really.heads)]
    meshes = [f[0] for f in found if f is not None]
    if not meshes:
        return None
    mesh = meshes[0]
    batch_axes = None if found[0] is None else found[0][1]
    heads_axes = None if found[1] is None else _heads_axes(mesh, found[1][1], args, really.heads)
    if batch_axes is None and heads_axes is None:
        return None
    return mesh, batch_axes, heads_axes


def _explicit_axes_of(args, dims):
    for a, dim in zip(args, dims):
        if dim is None:
            continue
        sharding = getattr(jax.typeof(a), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is None or len(spec) <= dim or spec[dim] is None:
            continue
        axes = spec[dim]
        names = axes if isinstance(axes, tuple) else (axes,)
        mesh = sharding.mesh
        types = dict(zip(mesh.axis_names, mesh.axis_types))
        if all(types[n] == jax.sharding.AxisType.Explicit for n in names):
            return mesh, axes
    return None


def _explicit_mesh(arrays):
    """The mesh when its axes are all Explicit: the one set with jax.set_mesh, or else the one
    an array's type carries (arrays put on such a mesh without a mesh context); else None."""
    meshes = [jax.sharding.get_abstract_mesh()]
    meshes += [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None) for a in arrays if a is not None]
    for mesh in meshes:
        if (mesh is not None and not mesh.empty
                and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)):
            return mesh
    return None


def _shard_mapped(impl, really, outputs, out_heads, heads_sums, mesh, batch_axes, heads_axes):
    """impl under jax.shard_map: batched arguments split along `batch_axes` and heads along
    `heads_axes` (resharded to that first where their types say otherwise, e.g. a
    replicated initial state), the rest replicated; "sum" outputs psum'd over the batch."""
    names = set()
    for axes in (batch_axes, heads_axes):
        if axes is not None:
            names |= set(axes if isinstance(axes, tuple) else (axes,))
    in_specs = tuple(_spec((b, batch_axes), (h, heads_axes)) for b, h in zip(really.batch, really.heads))
    out_specs = tuple(_spec((k if isinstance(k, int) else None, batch_axes), (h, heads_axes))
                      for k, h in zip(outputs, out_heads))

    def local(*args):
        return _psum_sums(impl(*args), outputs, batch_axes, heads_sums, heads_axes)

    mapped = jax.shard_map(local, mesh=mesh, axis_names=names, check_vma=False, in_specs=in_specs,
                           out_specs=out_specs[0] if len(out_specs) == 1 else out_specs)
    return lambda *args: mapped(*(jax.reshard(a, NamedSharding(mesh, spec)) for a, spec in zip(args, in_specs)))


@functools.lru_cache(maxsize=None)
def _partitioned(impl, really, outputs, out_heads, heads_sums, ndims, out_ranks, heads_factors):
    """really: per argument, its batch and heads dims (or None); outputs: per output, its
    batch dim, "sum" or "replicated"; out_heads: per output, its heads dim or None;
    heads_sums: per output, whether it is a sum over the heads; heads_factors: `_heads_factors`' labels and sizes."""
    single = len(outputs) == 1

    def axes_along(arg_shapes, dims):
        for shape, dim in zip(arg_shapes, dims):
            if dim is not None:
                spec = shape.sharding.spec
                return spec[dim] if len(spec) > dim else None
        return None

    def shardings(mesh, arg_shapes):
        batch_axes = axes_along(arg_shapes, really.batch)
        heads_axes = _heads_axes(mesh, axes_along(arg_shapes, really.heads), arg_shapes, really.heads)
        args = tuple(NamedSharding(mesh, _spec((b, batch_axes), (h, heads_axes)))
                     for b, h in zip(really.batch, really.heads))
        outs = tuple(NamedSharding(mesh, _spec((k if isinstance(k, int) else None, batch_axes), (h, heads_axes)))
                     for k, h in zip(outputs, out_heads))
        return (batch_axes, heads_axes), args, outs[0] if single else outs

    def partition(mesh, arg_shapes, result_shape):
        (batch_axes, heads_axes), arg_shardings, out_shardings = shardings(mesh, arg_shapes)

        def lower(*args):
            return _psum_sums(impl(*args), outputs, batch_axes, heads_sums, heads_axes)

        return mesh, lower, out_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    @custom_partitioning
    def op(*args):
        return impl(*args)

    # Shardy's rule: the batch factor "b" on the batch dim of batched args and outputs, the
    # heads factors on the heads; every other dimension its own factor.
    counter = iter(range(10**6))
    labels, factor_sizes = heads_factors
    label = iter(labels)

    def factors(rank, batch_dim, heads_dim):
        heads_label = next(label)
        return " ".join("b" if d == batch_dim else (heads_label if d == heads_dim and heads_label
                                                    else f"f{next(counter)}") for d in range(rank))

    operands = ", ".join(factors(r, d, h) for r, d, h in zip(ndims, really.batch, really.heads))
    results = ", ".join(factors(r, k if isinstance(k, int) else None, h)
                        for r, k, h in zip(out_ranks, outputs, out_heads))
    sum_only = not any(isinstance(k, int) for k in outputs)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=f"{operands} -> {results}",
                     reduction_factors=("b",) if sum_only else (), **dict(factor_sizes))
    return op
