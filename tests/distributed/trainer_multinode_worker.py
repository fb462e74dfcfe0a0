"""torchrun worker for tests/test_trainer.py::test_multinode_c10d: the embedded trainer on 2 "nodes".

Each node is its own torchrun agent (1 process) joined through the c10d rendezvous on 127.0.0.1.
Trains with the trainer flags passed after ``--``, then every rank writes its losses and its full
parameter vector to ``OUT/rank{R}.pt`` so the test can check that the replicas agree with each other
and with a one-process reference run.
"""

import os
import sys

import torch
import torch.distributed as dist

from megatron_dpsl.train.arguments import parse_args
from megatron_dpsl.train.trainer import pretrain, shutdown

if __name__ == "__main__":
    out = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    try:
        result = pretrain(parse_args(argv))
        rank = dist.get_rank()
        params = {n: p.detach().clone() for n, p in result.model.named_parameters()}
        torch.save(
            {
                "rank": rank,
                "world_size": dist.get_world_size(),
                "node_rank": int(os.environ.get("GROUP_RANK", -1)),
                "train_losses": result.train_losses,
                "valid_losses": result.valid_losses,
                "aux_losses": result.aux_losses,
                "params": params,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        shutdown()
