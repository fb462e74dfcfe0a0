"""What the torchrun exactness workers (dpsl, ac, regularizer) share: the one-rank reference groups,
Megatron's CP slicing, and the run-every-layout main loop. Imported by the workers, not a test."""

from __future__ import annotations

import argparse
import inspect
import json
import traceback

import torch
import torch.distributed as dist

from support.megatron_cpu import init_torchrun


def singleton_pg_collection(world):
    """One-rank groups for the unsharded reference (created collectively, once)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    mine = None
    for r in range(world):
        g = dist.new_group([r])
        if r == dist.get_rank():
            mine = g
    return ProcessGroupCollection(
        tp=mine, cp=mine, tp_cp=mine, tp_dp_cp=mine, ep=mine, dp=mine, dp_cp=mine
    )


def cp_slice(t_bs, cp_group):
    """This CP rank's load-balanced slice of ``t_bs`` ``[b, s, ...]`` (Megatron's
    ``get_batch_on_this_cp_rank``)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    # megatron-core 0.19 added a required is_hybrid_cp (False: plain CP)
    extra = (
        {"is_hybrid_cp": False}
        if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
        else {}
    )
    return get_batch_on_this_cp_rank({"t": t_bs}, cp_group=cp_group, **extra)["t"]


def with_layout(case: dict, **defaults) -> dict:
    """``case`` over ``defaults`` over the layout defaults (tp = cp = ep = 1); an unset ``etp`` is
    1 with expert parallelism and ``tp`` without (Megatron's usual pairing)."""
    out = dict(tp=1, cp=1, ep=1, etp=None, **defaults)
    out.update(case)
    if out["etp"] is None:
        out["etp"] = 1 if out["ep"] > 1 else out["tp"]
    return out


def init_layout(case: dict) -> None:
    """Megatron's parallel state for the case's tp/cp/ep/etp on the torchrun ranks."""
    init_torchrun(
        tensor_model_parallel_size=case["tp"],
        context_parallel_size=case["cp"],
        expert_model_parallel_size=case["ep"],
        expert_tensor_parallel_size=case["etp"],
    )


def wrap_ddp(config, module):
    """``module`` in Megatron's DDP, with ``config`` told how to finalize and skip grad syncs (what
    Megatron-LM's ``get_model`` and ``setup_model_and_optimizer`` set)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model = DistributedDataParallel(config, DistributedDataParallelConfig(), module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    return model


def main(doc: str, cases: dict, run_case, setup=None) -> None:
    """Run every layout of ``cases[world]`` with ``run_case(case, singleton_pg)``; rank 0 writes
    ``--out``.

    A failing layout is reported as ``{"name", "world", "error"}`` and the others still run.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="JSON file rank 0 writes the per-layout results to"
    )
    parser.add_argument("--only", nargs="*", help="run only these case names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_torchrun()
    if setup is not None:
        setup()
    world = dist.get_world_size()
    singleton_pg = singleton_pg_collection(world)
    results = []
    for case in cases[world]:
        if args.only and case["name"] not in args.only:
            continue
        try:
            rec = run_case(case, singleton_pg)
        except Exception as err:  # report, keep going with the other layouts
            traceback.print_exc()
            rec = dict(name=case["name"], world=world, error=f"{type(err).__name__}: {err}")
        results.append(rec)
        if dist.get_rank() == 0:
            print(json.dumps(rec), flush=True)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
