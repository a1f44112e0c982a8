"""`hf-eagle3` in each process of `accelerate launch` on the CPU (gloo), for the multi-process tests.

accelerate turns FSDP on only for accelerators: on the CPU it leaves its state at MULTI_CPU (DDP) and the FSDP
options unused. torch runs FSDP2's `fully_shard` over gloo, so when an FSDP plugin is given the state is switched to
FSDP once accelerate has built it; wrapping, sharding, saving and resuming stay accelerate's and transformers' code.

The process leaves with `os._exit`: at interpreter exit, a gloo thread still releasing the tensors of the last
collective makes torch abort at random ("terminate called without an active exception", pytorch/pytorch#190489),
which would fail a run that trained and saved correctly.
"""

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from hf_eagle3.cli import main

build_state = AcceleratorState.__init__


def build_fsdp_state(self, *args, fsdp_plugin=None, **kwargs):
    build_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Later `AcceleratorState()` calls copy the distributed type back from PartialState: switch both.
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = build_fsdp_state

if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
