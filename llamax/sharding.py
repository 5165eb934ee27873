"""The device mesh and the one table from logical axis names to mesh axes.

The model names the axes of every parameter and of a few activations (`batch, length, embed,
heads, kv_heads, head_dim, mlp, vocab, layers`); this file alone knows the mesh axes:

- `data`: pure data parallelism (replicated parameters; across slices on multi-slice TPU).
- `fsdp`: data parallelism whose parameters and optimizer state are sharded (ZeRO-3).
- `context`: context parallelism: each sequence split along its length, the activations of
  every layer too; attention gathers the keys and values of the whole sequence (an
  all-gather over `context`), each device computing its own queries' share. Parameters and
  optimizer state are sharded over it as over `fsdp`. For sequences too long for one device
  per sequence (a 32k context with fewer sequences than chips).
- `tensor`: Megatron-style tensor parallelism over heads, the MLP width and the vocabulary.

Rules are matched in order and a mesh axis is used at most once per array (flax's priority
rules). So for the activation `[batch, length, embed]`, `batch` takes `data` and `fsdp` first and
`embed` stays unsharded, while for the weight `[embed, heads, head_dim]`, `embed` takes `fsdp`
(and `context`). That ordering is why `batch` and `length` come before `embed` below. Keys and
values name their length `kv_length`, never split: attention sees the whole sequence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("length", "context"),
    ("kv_length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", ("fsdp", "context")),
    ("head_dim", None),
    ("lora_rank", None),  # LoRA adapters: split along their base weight's other axes
    ("labels", None),  # a reward model's score head [embed, 1]
)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    context: int = 1,
) -> Mesh:
    """A `data x fsdp x context x tensor` mesh over `devices` (default: all). One size may be
    -1, meaning the devices that remain."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, context, tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"Mesh sizes must be positive, with at most one -1; got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    hint = (
        "; choose mesh sizes that multiply to the device count (--config.mesh.data, .fsdp, "
        ".context, .tensor; -1 takes the devices that remain), or on a CPU simulate devices with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={max(known, 8)} set before JAX starts"
    )
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into a mesh of {sizes}" + hint
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x context={sizes[2]} x tensor={sizes[3]} "
            f"needs {math.prod(sizes)} devices, but there are {len(devices)}" + hint
        )
    try:
        # Lays the mesh out along the physical interconnect on TPU; plain reshape elsewhere.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Activates the mesh and the rules, so the model's activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield mesh


def mesh_axes(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Mesh partition spec for an array with these logical axis names and this shape.

    A mesh axis that does not divide its dimension is dropped (that dimension is then sharded
    over fewer devices, or replicated), since jax cannot shard unevenly: for example 8 kv heads
    on a 16-way `tensor` axis.
    """
    spec = nn.logical_to_mesh_axes(tuple(logical), RULES)
    out = []
    for dim, axes in zip(shape, spec, strict=True):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_axes(boxed_tree):
    """The tree of logical axis-name tuples of a tree of `nn.Partitioned` leaves (as returned
    by `model.init` or `jax.eval_shape` of it)."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else (None,) * np.ndim(x),
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def tree_shardings(boxed_tree, mesh: Mesh):
    """`NamedSharding` for every leaf of a tree of `nn.Partitioned` (abstract) arrays."""
    axes = logical_axes(boxed_tree)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_tree))
    return jax.tree.map(
        lambda names, shape: NamedSharding(mesh, mesh_axes(names, shape, mesh)),
        axes,
        shapes,
        is_leaf=lambda x: type(x) is tuple and all(isinstance(n, str | None) for n in x),
    )
