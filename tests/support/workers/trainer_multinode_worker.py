"""torchrun worker for
tests/unit/train/test_trainer.py::test_multinode_c10d_two_agents_train_and_agree.

Each "node" is its own torchrun agent (1 process) joined through the c10d rendezvous on 127.0.0.1.
``PHASES.json`` maps a phase name to a full trainer command line; the phases run one after another
in this launch (one launch: ~15 s of megatron-core import each). After each phase every rank writes
its losses and its parameters to ``OUT/{phase}_rank{R}.pt`` so the test can check that the ranks
agree with each other and with a one-process reference run.

    torchrun --nnodes 2 --node-rank N --nproc-per-node 1 --rdzv-backend c10d \
        --rdzv-endpoint HOST:PORT tests/support/workers/trainer_multinode_worker.py OUT PHASES.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_dpsl.train.arguments import parse_args
from megatron_dpsl.train.trainer import pretrain, shutdown

if __name__ == "__main__":
    out, phases_path = sys.argv[1], sys.argv[2]
    with open(phases_path) as f:
        phases = json.load(f)
    try:
        for name, argv in phases.items():
            result = pretrain(parse_args(argv))
            from megatron.core import parallel_state

            torch.save(
                {
                    "rank": dist.get_rank(),
                    "world_size": dist.get_world_size(),
                    "ep_rank": parallel_state.get_expert_model_parallel_rank(),
                    "train_losses": result.train_losses,
                    "aux_losses": result.aux_losses,
                    "params": {n: p.detach().clone() for n, p in result.model.named_parameters()},
                },
                os.path.join(out, f"{name}_rank{dist.get_rank()}.pt"),
            )
    finally:
        shutdown()
