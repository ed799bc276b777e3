"""Map a function over items in worker processes, with a progress bar, surviving crashing workers.

Decoders of broken medical files occasionally crash the process (a segfault in a C library), which would
break a plain process pool and stop the whole scan. :func:`robust_map` re-runs the items that were in
flight one at a time, so only the item that really crashes is reported as such.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _pool(workers: int) -> ProcessPoolExecutor:
    # not "fork": forking a process whose torch/OpenMP threads are running can deadlock the child
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def _isolated(func: Callable[[T], R], item: T, on_crash: Callable[[T, str], R]) -> R:
    """Run one item in its own process; a crash becomes ``on_crash(item, message)``."""
    with _pool(1) as pool:
        try:
            return pool.submit(func, item).result()
        except BrokenProcessPool:
            return on_crash(item, "the reading process crashed (the file breaks its decoder)")


def robust_map(
    func: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    on_crash: Callable[[T, str], R],
    desc: str = "",
    progress: bool = True,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, func(item))`` in completion order.

    Args:
        func: a picklable (module-level) function; it should turn expected errors into results itself.
        items: work items.
        workers: processes; ``<= 1`` runs in this process (no crash isolation).
        on_crash: result for an item whose process died or raised unexpectedly.
        desc: progress bar label.
        progress: show a progress bar (on stderr).
    """
    bar = tqdm(total=len(items), desc=desc, disable=None if progress and items else True, unit="item", leave=False)
    try:
        if workers <= 1:
            for item in items:
                yield item, func(item)
                bar.update()
            return
        pending = list(reversed(items))
        in_flight: dict[Future, Any] = {}
        pool = _pool(workers)
        while pending or in_flight:
            while pending and len(in_flight) < 4 * workers:
                item = pending.pop()
                in_flight[pool.submit(func, item)] = item
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            suspects = []
            for future in done:
                item = in_flight.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    suspects.append(item)
                    continue
                except Exception as error:  # a bug in func must not stop the whole run either
                    result = on_crash(item, f"{type(error).__name__}: {error}".splitlines()[0])
                yield item, result
                bar.update()
            if suspects:
                pool.shutdown(cancel_futures=True)
                suspects.extend(in_flight.values())
                in_flight.clear()
                for item in suspects:  # whatever was in flight, one process each
                    yield item, _isolated(func, item, on_crash)
                    bar.update()
                pool = _pool(workers)
        pool.shutdown()
    finally:
        bar.close()
