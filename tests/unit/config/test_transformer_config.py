"""DPSLTransformerConfig: how DPSL is switched on, how it meets Megatron's validation, errors naming
flags."""

from __future__ import annotations

import dataclasses

import pytest

BASE = dict(
    num_layers=1, hidden_size=16, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2
)


def make(**over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    kw = dict(BASE)
    kw.update(over)
    return DPSLTransformerConfig(**kw)


def test_defaults_match_agreed_api():
    c = make()
    assert (c.moe_dpsl_coeff, c.moe_dpsl_alpha, c.moe_dpsl_gather, c.moe_dpsl_log_interval) == (
        0.01,
        1.0,
        "micro_batch",
        100,
    )
    assert c.moe_dpsl_group_alphas is None and c.moe_dpsl_num_groups is None
    assert c.moe_dpsl_alpha_base is None and c.moe_dpsl_alpha_shift is None
    assert not c.moe_dpsl_enabled  # stock default "aux_loss"


def test_new_fields_are_keyword_only():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    fields = {f.name: f for f in dataclasses.fields(DPSLTransformerConfig)}
    assert all(fields[n].kw_only for n in fields if n.startswith("moe_dpsl_"))


@pytest.mark.parametrize(
    "lb_type,coeff",
    [
        ("dpsl", 0.0),
        (["dpsl"], [0.0]),
        (["aux_loss", "dpsl"], [1e-2, 0.0]),
        (["seq_aux_loss", "dpsl"], [1e-3, 0.05]),
        (["dpsl", "global_aux_loss", "aux_loss"], [0.05, 1e-3, 1e-2]),
    ],
)
def test_dpsl_enabled_by_load_balancing_type(lb_type, coeff):
    c = make(moe_router_load_balancing_type=lb_type, moe_aux_loss_coeff=coeff, moe_dpsl_coeff=0.05)
    assert c.moe_dpsl_enabled
    assert (
        c.moe_router_load_balancing_type == lb_type
    )  # the user's value is kept (logs, saved args)
    assert c.moe_aux_loss_coeff == coeff


def test_capacity_factor_accepted_with_dpsl_but_stock_rejects_unknown_type():
    from megatron.core.transformer.transformer_config import TransformerConfig

    make(
        moe_router_load_balancing_type=["aux_loss", "dpsl"],
        moe_aux_loss_coeff=[1e-2, 0.0],
        moe_expert_capacity_factor=1.0,
    )
    # why the hiding is needed: Megatron's own check lists the types capacity dropping supports
    with pytest.raises(ValueError, match="moe_expert_capacity_factor"):
        TransformerConfig(
            **BASE, moe_router_load_balancing_type="dpsl", moe_expert_capacity_factor=1.0
        )


def test_replace_and_revalidate_keeps_dpsl():
    c = make(moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_aux_loss_coeff=[1e-2, 0.0])
    c2 = dataclasses.replace(c, moe_dpsl_coeff=0.2)
    assert c2.moe_dpsl_enabled and c2.moe_dpsl_coeff == 0.2


@pytest.mark.parametrize(
    "over,flag",
    [
        (
            dict(
                moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_aux_loss_coeff=[1e-2, 0.3]
            ),
            "moe_dpsl_coeff",
        ),
        (
            dict(moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_aux_loss_coeff=1e-2),
            "moe_aux_loss_coeff",
        ),
        (
            dict(moe_router_load_balancing_type=["dpsl", "dpsl"], moe_aux_loss_coeff=[0.0, 0.0]),
            "more than once",
        ),
        (
            dict(
                moe_router_load_balancing_type=["sinkhorn", "dpsl"], moe_aux_loss_coeff=[0.0, 0.0]
            ),
            "sinkhorn",
        ),
        (dict(moe_dpsl_coeff=-1.0), "moe_dpsl_coeff"),
        (dict(moe_dpsl_coeff=float("nan")), "moe_dpsl_coeff"),
        (dict(moe_dpsl_gather="everything"), "moe_dpsl_gather"),
        (dict(moe_dpsl_log_interval=-3), "moe_dpsl_log_interval"),
        (dict(moe_dpsl_alpha_base=0.5), "moe_dpsl_alpha_shift"),
        (
            dict(
                moe_dpsl_alpha_base=0.5,
                moe_dpsl_alpha_shift=1.0,
                moe_dpsl_num_groups=2,
                moe_dpsl_group_alphas=[[1.0] * 4] * 2,
            ),
            "not both",
        ),
        (dict(moe_router_load_balancing_type="dpsl", num_moe_experts=None), "num_moe_experts"),
    ],
)
def test_bad_input_names_the_flag(over, flag):
    with pytest.raises(ValueError, match=flag):
        make(**over)


@pytest.mark.parametrize(
    "over,flag",
    [
        (dict(moe_dpsl_alpha=-1.0), "moe_dpsl_alpha"),
        (dict(moe_dpsl_alpha=[1.0, 1.0]), "moe_dpsl_alpha"),
        (dict(moe_dpsl_group_alphas=[[1.0, 1.0, 1.0]]), "moe_dpsl_group_alphas"),
        (
            dict(moe_dpsl_alpha_base=0.5, moe_dpsl_alpha_shift=1.0, moe_dpsl_num_groups=3),
            "moe_dpsl_",
        ),
    ],
)
def test_bad_prior_names_the_flag(over, flag):
    pytest.importorskip("megatron_dpsl.losses.priors")
    with pytest.raises(ValueError, match=flag):
        make(moe_router_load_balancing_type="dpsl", **over)


def test_prior_resolved_from_fields():
    pytest.importorskip("megatron_dpsl.losses.priors")
    import torch

    assert torch.equal(
        make(moe_dpsl_alpha=0.75).dpsl_alpha(), torch.full((4,), 0.75, dtype=torch.float64)
    )
    g = make(moe_dpsl_alpha_base=0.5, moe_dpsl_alpha_shift=1.0, moe_dpsl_num_groups=2).dpsl_alpha()
    assert g.shape == (2, 4) and g[0, 0] == 1.5 and g[0, 3] == 0.5 and g[1, 3] == 1.5
