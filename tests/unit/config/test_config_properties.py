"""Property-based test (Hypothesis) of ``DPSLTransformerConfig``, the one validator: generated MoE
and DPSL fields either build a config whose values are usable (1 <= top-k <= E, a finite λ >= 0, a
finite positive prior of E columns) or raise a one-line ``ValueError`` that starts with the name of
a field that was set (or its partner); never a bare assertion or a crash inside Megatron.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.properties import bounded

from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
from megatron_dpsl.megatron_lm.args import flag_for_field

reals = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0, -1.0]),
)
TYPES = ["aux_loss", "dpsl", ["aux_loss", "dpsl"], "none", ["dpsl", "variance"], "dpsl_typo"]

PARTNERS = {"moe_router_load_balancing_type", "moe_aux_loss_coeff"}
FIELDS = [f.name for f in dataclasses.fields(DPSLTransformerConfig)]

optional_fields = st.fixed_dictionaries(
    {},
    optional={
        "moe_aux_loss_coeff": st.one_of(reals, st.lists(reals, min_size=1, max_size=3)),
        "moe_dpsl_coeff": st.one_of(st.none(), reals),
        "moe_dpsl_alpha": st.one_of(reals, st.lists(reals, min_size=1, max_size=9)),
        "moe_dpsl_log_interval": st.integers(-2, 5),
        "moe_dpsl_gather": st.sampled_from(["micro_batch", "global_batch", "everything"]),
    },
)


@st.composite
def fields(draw):
    """The MoE shape (top-k mostly in range, sometimes just outside), the load-balancing types and
    any of the DPSL fields."""
    E = draw(st.sampled_from([1, 2, 4, 8]))
    topk = draw(st.one_of(st.integers(1, E), st.sampled_from([-1, 0, E + 1, 10])))
    return {
        "num_moe_experts": E,
        "moe_router_topk": topk,
        "moe_router_load_balancing_type": draw(st.sampled_from(TYPES)),
        "moe_router_pre_softmax": draw(st.booleans()),  # Megatron's top-1 needs it
        **draw(optional_fields),
    }


@bounded(300)
@given(fields())
def test_config_is_usable_or_names_a_field(kw):
    try:
        config = DPSLTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, **kw)
    except ValueError as err:
        message = str(err)
        assert len(message.splitlines()) == 1, message
        named = message.split(":")[0].split(" ")[0]
        # ours lead with the field to change: one that was set, or its partner
        # (moe_aux_loss_coeff's length follows the load-balancing types); Megatron's own checks
        # (TransformerConfig.__post_init__) name a field or its flag somewhere in the sentence
        ours = named in kw or named in PARTNERS
        assert ours or any(n in message or flag_for_field(n) in message for n in FIELDS), message
        return
    E = config.num_moe_experts
    assert 1 <= config.moe_router_topk <= E
    if config.moe_dpsl_enabled:
        assert E >= 2
        lam = config.moe_dpsl_coeff
        assert isinstance(lam, float) and math.isfinite(lam) and lam >= 0
        prior = config.dpsl_alpha()
        assert prior.shape[-1] == E and torch.isfinite(prior).all() and (prior > 0).all()


@pytest.mark.parametrize("topk", [0, -1, 5, 2.0, True])
def test_topk_outside_one_to_num_experts_names_the_field(topk):
    with pytest.raises(ValueError, match=r"^moe_router_topk: must be an int in \[1, num_moe"):
        DPSLTransformerConfig(
            num_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            num_moe_experts=4,
            moe_router_topk=topk,
        )
