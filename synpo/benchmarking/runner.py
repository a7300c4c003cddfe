"""Runs measurement tasks in worker processes, so that one failure never ends a sweep.

A task is a JSON-able dict with a ``group`` key. ``isolation`` decides how tasks share processes:

- ``"task"``: a fresh process per task;
- ``"group"``: one process per group (e.g. one implementation of one op: its own peak RSS, its own
  imports), running that group's tasks in order;
- ``"none"``: one process for everything (GPU: peak memory comes from the CUDA allocator's own
  statistics, so processes need not be separate, and start-up/compilation is paid once).

A worker that crashes, is killed (out of host memory) or exceeds the per-task time-out gets that task
recorded as failed/timed out, and a new worker continues with the rest. ``budget_s`` bounds the whole
sweep: tasks left when it runs out are recorded as skipped. Progress: a tqdm bar on a terminal, one
line per task otherwise (CI logs).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

RESULT_PREFIX = "@@RESULT "
START_PREFIX = "@@START "


def _batches(tasks: list[dict], isolation: str) -> list[list[int]]:
    if isolation == "task":
        return [[i] for i in range(len(tasks))]
    if isolation == "none":
        return [list(range(len(tasks)))] if tasks else []
    if isolation != "group":
        raise ValueError(f"isolation: expected 'task', 'group' or 'none', got {isolation!r}")
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(str(task.get("group", i)), []).append(i)
    return list(groups.values())


def _stderr_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-400:]


class _Progress:
    def __init__(self, total: int, desc: str):
        self.total = total
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.desc = desc

    def running(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=True)

    def finished(self, label: str, summary: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"[{self.desc} {self.done}/{self.total}] {label}: {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _kill(proc: subprocess.Popen) -> None:
    """Stop a worker this module started, and its children (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_tasks(
    kind: str,
    tasks: list[dict],
    *,
    settings: dict,
    isolation: str = "group",
    timeout_s: float = 1800.0,
    budget_s: float | None = None,
    describe: Callable[[dict], str] = lambda t: str(t.get("group")),
    summarize: Callable[[dict], str] = lambda r: str(r.get("status")),
    env: dict | None = None,
    desc: str = "bench",
) -> list[dict]:
    """Run ``tasks`` with ``python -m synpo.benchmarking.worker <kind>``; one result dict per task."""
    results: list[dict | None] = [None] * len(tasks)
    progress = _Progress(len(tasks), desc)
    start = time.monotonic()
    proc_env = {**os.environ, **(env or {})}

    def out_of_budget() -> bool:
        return budget_s is not None and time.monotonic() - start > budget_s

    def record(i: int, result: dict) -> None:
        results[i] = result
        progress.finished(describe(tasks[i]), summarize(result))

    previous = None
    if threading.current_thread() is threading.main_thread():
        # A terminated driver unwinds (and stops its worker) instead of dying on the spot.
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for batch in _batches(tasks, isolation):
            pending = list(batch)
            while pending:
                if out_of_budget():
                    for i in pending:
                        record(i, {"status": "skipped", "reason": f"time budget of {budget_s:.0f} s spent"})
                    pending = []
                    break
                pending = _run_worker(
                    kind, tasks, pending, settings, timeout_s, out_of_budget, budget_s, record, progress,
                    describe, proc_env,
                )  # fmt: skip
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [r if r is not None else {"status": "skipped", "reason": "not run"} for r in results]


def _run_worker(
    kind, tasks, pending, settings, timeout_s, out_of_budget, budget_s, record, progress, describe, env
) -> list[int]:
    """One worker over ``pending`` task indices; returns the indices still to run (after a crash)."""
    payload = json.dumps({"settings": settings, "tasks": [tasks[i] for i in pending]})
    with tempfile.NamedTemporaryFile("w+", prefix="synpo-bench-", suffix=".log", delete=False) as log:
        log_path = log.name
    proc = None
    try:
        with open(log_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synpo.benchmarking.worker", kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,  # its own process group: a time-out stops its children too
            )
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        proc.stdin.write(payload)
        proc.stdin.close()

        position = 0  # index into pending of the task the worker is on
        in_task = False  # between START and RESULT of pending[position]
        finished = 0  # tasks this worker completed
        started = time.monotonic()
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:  # the worker exited
                break
            if line.startswith(START_PREFIX):
                position = int(line[len(START_PREFIX) :])
                in_task = True
                started = time.monotonic()
                progress.running(describe(tasks[pending[position]]))
            elif line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
                local = result.pop("_index")
                record(pending[local], result)
                position = local + 1
                in_task = False
                finished += 1
                started = time.monotonic()
            if time.monotonic() - started > timeout_s:
                _kill(proc)
                record(pending[position], {"status": "timeout", "reason": f"over {timeout_s:.0f} s"})
                return pending[position + 1 :]
            if out_of_budget():
                _kill(proc)
                reason = f"time budget of {budget_s:.0f} s spent"
                for i in pending[position:]:
                    record(i, {"status": "skipped", "reason": reason})
                return []
        code = proc.wait()
        if position < len(pending) and not in_task and finished:
            # The worker chose to stop between tasks (its CUDA context was unusable): a fresh one
            # runs the rest.
            return pending[position:]
        if position < len(pending):
            if code < 0:
                why = f"worker killed by signal {-code}"
                if -code == signal.SIGKILL:
                    why += " (out of host memory?)"
            else:
                why = f"worker exited with code {code}"
            tail = _stderr_tail(log_path)
            status = "oom" if code == -signal.SIGKILL else "failed"
            record(pending[position], {"status": status, "reason": why + (f": {tail}" if tail else "")})
            return pending[position + 1 :]
        return []
    finally:
        if proc is not None:
            _kill(proc)  # also when the driver itself is interrupted: no orphaned worker
        os.unlink(log_path)
