"""A dense LLaVA saved at TP=2 by Megatron (one torchrun launch, 2 ranks, gloo; see
tests/support/workers/llava_tp_worker.py), upcycled from both formats Megatron-LM writes: the legacy
per-rank ``torch`` files (TP shards concatenated, SwiGLU fc1 de-interleaved per rank) and
``torch_dist``. The reference is Megatron's own reassembly: the TP=2 torch_dist checkpoint loaded by
a TP=1 dense LLaVA through dist_checkpointing."""

import os

import pytest
import torch
from support.common import torchrun
from support.llava import build_llava, llava_logits, prompts, vision_state
from support.upcycle import load_megatron_lm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # one ~40 s torchrun launch

# fp32: the TP=2 model sums each row-parallel product in two halves (an all-reduce), the TP=1 MoE in
# one: measured 3.0e-6 on logits up to 3.9; a wrong concatenation moves them by O(1).
ATOL = 1e-5


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    from support.megatron_cpu import init_single_process

    work = tmp_path_factory.mktemp("llava_tp2")
    proc = torchrun("llava_tp_worker.py", "--workdir", str(work), nproc=2, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun failed rc={proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    init_single_process()
    args = torch.load(
        work / "legacy" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
    )["args"]
    reference = build_llava(args)
    load_megatron_lm(reference, str(work / "dist"))
    return work, reference, torch.load(work / "tp2_logits.pt")


def _moe(path):
    args = torch.load(os.path.join(path, "release", "common.pt"), weights_only=False)["args"]
    model = build_llava(args)
    load_megatron_lm(model, str(path))
    return model


@pytest.mark.parametrize("fmt", ["legacy", "dist"])
def test_tp2_llava_upcycles_exactly(tp2, tmp_path, fmt):
    from megatron_dpsl.upcycle import upcycle

    work, reference, tp2_logits = tp2
    images, tokens = prompts()
    assert (llava_logits(reference, images, tokens) - tp2_logits).abs().max().item() <= ATOL
    upcycle(
        work / fmt,
        tmp_path / "moe",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        weight_scaling="exact",
        progress=False,
    )
    moe = _moe(tmp_path / "moe")
    got, want = vision_state(moe), vision_state(reference)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    assert (llava_logits(moe, images, tokens) - tp2_logits).abs().max().item() <= ATOL
