"""pytest configuration of the micro benchmarks (``pytest benchmarks/ --benchmark-only``).

Not part of the default test run (``testpaths = tests``). Same environment as the test suite: the
Triton interpreter without a CUDA device (set before any kernel module is imported), offline Hub.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One thread: steadier numbers on shared CI machines, so that comparisons between commits mean
# something (see synpo.benchmarking.kernels.Preset.threads).
torch.set_num_threads(int(os.environ.get("SYNPO_BENCH_THREADS", "1")))
