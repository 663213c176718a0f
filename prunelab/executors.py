"""Where a sweep's runs execute: inline, local worker processes, or a Dask cluster.

Each executor maps a picklable function over argument tuples and yields ``(index, ok, value)``
outcomes as they finish (``value`` is the result, or the traceback text when the call raised),
so one failed run never stops the others. Workers only compute: the caller commits results.
Used by :class:`prunelab.experiments.Sweep`; torch-free at import (workers set their own torch
thread count when they start).
"""
from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Outcome", "Inline", "Local", "Dask", "local_cluster", "check_executor",
           "check_resources", "kind", "make_executor", "error_text"]



def __dir__():
    return sorted(__all__)


def _init_worker(parent_pid: int) -> None:
    """Local worker set-up: one torch thread, and exit if the sweep's process dies (kill -9)."""
    import torch

    torch.set_num_threads(1)
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore; a worker stopped on Ctrl-C would leak
    # it (a resource_tracker warning). Workers show no bars, so a thread lock does.
    tqdm.set_lock(threading.RLock())

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)  # orphaned: nobody would commit our results

    threading.Thread(target=watch, daemon=True, name="prunelab-parent-watch").start()


# An outcome: (index into the submitted list, ok, result or traceback text).
Outcome = tuple[int, bool, Any]


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Inline:
    """Runs tasks one after the other in this process (``workers`` 0 or 1)."""

    name = "inline"

    def unordered(self, fn: Callable, calls: list[tuple]) -> Iterator[Outcome]:
        for i, args in enumerate(calls):
            try:
                value = fn(*args)
            except Exception as exc:  # a failed run must not stop the others
                yield i, False, error_text(exc)
            else:
                yield i, True, value

    def close(self, cancel: bool = False) -> None:
        pass


