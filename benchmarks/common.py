"""Shared helpers for benchmark scripts: timing after warm-up, and the machine/date line every table carries."""

from __future__ import annotations

import datetime
import platform
import time

import jax


def machine_line() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return (f"{datetime.date.today().isoformat()}, jax {jax.__version__}, {jax.device_count()}x {kind} "
            f"({dev.platform}), host {platform.node() or '?'} with {__import__('os').cpu_count()} CPU cores")


def timeit(fn, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds per call of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
