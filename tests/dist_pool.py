"""A persistent pool of CPU (gloo) process groups for pytest.

Spawning a process group per test costs seconds (every rank imports torch and
usually transformers), so :func:`get_pool` keeps one :class:`RankPool` alive per
world size for the whole pytest session and hands it to every test.

    pool = get_pool(2)
    results = pool.run("tests.my_helpers:check_something", num_tokens=10)   # one entry per rank
    results = pool.run(check_something, num_tokens=10)                    # or a top-level function

Every rank calls ``fn(rank=r, world_size=N, **kwargs)``.  Arguments and return
values travel as plain pickles (no shared memory), so return CPU tensors or
plain Python values.

Failure handling:

* a rank raising -> ``RuntimeError`` whose message holds every failing rank's
  traceback; the pool stays alive if every rank delivered a result, otherwise
  (the healthy ranks are presumably stuck in a collective with the failed one)
  it waits ``error_grace_s`` for them and then kills the pool;
* a rank process dying -> ``RuntimeError``; the pool is killed;
* no complete result within the timeout -> the pool is killed and
  ``TimeoutError`` is raised.

A killed pool is replaced transparently by the next :func:`get_pool` call.
Every job has an id, and results carrying another id are dropped, so a late
answer from an abandoned job can never be taken for a later job's.

This module imports only the standard library at top level, so a worker can set
its thread environment before torch is imported.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback
from typing import Any, Callable

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
_WORKER_PATHS = (_REPO_ROOT, _TESTS_DIR)

_READY_JOB_ID = 0  # job id of the start-up handshake; real jobs are numbered from 1
_POLL_S = 0.1


# --------------------------------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------------------------------


def _resolve(fn_spec: tuple[str, Any]) -> Callable:
    kind, payload = fn_spec
    if kind == "name":
        module_name, _, attr = payload.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    return pickle.loads(payload)


def _snapshot_moe_fx_config() -> Callable[[], None]:
    """If moe_fx.config is loaded and is a torch-style config module, return a callable restoring its current
    values; otherwise a no-op. Belt and braces: jobs are expected to use ``moe_fx.config.patch``."""
    cfg = sys.modules.get("moe_fx.config")
    save = getattr(cfg, "save_config", None)
    load = getattr(cfg, "load_config", None)
    if save is None or load is None:
        return lambda: None
    try:
        saved = save()
    except Exception:
        return lambda: None

    def restore() -> None:
        try:
            load(saved)
        except Exception:
            pass

    return restore


def _worker_main(rank: int, world_size: int, port: int, job_q, result_q, paths: tuple[str, ...], parent_pid: int) -> None:
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    # Children of this worker (e.g. compile sub-processes) must find the repo too.
    py_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(list(paths) + [p for p in py_path if p not in paths])
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}"
        )
    except BaseException:
        result_q.put((_READY_JOB_ID, rank, False, traceback.format_exc()))
        return
    result_q.put((_READY_JOB_ID, rank, True, None))

    while True:
        try:
            msg = job_q.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != parent_pid:  # orphaned: the pytest process is gone
                break
            continue
        if msg is None:
            break
        job_id, fn_spec, kwargs_blob = msg
        restore_config = _snapshot_moe_fx_config()
        try:
            if "torch._dynamo" in sys.modules:  # never imported -> nothing compiled yet -> nothing to reset
                torch._dynamo.reset()
            fn = _resolve(fn_spec)
            kwargs = pickle.loads(kwargs_blob)
            value = fn(rank=rank, world_size=world_size, **kwargs)
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            reply = (job_id, rank, True, blob)
        except BaseException as e:  # noqa: BLE001 - report everything, including SystemExit/KeyboardInterrupt
            reply = (job_id, rank, False, traceback.format_exc())
            if isinstance(e, KeyboardInterrupt):
                result_q.put(reply)
                break
        finally:
            restore_config()
        result_q.put(reply)

    try:
        dist.destroy_process_group()
    except Exception:
        pass
    # Flush our replies, then skip interpreter finalisation (which takes ~1 s with torch loaded).
    try:
        result_q.close()
        result_q.join_thread()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# --------------------------------------------------------------------------------------------------------------------
# caller side
# --------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fn_spec(fn: str | Callable) -> tuple[str, Any]:
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"function reference {fn!r} must look like 'package.module:function'")
        return ("name", fn)
    if not callable(fn):
        raise TypeError(f"fn must be a 'module:function' string or a callable, got {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<locals>" not in qualname and "<lambda>" not in qualname:
        return ("name", f"{module}:{qualname}")
    try:
        return ("pickle", pickle.dumps(fn))
    except Exception as e:
        raise TypeError(f"{fn!r} is not picklable; pass a module-level function or a 'module:function' string") from e


class RankPool:
    """``world_size`` spawned processes forming one gloo process group, kept alive across jobs."""

    def __init__(
        self,
        world_size: int,
        timeout_s: float = 300.0,
        *,
        startup_timeout_s: float = 180.0,
        error_grace_s: float = 10.0,
    ):
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.error_grace_s = error_grace_s
        self._job_ids = itertools.count(1)
        self._procs: list = []
        self._job_qs: list = []
        self._result_q = None
        self._alive = False
        self._stop_requested = False

        last_error: str | None = None
        for _attempt in range(3):  # a free port can be stolen between probing and binding: retry with another
            last_error = self._start()
            if last_error is None:
                return
        raise RuntimeError(f"could not start a RankPool of world size {world_size}:\n{last_error}")

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def _start(self) -> str | None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        port = _free_port()
        self._result_q = ctx.Queue()
        self._job_qs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = []
        # Spawned children inherit sys.path from the parent; make sure the repo root and tests/ are on it.
        for p in reversed(_WORKER_PATHS):
            if p not in sys.path:
                sys.path.insert(0, p)
        for rank in range(self.world_size):
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, self._job_qs[rank], self._result_q, _WORKER_PATHS, os.getpid()),
                name=f"RankPool{self.world_size}-rank{rank}",
                daemon=False,  # workers may need children of their own (compile workers); we reap them ourselves
            )
            proc.start()
            self._procs.append(proc)

        ready: set[int] = set()
        deadline = time.monotonic() + self.startup_timeout_s
        while len(ready) < self.world_size:
            try:
                job_id, rank, ok, info = self._result_q.get(timeout=_POLL_S)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(self._procs) if r not in ready and not p.is_alive()]
                if dead:
                    self._kill()
                    return f"rank(s) {dead} exited during start-up (exit codes {[self._procs[r].exitcode for r in dead]})"
                if time.monotonic() > deadline:
                    self._kill()
                    return f"start-up took longer than {self.startup_timeout_s}s (ready ranks: {sorted(ready)})"
                continue
            if job_id != _READY_JOB_ID:
                continue
            if not ok:
                self._kill()
                return f"rank {rank} failed to initialise:\n{info}"
            ready.add(rank)
        self._alive = True
        return None

    @property
    def alive(self) -> bool:
        return self._alive and not self._stop_requested and all(p.is_alive() for p in self._procs)

    def _kill(self) -> None:
        """Hard stop: kill every worker now."""
        self._alive = False
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5.0)
        self._close_queues()

    def _close_queues(self) -> None:
        for q in [*self._job_qs, self._result_q]:
            if q is None:
                continue
            try:
                q.cancel_join_thread()  # never block interpreter exit on data nobody will read
                q.close()
            except Exception:
                pass
        self._job_qs = []
        self._result_q = None

    def _request_stop(self) -> None:
        if self._alive and not self._stop_requested:
            self._stop_requested = True
            for q in self._job_qs:
                try:
                    q.put(None)
                except Exception:
                    pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown: ask every worker to stop, wait for them, then kill stragglers."""
        if not self._procs:
            return
        if self._alive:
            self._request_stop()
            deadline = time.monotonic() + timeout_s
            for p in self._procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RankPool(world_size={self.world_size}, alive={self.alive}, pids={[p.pid for p in self._procs]})"

    # -- jobs --------------------------------------------------------------------------------------------------------

    def run(self, fn: str | Callable, /, *, _timeout_s: float | None = None, **kwargs) -> list[Any]:
        """Call ``fn(rank=r, world_size=N, **kwargs)`` on every rank; return the per-rank results (index = rank).

        ``fn`` is a ``"package.module:function"`` string or a module-level function. ``_timeout_s`` overrides the
        pool's ``timeout_s`` for this call only.
        """
        if not self.alive:
            raise RuntimeError(f"{self!r} is not alive (killed after an earlier failure); use get_pool() for a new one")
        timeout_s = self.timeout_s if _timeout_s is None else _timeout_s
        spec = _fn_spec(fn)
        try:
            kwargs_blob = pickle.dumps(kwargs, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise TypeError(f"arguments for {fn!r} are not picklable: {e}") from e

        job_id = next(self._job_ids)
        for q in self._job_qs:
            q.put((job_id, spec, kwargs_blob))

        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        grace_deadline: float | None = None
        while len(results) + len(failures) < self.world_size:
            now = time.monotonic()
            if grace_deadline is not None and now > grace_deadline:
                missing = [r for r in range(self.world_size) if r not in results and r not in failures]
                self._kill()
                raise RuntimeError(
                    self._failure_message(fn, failures)
                    + f"\nrank(s) {missing} gave no result within {self.error_grace_s}s of the failure "
                    "(probably blocked in a collective); the pool was killed."
                )
            if now > deadline:
                missing = [r for r in range(self.world_size) if r not in results and r not in failures]
                self._kill()
                msg = (
                    f"{fn!r} on world size {self.world_size}: rank(s) {missing} gave no result within {timeout_s}s; "
                    "the pool was killed"
                )
                if failures:
                    msg += "\n" + self._failure_message(fn, failures)
                raise TimeoutError(msg)
            try:
                got_id, rank, ok, payload = self._result_q.get(timeout=_POLL_S)
            except queue_mod.Empty:
                dead = [
                    r
                    for r, p in enumerate(self._procs)
                    if r not in results and r not in failures and not p.is_alive()
                ]
                if dead:
                    # Drain what the dead rank(s) may still have delivered before declaring them lost.
                    self._drain(job_id, results, failures)
                    for r in dead:
                        if r not in results and r not in failures:
                            failures[r] = f"rank {r} process died (exit code {self._procs[r].exitcode})"
                    self._alive = False  # pool is broken whatever happens next
                    if grace_deadline is None:
                        grace_deadline = time.monotonic() + self.error_grace_s
                continue
            if got_id != job_id:
                continue  # a stale answer from an abandoned job
            self._record(rank, ok, payload, results, failures)
            if failures and grace_deadline is None:
                grace_deadline = time.monotonic() + self.error_grace_s

        if not self._alive:
            self._kill()
        if failures:
            raise RuntimeError(self._failure_message(fn, failures))
        return [results[r] for r in range(self.world_size)]

    def _drain(self, job_id: int, results: dict, failures: dict) -> None:
        while True:
            try:
                got_id, rank, ok, payload = self._result_q.get(timeout=0.5)
            except queue_mod.Empty:
                return
            if got_id == job_id:
                self._record(rank, ok, payload, results, failures)

    @staticmethod
    def _record(rank: int, ok: bool, payload: Any, results: dict, failures: dict) -> None:
        if not ok:
            failures[rank] = payload
            return
        try:
            results[rank] = pickle.loads(payload)
        except Exception:
            failures[rank] = "could not unpickle the result in the caller:\n" + traceback.format_exc()

    def _failure_message(self, fn: Any, failures: dict[int, str]) -> str:
        parts = [f"{fn!r} failed on rank(s) {sorted(failures)} of {self.world_size}:"]
        for r in sorted(failures):
            parts.append(f"\n----- rank {r} -----\n{failures[r].rstrip()}")
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# session-wide cache
# --------------------------------------------------------------------------------------------------------------------

_POOLS: dict[int, RankPool] = {}


def get_pool(world_size: int, **pool_kwargs) -> RankPool:
    """The live pool for ``world_size``; a new one if there is none yet or the previous one was killed.
    ``pool_kwargs`` (timeout_s, error_grace_s, ...) are used only when a pool is created."""
    pool = _POOLS.get(world_size)
    if pool is not None and pool.alive:
        return pool
    if pool is not None:
        pool.close()
    pool = RankPool(world_size, **pool_kwargs)
    _POOLS[world_size] = pool
    return pool


def close_all_pools() -> None:
    for pool in _POOLS.values():  # let every pool wind down concurrently
        try:
            pool._request_stop()
        except Exception:
            pass
    while _POOLS:
        _, pool = _POOLS.popitem()
        try:
            pool.close()
        except Exception:
            pass


atexit.register(close_all_pools)
