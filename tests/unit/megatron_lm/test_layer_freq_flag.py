"""``--moe-layer-freq`` in Megatron-LM's own parse (the launcher on the unpatched tree, the patched
``pretrain_gpt.py``): ``add_dpsl_args`` gives the flag the bounded parser
(``megatron_dpsl.config.layer_freq``), so Megatron-LM's pattern syntax still parses and the values
its ``eval`` would never finish are refused at the parse, with the flag named.

The cases run in the session's chain children (tests/support/megatron_lm_cases.py, LAYER_FREQS);
replaced leaves as in tests/support/megatron_lm_chain.py.
"""

from __future__ import annotations

import pytest
from support.megatron_lm_cases import LAYER_FREQS


@pytest.mark.parametrize("flavor", ["unpatched", "patched"])
def test_pattern_parses_and_eval_bombs_are_refused(megatron_lm_reports, flavor):
    reports = megatron_lm_reports[flavor]
    ok = reports["layer_freq_pattern"]
    assert ok["ended"] == "boundary", ok.get("stderr") or ok.get("traceback")
    assert ok["args"]["moe_layer_freq"] == [1, 0]
    for name in set(LAYER_FREQS) - {"pattern"}:
        bad = reports[f"layer_freq_{name}"]
        assert bad["ended"] == "exit" and bad["exit_code"] == 2, (name, bad)
        assert "argument --moe-layer-freq" in bad["stderr"], bad["stderr"]
        assert "larger than" in bad["stderr"] or "unexpected '*'" in bad["stderr"], bad["stderr"]
