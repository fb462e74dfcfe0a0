"""torchrun worker (2 ranks, gloo) for tests/distributed/test_upcycle_distributed.py; holds no
tests.

1. Build a dense GPT with TP=2 and save it Megatron-LM style (a TP-sharded source layout).
2. Rank 0 upcycles it (exact, E=4, G=2, top-2).
3. Reference: TP=1/EP=1 MoE model (no communication: the unsharded single-process computation)
   loads the output; logits, gradients and 3 Adam steps on the full batch.
4. EP=2: the same checkpoint loaded with 2 experts per rank; each rank takes half the batch;
   non-expert gradients are averaged over ranks and expert gradients halved (they already sum both
   ranks' tokens through the dispatcher), which is the gradient of the global mean loss.
Writes one JSON record on rank 0.
"""

import argparse
import json
import os
import re


def main():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from support.megatron_cpu import init_torchrun
    from support.upcycle import (
        build_gpt,
        causal_mask,
        dense_args,
        gpt_logits,
        load_megatron_lm,
        moe_training_model,
        save_megatron_lm,
        train_steps,
    )

    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    E = 4
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(11))
    rec = {}

    # 1. dense, TP=2
    init_torchrun(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    torch.manual_seed(0)
    args = dense_args()
    dense = build_gpt(args, parallel_output=False)
    dense_logits = gpt_logits(dense, tokens)
    src, dst = os.path.join(opts.workdir, "dense_tp2"), os.path.join(opts.workdir, "moe")
    if rank == 0:
        os.makedirs(src)
    dist.barrier()
    save_megatron_lm(dense, src, args)

    # 2. convert (single process: the converter needs no process group)
    if rank == 0:
        from megatron_dpsl.upcycle import upcycle

        upcycle(
            src,
            dst,
            num_experts=E,
            granularity=2,
            moe_router_topk=2,
            weight_scaling="exact",
            progress=False,
        )
    dist.barrier()
    margs = torch.load(os.path.join(dst, "release", "common.pt"), weights_only=False)["args"]

    def loss_and_grads(model, toks):
        model.train()
        b, s = toks.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        loss = model(toks, pos, causal_mask(s), labels=torch.roll(toks, -1, dims=1)).float().mean()
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    # 3. reference: EP=1, TP=1 (no communication), full batch
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    ref, router_name = moe_training_model(margs, dpsl_coeff=0.0)
    load_megatron_lm(ref, dst)
    ref_logits = gpt_logits(ref, tokens)
    ref_loss, ref_grads = loss_and_grads(ref, tokens)
    ref_train, _ = moe_training_model(margs, dpsl_coeff=0.0)
    load_megatron_lm(ref_train, dst)
    ref_losses = train_steps(ref_train, tokens, steps=3)

    # 4. EP=2
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=2, expert_tensor_parallel_size=1
    )
    ep, _ = moe_training_model(margs, dpsl_coeff=0.0)
    load_megatron_lm(ep, dst)
    ep_logits = gpt_logits(ep, tokens)
    half = tokens[rank : rank + 1]
    ep_loss, ep_grads = loss_and_grads(ep, half)

    def expert_global(name):
        m = re.search(r"local_experts\.(\d+)\.", name)
        return (
            None
            if m is None
            else name.replace(m.group(0), f"local_experts.{rank * E // 2 + int(m.group(1))}.")
        )

    def sync(grads):
        out = {}
        for n, g in grads.items():
            gname = expert_global(n)
            if gname is None:
                g = g.clone()
                dist.all_reduce(g)
                out[n] = g / 2
            else:
                out[gname] = g / 2
        return out

    synced = sync(ep_grads)
    local = (
        max((synced[n] - ref_grads[n]).abs().max().item() for n in synced),
        min(ref_grads[n].abs().max().item() for n in synced),
        sorted(synced),
    )
    gathered = [None, None]
    dist.all_gather_object(gathered, local)  # each rank holds half of the experts
    grad_diff = max(g[0] for g in gathered)
    min_ref = min(g[1] for g in gathered)
    covered = set(gathered[0][2]) | set(gathered[1][2])
    loss = ep_loss.clone()
    dist.all_reduce(loss)

    ep_train, _ = moe_training_model(margs, dpsl_coeff=0.0)
    load_megatron_lm(ep_train, dst)

    def grad_hook(model):
        for n, p in model.named_parameters():
            if expert_global(n) is None:
                dist.all_reduce(p.grad)
            p.grad /= 2

    def loss_hook(value):
        value = value.clone()
        dist.all_reduce(value)
        return value.item() / 2

    ep_losses = train_steps(ep_train, half, steps=3, grad_hook=grad_hook, loss_hook=loss_hook)
    dpsl_losses = None
    if router_name != "TopKRouter":  # the DPSL loss on: training still runs under EP=2
        dp_model, _ = moe_training_model(margs, dpsl_coeff=0.01)
        load_megatron_lm(dp_model, dst)
        dpsl_losses = train_steps(dp_model, half, steps=3, grad_hook=grad_hook, loss_hook=loss_hook)

    rec = dict(
        router=router_name,
        source_tp2_dense_vs_ep1_moe_logits=(ref_logits - dense_logits).abs().max().item(),
        ep2_vs_ep1_logits=(ep_logits - ref_logits).abs().max().item(),
        ep2_vs_dense_logits=(ep_logits - dense_logits).abs().max().item(),
        loss_diff=abs(loss.item() / 2 - ref_loss.item()),
        grad_diff=grad_diff,
        min_ref_grad=min_ref,
        n_grads=len(covered),
        n_ref_grads=len(ref_grads),
        all_grads_compared=covered == set(ref_grads),
        ref_losses=ref_losses,
        ep_losses=ep_losses,
        dpsl_losses=dpsl_losses,
    )
    if rank == 0:
        with open(opts.out, "w") as f:
            json.dump(rec, f)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
