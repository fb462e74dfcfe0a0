"""Patched Megatron-LM on a middle pipeline stage with group priors (issue 21): the stage builds the
datasets, and upstream's ``forward_step`` gives its routers the ids of each micro-batch it runs,
although ``get_batch`` gives a middle stage no batch.

The report comes from the chain child (tests/support/megatron_lm_stage.py, its replaced leaves
named there): the tree's own ``is_dataset_built_on_rank`` and ``forward_step`` on a real middle
model chunk (the launcher's builder, DPSL routers), three micro-batches from a blend whose samples
come from datasets 1, 0, 1, compared with the same chunk run inside ``dpsl_token_groups`` with
those ids.
"""

from __future__ import annotations


def _report(megatron_lm_reports):
    report = megatron_lm_reports["patched"]["middle_stage"]
    assert "error" not in report, report.get("error")
    return report


def test_every_stage_builds_the_datasets_with_group_priors_only(megatron_lm_reports):
    report = _report(megatron_lm_reports)
    assert report["dataset_built_with_groups"] is True
    assert report["dataset_built_without_groups"] is False  # upstream's rule otherwise


def test_middle_stage_routers_get_their_micro_batch_ids(megatron_lm_reports):
    report = _report(megatron_lm_reports)
    logged, expected = report["forward_step"], report["expected"]
    assert len(logged) == 3 and all(per_layer is not None for per_layer in logged)
    # the same fp32 ops on the same stage input and ids: the same values; the samples of datasets 1
    # and 0 give different losses (the test can tell the ids apart)
    assert logged == expected
    assert expected[0] != expected[1] and expected[0] == expected[2]
    assert report["samples_left"] == 0  # one sample read per micro-batch, none skipped
