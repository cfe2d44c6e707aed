"""``python tests/fsdp_on_cpu.py train ...`` = ``python -m dlqat train ...`` with Accelerate's FSDP2 on CPU.

Accelerate turns ``ACCELERATE_USE_FSDP=true`` into FSDP only on accelerators (GPU, XPU, ...); on CPU
processes it stays plain DDP. torch's ``fully_shard`` itself runs on CPU over gloo, so for the tests
this launcher does what ``AcceleratorState`` does on a GPU (distributed type FSDP, the plugin from
the environment, its mixed precision); everything after it is Accelerate's and dlqat's own FSDP2
code path: ``fsdp2_prepare_model``, sharded parameters, gathered checkpoints.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_as_on_a_gpu(self, *args, **kwargs):
    _accelerator_state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":  # the rest of that branch of AcceleratorState.__init__
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does


AcceleratorState.__init__ = _init_as_on_a_gpu

if __name__ == "__main__":
    sys.argv = ["dlqat", *sys.argv[1:]]
    runpy.run_module("dlqat", run_name="__main__")
