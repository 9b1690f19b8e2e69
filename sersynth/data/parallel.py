"""A process-parallel map with a progress bar, for per-file audio work."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_files(fn: Callable[[T], R], jobs: Sequence[T], workers: int = 0, desc: str = "", progress: bool = True,
              min_parallel: int = 64) -> list[R]:
    """``[fn(j) for j in jobs]`` over ``workers`` processes (0: all cores), in order."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < min_parallel:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="file", disable=not progress)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=16), total=len(jobs), desc=desc, unit="file",
                         disable=not progress))
