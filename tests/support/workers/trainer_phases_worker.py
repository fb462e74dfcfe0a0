"""torchrun worker: the embedded trainer's phases, one after another in one launch.

``PHASES.json`` maps a phase name to a full trainer command line; the phases run one after another
in this launch (one launch: ~15 s of megatron-core import). After each phase every rank writes
``OUT/{phase}_rank{R}.pt``: its losses, its routing statistics (rank 0), its expert- and
pipeline-parallel ranks and its parameters under the whole model's names (layers by their global
number), so a test can put the ranks together and compare them with a one-process reference run.
Used by tests/distributed/test_trainer_pipeline.py (one torchrun, 2 ranks) and
tests/unit/train/test_trainer.py::test_multinode_c10d_two_agents_train_and_agree (two torchrun
agents of one process each, joined through the c10d rendezvous on 127.0.0.1):

    torchrun --nproc-per-node 2 tests/support/workers/trainer_phases_worker.py OUT PHASES.json
    torchrun --nnodes 2 --node-rank N --nproc-per-node 1 --rdzv-backend c10d \
        --rdzv-endpoint HOST:PORT tests/support/workers/trainer_phases_worker.py OUT PHASES.json

Nothing of the trainer is replaced: it runs as a user's ``torchrun -m megatron_dpsl.train.trainer``
does (on CPU through ``megatron_dpsl.train.cpu_platform``).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_dpsl.train.arguments import parse_args
from megatron_dpsl.train.trainer import pretrain, shutdown


def whole_model_name(chunk, name: str) -> str:
    """The one-stage model's name of ``chunk``'s parameter ``name``: a stage's layers count from 0,
    the whole model's from the stage's offset; a tied output layer on the last stage is the first
    stage's word embedding."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


def stage_parameters(chunks) -> dict[str, torch.Tensor]:
    return {
        whole_model_name(chunk, name): p.detach().clone()
        for chunk in chunks
        for name, p in chunk.named_parameters()
    }


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
                    "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                    "num_chunks": len(result.model_chunks),
                    "train_losses": result.train_losses,
                    "valid_losses": result.valid_losses,
                    "aux_losses": result.aux_losses,
                    "routing_history": result.routing_history,
                    "params": stage_parameters(result.model_chunks),
                },
                os.path.join(out, f"{name}_rank{dist.get_rank()}.pt"),
            )
    finally:
        shutdown()
