"""LLaVA modality ids under TP+SP and CP (sbhd): torchrun (gloo, CPU) against ``LLaVAModel``'s own
sharding.

One launch per world size (the worker, ``tests/support/workers/llava_sharding_worker.py``, runs
every layout of ``CASES[world]``): marker embeddings go through ``LLaVAModel._preprocess_data`` and
``_process_embedding_token_parallel``; the rows each rank keeps must carry the ids and padding flags
the modality hook set, as ``DPSLRouter`` shards them. Marked slow (~15 s per launch on 2 cores):
``pytest -m slow tests/distributed/test_llava_sharding.py``.
"""

from __future__ import annotations

import importlib.metadata

import pytest
from support.common import records_per_world
from support.workers.llava_sharding_worker import CASES  # plain data, imports no Megatron

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CORE = tuple(int(x) for x in importlib.metadata.version("megatron-core").split(".")[:2])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return records_per_world(tmp_path_factory, "llava_sharding_worker.py")


@pytest.mark.parametrize("variant", ["even", "uneven"])
@pytest.mark.parametrize(
    "world,name", [(w, c["name"]) for w in sorted(CASES) for c in CASES[w]], ids=lambda v: str(v)
)
def test_router_ids_follow_llava_sharding(results, world, name, variant):
    rec = results(world)[name]
    assert "error" not in rec, rec.get("error")
    got = rec[variant]
    if "megatron_asserts" in got:
        # megatron-core 0.16 asserts the combined length divides the shard factor (0.19 pads it)
        assert variant == "uneven" and CORE < (0, 19), got
        return
    print(f"\n{world} ranks {name} {variant}: {got}")
    assert got["llava_rows"] == got["router_ids"]
    assert got["id_mismatches"] == [0] * world and got["pad_mismatches"] == [0] * world
    # every rank holds rows, and image and padding rows occur: the comparison can fail
    assert min(got["llava_rows"]) > 0 and sum(got["image_rows"]) > 0 and sum(got["pad_rows"]) > 0
