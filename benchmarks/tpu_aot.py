"""Ahead-of-time compilation for TPU on a host without one (CPU CI machines), for compile tests and reports.

Tooling, not library: `pallas_kernels` sets no environment variables; this module does, when imported.

With libtpu installed, `jax.experimental.topologies.get_topology_desc(platform="tpu", ...)` describes TPU
devices that exist only on paper; a jit lowered under an abstract mesh over them, with inputs given a
`NamedSharding`, compiles with the real TPU compiler (Pallas Mosaic kernels included) and reports
`memory_analysis()` / `cost_analysis()` per chip.

    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct((8, 576), jnp.bfloat16), topology="v6e:2x2")
    print(compiled.memory_analysis())

A kernel op inside `fn` must be called with impl="pallas_tpu", interpret=False to hold real Mosaic kernels
("pallas" follows the host's CPU backend and needs interpret=True there).

Several processes (pytest workers, a second python) may load libtpu at once: `ALLOW_MULTIPLE_LIBTPU_LOAD=1`
is set, and libtpu's logs go to a temporary folder (`TPU_LOG_DIR`) unless the caller chose one. Both are set
when this module is imported, which must happen before jax first touches libtpu to take effect.
"""

from __future__ import annotations

import functools
import os
import tempfile

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One shared folder, not one per process: libtpu's logs are small but would otherwise pile up in /tmp.
os.environ.setdefault("TPU_LOG_DIR", os.path.join(tempfile.gettempdir(), "glmjax_tpu_logs"))

import jax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

DEFAULT_TOPOLOGY = "v5p:2x2x1"


@functools.cache
def tpu_mesh(topology_name: str = DEFAULT_TOPOLOGY, axis_name: str = "x") -> Mesh:
    """A one-device Mesh over the first device of the named TPU topology (e.g. "v5p:2x2x1", "v6e:2x2")."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    return Mesh(topo.devices[:1], (axis_name,))


def compile_for_tpu(fn, *shape_dtype_structs: jax.ShapeDtypeStruct, topology: str = DEFAULT_TOPOLOGY,
                    static_argnums=(), **jit_kwargs):
    """jit(fn) compiled for one chip of `topology`; the arguments are shapes (ShapeDtypeStruct or any object
    with .shape and .dtype), each replicated on that chip. Returns the `Compiled` object."""
    mesh = tpu_mesh(topology)
    sharding = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shape_dtype_structs]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(fn, static_argnums=static_argnums, **jit_kwargs).lower(*args)
        return lowered.compile()


def memory_summary(compiled) -> dict[str, int]:
    """The per-chip byte counts of `compiled.memory_analysis()` as a plain dict (for printing and asserting)."""
    ma = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}
