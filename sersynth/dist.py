"""Multi-host runs: one process per host, started with the same flags (JAX's multi-controller model).

Every process runs the same program, so the devices of all hosts form one mesh (``--mesh_devices``);
process 0 alone writes files (the run directory must be on a filesystem all hosts share), and the
others wait at a barrier where they need what it wrote. On CPU the cross-process collectives use gloo.
"""
from __future__ import annotations

import jax
import numpy as np

from sersynth import io


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed.initialize`` and the writer role; a no-op without a coordinator."""
    if not coordinator_address:
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU only; GPUs/TPUs use their own
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    io.set_writer(jax.process_index() == 0)


def is_writer() -> bool:
    return io.is_writer()


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """A numpy copy of ``x``, gathered from every process when it is sharded over several hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
