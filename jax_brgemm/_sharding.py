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
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def batch_partitioned(impl: Callable, batched: Sequence[bool], outputs: Sequence[str]) -> Callable:
    """Returns impl(*arrays) made shardable along the batch of its batched arguments.

    Args:
      impl: a function of arrays only (static attributes closed over) returning one array
        (len(outputs) == 1) or a tuple of arrays.
      batched: per argument, False (replicated), True (dim 0 is the batch) or the batch's
        dim as an int. An argument whose batch dim has size 1 while the batch is larger is
        a broadcast, and is replicated.
      outputs: per output, "batch" (dim 0 is the batch) or the batch's dim as an int, "sum"
        (a sum over the batch) or "replicated" (e.g. an empty placeholder result).
    """
    dims = tuple(None if b is False else (0 if b is True else int(b)) for b in batched)
    outputs = tuple(0 if kind == "batch" else kind for kind in outputs)
    assert all(isinstance(k, int) or k in ("sum", "replicated") for k in outputs), outputs

    def wrapped(*args):
        really = _batch_carriers(args, dims)
        if all(d is None for d in really):
            return impl(*args)
        explicit = _explicit_batch_axes(args, really)
        if explicit is not None:
            return _shard_mapped(impl, really, outputs, *explicit)(*args)
        if _explicit_mesh(args) is not None:  # the types say the batch is replicated: nothing to split
            return impl(*args)
        results = jax.eval_shape(impl, *args)
        out_ranks = tuple(len(r.shape) for r in ((results,) if len(outputs) == 1 else results))
        op = _partitioned(impl, really, outputs, tuple(a.ndim for a in args), out_ranks)
        return op(*args)

    return wrapped


def align_to_batch(operands: Sequence, batch_dims: Sequence):
    """Under a mesh whose axes are all Explicit: `operands` (arrays or None) resharded so
    that those with the batch (its dim per `batch_dims`, None: none; size-1 dims are
    broadcasts) are split like the first one whose type splits it, and the rest (weights)
    are replicated. The ops call this before their custom_vjp, whose cotangents must have
    their primals' types: the kernel's are split like the batch, weight sums replicated.
    Elsewhere the operands come back unchanged."""
    operands = tuple(operands)
    mesh = _explicit_mesh(operands)
    if mesh is None:
        return operands
    really = _batch_carriers(operands, batch_dims)
    found = _explicit_batch_axes(operands, really)
    axes = None if found is None else found[1]
    return tuple(None if a is None else jax.reshard(a, NamedSharding(mesh, _batch_spec(axes, d)))
                 for a, d in zip(operands, really))


def _batch_carriers(args, dims):
    """Per argument (None: absent), its batch dim from `dims` where it really carries the
    batch, else None: the batch is the largest size along those dims, and a size-1 dim
    (or a batch of 1) is a broadcast."""
    sizes = [a.shape[d] if a is not None and d is not None and a.ndim > d else None
             for a, d in zip(args, dims)]
    batch = max((s for s in sizes if s is not None), default=1)
    return tuple(d if s == batch and batch > 1 else None for d, s in zip(dims, sizes))


def _batch_spec(axes, dim):
    """The PartitionSpec of an array whose dim `dim` (None: none) is split over `axes`."""
    return P() if dim is None or axes is None else P(*([None] * dim + [axes]))


def _psum_sums(result, outputs, axes):
    """result with its "sum" outputs all-reduced over `axes` (per-shard partial sums)."""
    single = len(outputs) == 1
    parts = (result,) if single else tuple(result)
    parts = tuple(jax.lax.psum(x, axes) if kind == "sum" else x for x, kind in zip(parts, outputs))
    return parts[0] if single else parts


def _explicit_batch_axes(args, batch_dims):
    """(mesh, axes) when a batched argument's type shards its batch dim over Explicit mesh
    axes; else None (no mesh, Auto axes: custom_partitioning handles those)."""
    for a, dim in zip(args, batch_dims):
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


def _shard_mapped(impl, batch_dims, outputs, mesh, axes):
    """impl under jax.shard_map: batched arguments split along `axes` (resharded to that
    first where their types say otherwise, e.g. a replicated initial state), the rest
    replicated; "sum" outputs psum'd to replicated."""
    names = set(axes if isinstance(axes, tuple) else (axes,))
    in_specs = tuple(_batch_spec(axes, d) for d in batch_dims)
    out_specs = tuple(_batch_spec(axes, k if isinstance(k, int) else None) for k in outputs)
    mapped = jax.shard_map(
        lambda *args: _psum_sums(impl(*args), outputs, axes) if "sum" in outputs else impl(*args),
        mesh=mesh, axis_names=names, check_vma=False, in_specs=in_specs,
        out_specs=out_specs[0] if len(out_specs) == 1 else out_specs)
    return lambda *args: mapped(*(jax.reshard(a, NamedSharding(mesh, spec)) for a, spec in zip(args, in_specs)))


@functools.lru_cache(maxsize=None)
def _partitioned(impl, batch_dims, outputs, ndims, out_ranks):
    """batch_dims: per argument, its batch dim or None; outputs: per output, its batch dim,
    "sum" or "replicated"."""
    single = len(outputs) == 1

    def batch_axes(arg_shapes):
        for shape, dim in zip(arg_shapes, batch_dims):
            if dim is not None:
                spec = shape.sharding.spec
                return spec[dim] if len(spec) > dim else None
        return None

    def shardings(mesh, arg_shapes):
        axes = batch_axes(arg_shapes)
        args = tuple(NamedSharding(mesh, _batch_spec(axes, d)) for d in batch_dims)
        outs = tuple(NamedSharding(mesh, _batch_spec(axes, k if isinstance(k, int) else None))
                     for k in outputs)
        return axes, args, outs[0] if single else outs

    def partition(mesh, arg_shapes, result_shape):
        axes, arg_shardings, out_shardings = shardings(mesh, arg_shapes)

        def lower(*args):
            result = impl(*args)
            if axes is None or "sum" not in outputs:
                return result
            return _psum_sums(result, outputs, axes)

        return mesh, lower, out_shardings, arg_shardings

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    @custom_partitioning
    def op(*args):
        return impl(*args)

    # Shardy's rule: the batch factor "b" on the batch dim of batched args and outputs;
    # every other dimension its own factor.
    counter = iter(range(10**6))

    def factors(rank, batch_dim):
        return " ".join("b" if d == batch_dim else f"f{next(counter)}" for d in range(rank))

    operands = ", ".join(factors(r, d) for r, d in zip(ndims, batch_dims))
    results = ", ".join(factors(r, k if isinstance(k, int) else None)
                        for r, k in zip(out_ranks, outputs))
    sum_only = not any(isinstance(k, int) for k in outputs)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=f"{operands} -> {results}",
                     reduction_factors=("b",) if sum_only else ())
    return op