class Local:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes."""

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.name = f"local ({workers} processes)"
        # spawn: forking a process whose torch thread pools already started is unsafe.
        self.pool = ProcessPoolExecutor(max_workers=workers,
                                        mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(os.getpid(),))

    def unordered(self, fn: Callable, calls: list[tuple]) -> Iterator[Outcome]:
        from concurrent.futures import as_completed

        index = {}
        for i, args in enumerate(calls):
            index[self.pool.submit(fn, *args)] = i
        for fut in as_completed(index):
            exc = fut.exception()
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C in a terminal reaches workers too
                raise KeyboardInterrupt
            yield (index[fut], True, fut.result()) if exc is None else \
                (index[fut], False, error_text(exc))

    def close(self, cancel: bool = False) -> None:
        if not cancel:
            self.pool.shutdown(wait=True)
            return
        # Runs in flight would finish unseen (nobody commits them): stop them now. Python < 3.14
        # has no public call for this, hence the private mapping of worker processes. Pending
        # work is cancelled by shutdown() first: cancelling futures one by one races with the
        # pool's own clean-up of a broken pool (InvalidStateError in its thread on 3.11).
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
        self.pool.shutdown(wait=True)


def local_cluster(workers: int, resources: dict | None = None):
    """The ``dask.distributed.LocalCluster`` of ``executor="dask"``: ``workers`` processes of one
    thread each, no dashboard, quiet logs, ``resources`` declared by every worker.

    Its workers start without Dask's default ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``): setting it switches off glibc's dynamic mmap
    threshold, so every tensor of 128 KiB or more is a fresh ``mmap`` zeroed page by page and
    unmapped when freed. On the MLP sweep of ``benchmarks/bench_dask.py`` that cost each
    worker 30-50 % more CPU per run than the same run inline; without it, 0-10 %. (Dask sets it
    to hand memory back to the OS sooner; a sweep's workers hold a model and a batch.)
    """
    import logging

    import dask
    from distributed import LocalCluster

    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ",
                                            default={}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    extra = {"resources": dict(resources)} if resources else {}
    # read when each nanny is built, and kept for the workers it restarts
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=None, silence_logs=logging.ERROR, **extra)


class Dask:
    """A ``dask.distributed.Client``: ours on a fresh ``LocalCluster``, or the user's.

    ``resources`` (e.g. ``{"GPU": 1}``) is what each task takes on a worker
    (``client.map(..., resources=)``): a worker started with ``--resources "GPU=1"`` then runs
    one such task at a time. Our own ``LocalCluster``'s workers declare ``resources`` so the
    tasks can be placed.
    """

    def __init__(self, client=None, workers: int = 2, resources: dict | None = None):
        try:
            from distributed import Client
        except ImportError as exc:
            raise ImportError("executor='dask' needs dask.distributed: pip install "
                              "'dask[distributed]>=2024.1'") from exc
        self.cluster = None
        if client is None:
            self.cluster = local_cluster(workers, resources)
            client = Client(self.cluster)
        self.client = client
        if self.cluster is not None:
            self.name = f"dask LocalCluster ({workers} workers)"
        else:
            self.name = f"dask client ({len(client.scheduler_info().get('workers', {}))} workers)"
        self.futures: list = []
        self.resources = dict(resources) if resources else None

    def unordered(self, fn: Callable, calls: list[tuple]) -> Iterator[Outcome]:
        from distributed import as_completed

        token = uuid.uuid4().hex[:8]  # never reuse another sweep's cached task on a shared client
        keys = [f"prunelab-{fn.__name__.strip('_')}-{token}-{i}" for i in range(len(calls))]
        # Runs of a sweep carry 2 or 4 arguments (custom entries only where used): pad to 4.
        width = max((len(c) for c in calls), default=0)
        calls = [tuple(c) + (None,) * (width - len(c)) for c in calls]
        extra = {"resources": self.resources} if self.resources else {}
        futs = (self.client.map(fn, *zip(*calls), key=keys, pure=False, **extra)
                if calls else [])
        self.futures.extend(futs)
        index = {f.key: i for i, f in enumerate(futs)}
        for fut in as_completed(futs):
            try:
                value = fut.result()
            except Exception as exc:
                yield index[fut.key], False, error_text(exc)
            else:
                yield index[fut.key], True, value
            finally:
                fut.release()

    def close(self, cancel: bool = False) -> None:
        if cancel and self.futures:
            try:
                self.client.cancel(self.futures)
            except Exception:  # the cluster may already be going down
                pass
        if self.cluster is not None:  # a user's client stays open
            self.client.close()
            self.cluster.close()


def check_resources(resources) -> None:
    """ValueError unless ``resources`` is None or a mapping of names to positive numbers."""
    if resources is None:
        return
    from collections.abc import Mapping

    if not isinstance(resources, Mapping) or not resources:
        raise ValueError(f"resources must be None or a non-empty mapping such as {{'GPU': 1}}, "
                         f"got {resources!r}")
    for name, amount in resources.items():
        if not isinstance(name, str) or isinstance(amount, bool) \
                or not isinstance(amount, (int, float)) or not amount > 0:
            raise ValueError(f"resources must map names to positive numbers (e.g. {{'GPU': 1}}), "
                             f"got {name!r}: {amount!r}")


def check_executor(executor, workers, resources=None) -> None:
    """ValueError for a bad ``executor``, ``workers`` or ``resources`` (Dask only), before
    anything starts."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 0):
        raise ValueError(f"workers must be None or an integer >= 0, got {workers!r}")
    check_resources(resources)
    if isinstance(executor, str):
        if executor not in ("local", "dask", "inline"):
            raise ValueError(f"executor must be 'local', 'inline', 'dask' or a "
                             f"dask.distributed.Client, got {executor!r}")
        if resources is not None and executor != "dask":
            raise ValueError(f"resources= is for Dask executors (worker resources such as "
                             f"{{'GPU': 1}}), not executor={executor!r}")
        return
    try:
        from distributed import Client
    except ImportError:
        Client = None
    if Client is None or not isinstance(executor, Client):
        raise ValueError(f"executor must be 'local', 'inline', 'dask' or a "
                         f"dask.distributed.Client, got {type(executor).__name__}")


def _count(workers: int | None, n_tasks: int) -> int:
    return workers if workers is not None else max(1, min(os.cpu_count() or 1, n_tasks))


def kind(executor, workers: int | None, n_tasks: int) -> str:
    """Where a checked ``executor`` runs tasks: "inline", "local" (spawned processes, standard
    pickle) or "dask" (cloudpickle)."""
    if executor == "inline" or (executor == "local" and _count(workers, n_tasks) <= 1):
        return "inline"
    return "local" if executor == "local" else "dask"


def make_executor(executor, workers: int | None, n_tasks: int, resources: dict | None = None):
    """The runner for a checked ``executor`` and ``workers``; one worker per core by default."""
    n = _count(workers, n_tasks)
    if kind(executor, workers, n_tasks) == "inline":
        return Inline()
    if executor == "local":
        return Local(n)
    if executor == "dask":
        return Dask(None, max(1, n), resources)
    return Dask(executor, resources=resources)
