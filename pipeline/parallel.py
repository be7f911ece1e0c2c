"""Work over many clips in parallel, results in input order: in local worker processes
(`workers`), or on a Dask distributed cluster when `dask.scheduler` names a running scheduler
(`tcp://scheduler:8786`; null keeps the local pool and imports nothing from Dask).

Both go through one bounded, in-order map (`in_order`): a few tasks in flight ahead of the
caller, each result handed over as soon as every earlier one has been, so a stage streams
results to its outputs and holds neither the whole input nor the whole output. On Dask, work
goes out in blocks of `dask.clips_per_task` clips. Like `workers`, the setting moves the work,
never changes a result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.schema.sections import Dask
from pipeline.tensorflow_start import prepare_tensorflow

log = logging.getLogger(__name__)


def in_order(submit: Callable[[Any], Any], items: Iterable, ahead: int) -> Iterator[Any]:
    """`submit(item).result()` for every item, in input order, with at most `ahead` items
    submitted beyond the one being waited for (`submit` returns a future: a local pool's or
    a Dask client's). `items` is read lazily."""
    it = iter(items)
    pending = deque(submit(x) for x in islice(it, ahead))
    while pending:
        result = pending.popleft().result()
        pending.extend(submit(x) for x in islice(it, 1))
        yield result


def worker_count(requested: int | None) -> int:
    """`requested` processes, or one per available core when it is null/0."""
    if requested:
        return max(1, int(requested))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[[Any], Any], items: list, workers: int | None, desc: str, unit: str = "clip"
) -> Iterator[Any]:
    """`fn` over `items` in worker processes, results in input order, with a progress bar.

    Results are yielded as they arrive (in order), so a caller can write each one away and
    keep memory bounded by a few items, not the whole list. `fn` must be a module-level
    function of an importable module. One worker (or one item) runs in this process.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    n = min(worker_count(workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    try:
        if n == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        # forkserver, not fork: a process that has loaded TensorFlow (tests, notebooks) holds
        # threads and locks that a forked child would inherit mid-use and deadlock on.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([fn.__module__])  # workers start with it imported
        else:
            context = multiprocessing.get_context("spawn")
        # (the workers inherit the quiet entry point's marker: `import pipeline` continues it)
        with ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
            for result in in_order(lambda x: pool.submit(fn, x), items, 2 * n):
                yield result
                bar.update()
    finally:
        bar.close()


@contextlib.contextmanager
def dask_client(dask: Dask) -> Iterator[Any]:
    """A client of the scheduler `dask.scheduler` names, closed afterwards (the cluster keeps
    running)."""
    address, timeout = dask.scheduler, dask.connect_timeout_s
    try:
        from distributed import Client
    except ImportError as err:
        raise PipelineError(
            f"dask.scheduler is {address!r} but Dask is not installed: "
            "pip install -e '.[dask]', or set dask.scheduler=null for the local worker pool"
        ) from err
    try:
        client = Client(address, timeout=f"{timeout}s")
    except OSError as err:
        raise PipelineError(
            f"no Dask scheduler answered at dask.scheduler={address!r} within "
            f"dask.connect_timeout_s={timeout:g}: {err}"
        ) from err
    try:
        workers = len(client.scheduler_info().get("workers", {}))
        log.info("Dask scheduler %s: %d workers", address, workers)
        yield client
    finally:
        client.close()


def run_block(fn: Callable[..., Any], block: list, *shared: Any) -> list:
    """One task on a worker: `fn(*shared, item)` over a block of (item, path) pairs. A path is
    a file the stage's own machine has; a worker that cannot see it stops the stage (the
    per-clip stages would otherwise record the clip as unreadable and drop it)."""
    prepare_tensorflow()  # a Dask worker is a process of its own
    for _, path in block:
        if path is not None and not Path(path).is_file():
            raise PipelineError(
                f"the Dask worker on {socket.gethostname()} cannot read {path}: the workers "
                "need the repository's data folders at the same paths (a shared volume)"
            )
    return [fn(*shared, item) for item, _ in block]


def blocks_of(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while block := list(islice(it, size)):
        yield block


def cluster_map(
    client: Any,
    fn: Callable[..., Any],
    blocks: Iterable[list],
    desc: str,
    unit: str = "clip",
    shared: tuple = (),
) -> Iterator[Any]:
    """`fn(*shared, item)` over every item of `blocks` (one task per block) on the cluster; each
    item's result in input order. `shared` may hold futures of scattered data (Dask resolves
    them on the worker). At most two blocks per worker are in flight, and `blocks` is read
    lazily, so neither the caller nor the scheduler holds the whole input or output."""
    from tqdm import tqdm

    workers = max(1, len(client.scheduler_info().get("workers", {})))

    def submit(block):
        return client.submit(run_block, fn, block, *shared, pure=False)

    with tqdm(desc=f"{desc} (dask)", unit=unit) as bar:
        for results in in_order(submit, blocks, 2 * workers):
            for result in results:
                yield result
                bar.update()


def clip_map(
    fn: Callable[[Any], Any],
    items: list,
    paths: list[Path],
    desc: str,
    workers: int | None,
    dask: Dask,
) -> Iterator[Any]:
    """`fn` over `items` (the clip of each is `paths[i]`), results in input order: on the
    Dask cluster `dask.scheduler` names, else in a local pool of `workers` processes."""
    if dask.scheduler is None:
        yield from parallel_map(fn, items, workers, desc)
        return
    here = [str(p) if Path(p).is_file() else None for p in paths]
    with dask_client(dask) as client:
        blocks = blocks_of(zip(items, here, strict=True), dask.clips_per_task)
        yield from cluster_map(client, fn, blocks, desc)
