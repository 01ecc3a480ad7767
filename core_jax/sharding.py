"""Data-parallel sharding over a Mesh of all devices, and multi-host set-up with jax.distributed.

Parameters and optimizer state are replicated; the batch is split along its first axis over the 'data' axis.
Each process feeds only its own rows (`jax.make_array_from_process_local_data`), so several hosts need no custom
scheduler: every host runs the same program on the same step.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> bool:
    """Calls jax.distributed.initialize() when the standard env vars (or a cluster launcher) say so."""
    if all(v in os.environ for v in _DIST_ENV):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    return False


def data_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} is not divisible by the {n} devices of the mesh; "
                         f"set data.batch_size to a multiple of {n}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Global numpy batch -> sharded jax arrays; each process contributes its own slice of rows."""
    sharding = batch_sharding(mesh)
    n_proc, pid = jax.process_count(), jax.process_index()

    def put(x):
        x = np.asarray(x)
        rows = x.shape[0] // n_proc
        return jax.make_array_from_process_local_data(sharding, x[pid * rows:(pid + 1) * rows], x.shape)
    return {k: put(v) for k, v in batch.items()}
