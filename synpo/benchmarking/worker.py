"""Worker process of :mod:`synpo.benchmarking.runner`: ``python -m synpo.benchmarking.worker <kind>``.

Reads ``{"settings": ..., "tasks": [...]}`` on stdin and runs the tasks in order. The protocol goes
to a private copy of stdout; the process's own stdout is pointed at stderr, so that anything a
library prints cannot corrupt it. An exception inside a task becomes that task's ``failed`` result
(out-of-memory errors are handled by the task code and reported as ``oom``). After a CUDA error that
leaves the context unusable the worker stops, and the runner continues in a fresh process.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

from synpo.benchmarking.runner import RESULT_PREFIX, START_PREFIX

# The benchmark modules whose ``run_task`` a worker runs.
KINDS = ("kernels", "trainer", "quality")


def _executor(kind: str):
    if kind not in KINDS:
        raise SystemExit(f"unknown benchmark kind {kind!r}")
    return importlib.import_module(f"synpo.benchmarking.{kind}").run_task


def main() -> int:
    kind = sys.argv[1]
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.loads(sys.stdin.read())
    run = _executor(kind)
    context: dict = {}  # per-process state shared by the tasks (inputs, compiled functions ...)
    for index, task in enumerate(spec["tasks"]):
        protocol.write(f"{START_PREFIX}{index}\n")
        try:
            result = run(task, spec["settings"], context)
        except Exception as exc:
            traceback.print_exc()
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {first}"}
        protocol.write(RESULT_PREFIX + json.dumps({"_index": index, **result}, default=str) + "\n")
        if result.get("status") == "failed" and _context_broken(result.get("reason", "")):
            break  # later tasks need a fresh process; the runner starts one for them
    protocol.close()
    return 0


# CUDA errors after which a process's context is unusable (every later call would fail too).
_STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "CUDA error",
)


def _context_broken(reason: str) -> bool:
    return any(text in reason for text in _STICKY_CUDA_ERRORS) and "out of memory" not in reason


if __name__ == "__main__":
    sys.exit(main())
