"""``python tests/cpu_launch.py SCRIPT ARGS...``: run SCRIPT as ``__main__`` (under torchrun or
``accelerate launch``) with two CPU-only adjustments, so that the scale tests run the documented
commands on a CPU machine:

- DeepSpeed would JIT-build its shared-memory all-reduce op on first use (25 s to minutes; gloo does
  the job): marked unavailable, as ``synpo train`` does on CPU (``synpo.train.engine``).
- accelerate enables FSDP only on accelerator devices: on CPU a ``--fsdp`` run silently trains under
  DDP. The plugin is switched on for the CPU state too, so FSDP2 (``fully_shard``, which runs on CPU
  over gloo) really wraps the model. FSDP1 cannot run on CPU (torch: "FSDP needs a non-CPU
  accelerator device").
"""

from __future__ import annotations

import os
import runpy
import sys


def skip_deepspeed_shm_op() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def enable_fsdp_on_cpu() -> None:
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both singletons: every later AcceleratorState() copies PartialState's type over its own.
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = patched


if __name__ == "__main__":
    # The deepspeed launcher passes --local_rank=N first: it goes to the script's arguments.
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank=")]
    script, *args = [a for a in sys.argv[1:] if a not in local_rank]
    args += local_rank
    if "--deepspeed" in args or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        skip_deepspeed_shm_op()
    if "--fsdp" in args:
        enable_fsdp_on_cpu()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
