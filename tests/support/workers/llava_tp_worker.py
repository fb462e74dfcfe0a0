"""torchrun worker (2 ranks, gloo) for tests/distributed/test_upcycle_llava_tp.py; holds no tests.

Builds a dense LLaVA at TP=2 (Megatron shards every ViT, projector and language-model linear) and
saves it both ways Megatron-LM does: ``--ckpt-format torch`` (one ``mp_rank_0R/model_optim_rng.pt``
per rank, as upstream's ``pretrain_vlm.py`` requires) and ``torch_dist``. Rank 0 writes the
logits of the TP=2 model for the test's prompts; the conversions and comparisons run in the test.
"""

import argparse
import os


def main():
    import torch
    import torch.distributed as dist

    from support.llava import build_llava, llava_args, llava_logits, prompts, save_legacy
    from support.megatron_cpu import init_torchrun
    from support.upcycle import save_megatron_lm

    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    opts = p.parse_args()
    init_torchrun(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    torch.manual_seed(0)
    args = llava_args(tp=2)
    model = build_llava(args, tp=2, parallel_output=False)
    images, tokens = prompts()
    logits = llava_logits(model, images, tokens)
    save_legacy(model, os.path.join(opts.workdir, "legacy"), args, tp_rank=rank)
    dist_dir = os.path.join(opts.workdir, "dist")
    if rank == 0:
        os.makedirs(dist_dir)
    dist.barrier()
    save_megatron_lm(model, dist_dir, args)
    if rank == 0:
        torch.save(logits, os.path.join(opts.workdir, "tp2_logits.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
