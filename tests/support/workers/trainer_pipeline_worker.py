"""torchrun worker for tests/distributed/test_trainer_pipeline.py: the embedded trainer under
pipeline stages.

``PHASES.json`` maps a phase name to a full trainer command line (``--pipeline-model-parallel-size
2``, with or without virtual stages and recompute); the phases run one after another in this launch
(one launch: ~15 s of megatron-core import). After each phase every rank writes
``OUT/{phase}_rank{R}.pt``: its losses, its routing statistics (rank 0) and its stage's parameters
under the whole model's names (layers by their global number), so the test can put the stages
together and compare them with a one-process, one-stage reference run.

    torchrun --nproc-per-node 2 tests/support/workers/trainer_pipeline_worker.py OUT PHASES.json

Nothing of the trainer is replaced: it runs Megatron's own schedules on CPU through
``megatron_dpsl.train.cpu_platform``, as a user's ``torchrun -m megatron_dpsl.train.trainer`` does.
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
