"""torchrun worker for tests/unit/parallel/test_token_gather.py: ``gather_for_loss`` at world size 2
(gloo, CPU).

Imports no Megatron (a launch costs ~3 s). Every rank rebuilds every rank's input from its seed,
so it can check the gathered tensor and its own gradient exactly; it writes one JSON record per
case (``--out`` + ``.rank{r}``).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_dpsl.parallel.token_gather import fixed_size_plan, gather_for_loss, plan_gather


def rows_of(rank: int, num_rows: int) -> torch.Tensor:
    return torch.randn(
        num_rows, 3, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64
    )


def run_case(name, sizes, replica_ids, grad_scale, planned):
    rank, world = dist.get_rank(), dist.get_world_size()
    x = rows_of(rank if replica_ids is None else replica_ids[rank], sizes[rank]).requires_grad_(
        True
    )
    if planned:
        plan = plan_gather(
            sizes[rank],
            dist.group.WORLD,
            replica_id=None if replica_ids is None else replica_ids[rank],
        )
    else:
        plan = fixed_size_plan(sizes[rank], dist.group.WORLD)
    y = gather_for_loss(x, dist.group.WORLD, plan=plan, grad_scale=grad_scale)
    # the expected forward: kept ranks' rows, in rank order (a rank holding a replica it shares
    # with an earlier rank is left out)
    ids = list(range(world)) if replica_ids is None else replica_ids
    kept = [r for r in range(world) if ids[r] not in ids[:r]]
    expected = torch.cat([rows_of(ids[r], sizes[r]) for r in kept])
    weights = torch.arange(1, expected.numel() + 1, dtype=torch.float64).reshape(expected.shape)
    (weights * y).sum().backward()  # d loss / d y = weights, identical on every rank
    # the expected backward: the weights of this rank's rows (of the kept copy of them) × grad_scale
    slot = next(r for r in kept if ids[r] == ids[rank])
    offset = sum(sizes[r] for r in kept if r < slot)
    expected_grad = grad_scale * weights[offset : offset + sizes[rank]]
    return {
        "name": name,
        "rank": rank,
        "shape": list(y.shape),
        "expected_shape": list(expected.shape),
        "forward_max_diff": float((y.detach() - expected).abs().max()),
        "grad_max_diff": float((x.grad - expected_grad).abs().max()),
        # what a reduce-scatter backward (the usual all-gather adjoint) would have given
        "reduce_scatter_grad_diff": float(
            (x.grad - world * weights[offset : offset + sizes[rank]]).abs().max()
        ),
        "keep": plan.keep,
        "my_slot": plan.my_slot,
    }


CASES = [
    # name, sizes per rank, replica ids (None: all different), grad_scale, sizes exchanged
    ("equal_sizes", [4, 4], None, 1.0, False),
    ("equal_sizes_scaled", [4, 4], None, 3.0, False),
    ("different_sizes", [2, 5], None, 1.0, True),
    ("replicas_deduplicated", [4, 4], [7, 7], 3.0, True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    records = [run_case(*case) for case in CASES]
    with open(f"{out}.rank{dist.get_rank()}", "w", encoding="utf-8") as f:
        json.dump(records, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
