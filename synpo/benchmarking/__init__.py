"""Benchmarks of synpo-kernels: the kernels against peers, and the trainer with and without a reference.

- :mod:`synpo.benchmarking.kernels`: ``synpo bench kernels`` (token log-probs, fused linear token
  log-probs, fused SynPO loss; forward and forward+backward; time, peak memory, TFLOP/s, % of floor).
- :mod:`synpo.benchmarking.trainer`: ``synpo bench trainer`` (DPO with a reference model vs SynPO,
  naive vs fused loss; steps/s, tokens/s, peak memory per step).
- :mod:`synpo.benchmarking.common`: timing, memory, provenance, result files.
- :mod:`synpo.benchmarking.runner`: runs measurement tasks in worker processes (isolation, progress,
  time-outs, crashes recorded instead of ending the sweep).
- :mod:`synpo.benchmarking.report`, :mod:`~synpo.benchmarking.plots`, :mod:`~synpo.benchmarking.scaling`:
  tables, charts and the ZeRO-3 scaling projection, all computed from the result files.

The package imports neither torch nor the peers at import time, so the CLI stays fast.
"""
