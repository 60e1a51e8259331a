"""The device mesh and the partition rules: the same training code on one CPU, fake CPU devices, a GPU or a TPU.

The mesh has three named axes: `data` (batch only), `fsdp` (batch, and parameters split along d_model) and
`tensor` (parameters split along heads / ffn / vocabulary). A rule names, for each parameter, which axis splits
which dimension; an axis that does not divide its dimension is dropped for that parameter (it is replicated
there instead), so any mesh works with any preset.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nano.errors import NanoError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (pattern on the dotted parameter name, the mesh axis of each dimension). First match wins.
PARTITION_RULES = [
    (r"embedder\.embedding$", ("tensor", "fsdp")),  # [vocab, d_model]
    (r"(q_proj|k_proj|v_proj|gate|up)\.kernel$", ("fsdp", "tensor")),  # [d_model, out]
    (r"(o_proj|down)\.kernel$", ("tensor", "fsdp")),  # [in, d_model]
    (r"\.scale$", (None,)),  # norms: replicated
]


def parse_mesh(spec: str | None, *, devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=4' → {'data': 2, 'fsdp': 4, 'tensor': 1}; None or '' → all devices (this process's, or
    `devices`) on `data`."""
    sizes = {axis: 1 for axis in AXES}
    if not spec:
        sizes["data"] = devices or jax.device_count()
        return sizes
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise NanoError(f"bad --mesh entry {part!r}: use AXIS=N with AXIS in {', '.join(AXES)}")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | None = None) -> Mesh:
    sizes = parse_mesh(spec)
    needed = int(np.prod(list(sizes.values())))
    if needed != jax.device_count():
        raise NanoError(f"--mesh {spec} needs {needed} devices, this process has {jax.device_count()}")
    devices = np.asarray(jax.devices()).reshape([sizes[a] for a in AXES])
    return Mesh(devices, AXES)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, axes in PARTITION_RULES:
        if re.search(pattern, name):
            dims = [axis if axis and i < len(shape) and shape[i] % mesh.shape[axis] == 0 else None
                    for i, axis in enumerate(axes)]
            return P(*dims[:len(shape)])
    raise NanoError(f"no partition rule for parameter {name}")


def param_name(path) -> str:
    """'layers.0.attn.q_proj.kernel' from an nnx.State leaf path (which ends in `.value`, or for a quantized
    weight in `.value.codes` / `.value.scales`: both are laid out like the weight they stand for)."""
    return re.sub(r"\.value(\.codes|\.scales)?$", "", jax.tree_util.keystr(tuple(path), simple=True, separator="."))


def model_shardings(state, mesh: Mesh):
    """A NamedSharding for every parameter of a model's nnx.State by the partition rules: how a teacher is laid
    out on the mesh, like the student it teaches."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(param_name(path), x.shape, mesh)), state)


def step_batch_sharding(mesh: Mesh) -> NamedSharding:
    """A step's batches [accum, global_batch, ...]: each micro-batch split along its batch dimension over
    data × fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def to_global(tree, sharding: NamedSharding):
    """Host (numpy) leaves of `tree` as jax.Arrays laid out by `sharding`; jax.Arrays pass through. Every process
    holds the same host value (each builds the same batches from the same data) and hands over the part its own
    devices hold: jit refuses host arrays for a mesh that spans processes."""
    def place(x):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
