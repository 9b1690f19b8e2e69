"""A process-parallel map with a progress bar, for per-file audio work."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _one_thread_per_worker() -> None:
    """Worker initialiser: one BLAS/OpenMP thread in each worker process. With every core running a
    worker, each worker's numerical libraries starting a thread per core oversubscribe the machine:
    preparing 952 paper-sized clips took 35 s on 2 cores with their default threads and 12.5 s with
    one thread per worker, and 9,520 clips on 16 cores took 185 s (benchmarks/RESULTS.md)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # libraries loaded later
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits     # libraries the fork inherited already loaded
    except ImportError:
        return
    threadpool_limits(1)


def map_files(fn: Callable[[T], R], jobs: Sequence[T], workers: int = 0, desc: str = "", progress: bool = True,
              min_parallel: int = 64) -> list[R]:
    """``[fn(j) for j in jobs]`` over ``workers`` processes (0: all cores; one BLAS/OpenMP thread
    each), in order."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < min_parallel:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="file", disable=not progress)]
    with ProcessPoolExecutor(workers, initializer=_one_thread_per_worker) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=16), total=len(jobs), desc=desc, unit="file",
                         disable=not progress))
