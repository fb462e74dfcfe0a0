"""The variance/orthogonality types from the config and the command line: coefficients, errors
naming flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_dpsl.megatron_lm.args import (
    REGULARIZER_FLAGS,
    add_dpsl_args,
    add_moe_load_balancing_args,
    dpsl_config_from_args,
)

BASE = dict(
    num_layers=1, hidden_size=16, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2
)
CMD = "--num-layers 1 --hidden-size 16 --num-attention-heads 4 --num-experts 4"


def make(**over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig(**{**BASE, **over})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag, kind in (
        ("--num-layers", int),
        ("--hidden-size", int),
        ("--num-attention-heads", int),
        ("--num-experts", int),
        ("--moe-router-topk", int),
    ):
        p.add_argument(flag, type=kind)
    p.add_argument("--moe-token-dispatcher-type", default="allgather")
    add_moe_load_balancing_args(p)
    return add_dpsl_args(p)


def config_from(cmdline: str):
    return dpsl_config_from_args(parser().parse_args(f"{CMD} {cmdline}".split()))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "types, coeffs, variance, orthogonality",
    [
        (["aux_loss", "dpsl", "variance", "orthogonality"], [1e-3, 0.01, 1e-3, 1e-4], 1e-3, 1e-4),
        ("variance", 0.2, 0.2, 0.0),
        (["orthogonality", "seq_aux_loss"], [3e-4, 1e-3], 0.0, 3e-4),
        ("aux_loss", 1e-2, 0.0, 0.0),
    ],
)
def test_coefficient_is_the_slot(types, coeffs, variance, orthogonality):
    c = make(moe_router_load_balancing_type=types, moe_aux_loss_coeff=coeffs, moe_dpsl_coeff=None)
    assert (c.moe_variance_coeff, c.moe_orthogonality_coeff) == (variance, orthogonality)
    assert c.moe_plugin_enabled == (
        types != "aux_loss"
    )  # the launcher must then build the plugin's spec
    assert (
        c.moe_router_load_balancing_type == types and c.moe_aux_loss_coeff == coeffs
    )  # kept as written
    assert (c.moe_variance_loss_form, c.moe_orthogonality_loss_form) == ("paper", "paper")


def test_megatron_validation_sees_only_its_types():
    # stock TransformerConfig rejects unknown types as soon as capacity dropping is on
    c = make(
        moe_router_load_balancing_type=["aux_loss", "variance", "orthogonality"],
        moe_aux_loss_coeff=[1e-2, 1e-3, 1e-4],
        moe_expert_capacity_factor=1.0,
    )
    c2 = dataclasses.replace(
        c, moe_orthogonality_loss_form="reference_code"
    )  # re-validation keeps working
    assert c2.moe_orthogonality_coeff == 1e-4


@pytest.mark.parametrize(
    "over, message",
    [
        (
            dict(
                moe_router_load_balancing_type=["aux_loss", "variance"],
                moe_aux_loss_coeff=[1e-2, -1e-3],
            ),
            "moe_aux_loss_coeff: the value in variance's slot is its coefficient and must be "
            ">= 0, got -0.001",
        ),
        (
            dict(moe_router_load_balancing_type="orthogonality", moe_aux_loss_coeff=float("nan")),
            "moe_aux_loss_coeff: the value in orthogonality's slot",
        ),
        (
            dict(
                moe_router_load_balancing_type="orthogonality",
                moe_aux_loss_coeff=1e-4,
                moe_router_topk=1,
            ),
            "moe_router_load_balancing_type 'orthogonality' compares the outputs of one "
            "token's k experts: it needs "
            "moe_router_topk >= 2, got 1",
        ),
        (
            dict(
                moe_router_load_balancing_type="orthogonality",
                moe_aux_loss_coeff=1e-4,
                moe_apply_probs_on_input=True,
            ),
            "not compatible with moe_apply_probs_on_input",
        ),
        (
            dict(
                moe_router_load_balancing_type="orthogonality",
                moe_aux_loss_coeff=1e-4,
                moe_token_dispatcher_type="flex",
            ),
            "supports moe_token_dispatcher_type 'allgather' and 'alltoall', got 'flex'",
        ),
        (
            dict(
                moe_router_load_balancing_type="orthogonality",
                moe_aux_loss_coeff=1e-4,
                moe_expert_capacity_factor=1.0,
                moe_pad_expert_input_to_capacity=True,
            ),
            "not supported with moe_pad_expert_input_to_capacity",
        ),
        (
            dict(
                moe_router_load_balancing_type="orthogonality",
                moe_aux_loss_coeff=1e-4,
                cuda_graph_impl="local",
            ),
            "not supported with cuda_graph_impl='local'",
        ),
        (
            dict(
                moe_router_load_balancing_type=["aux_loss", "varianse"],
                moe_aux_loss_coeff=[1e-2, 1e-3],
            ),
            "moe_router_load_balancing_type: unknown type 'varianse'; choose from",
        ),
        (
            dict(
                moe_router_load_balancing_type=["sinkhorn", "variance"],
                moe_aux_loss_coeff=[0.0, 1e-3],
            ),
            "'variance' cannot be combined with 'sinkhorn'",
        ),
        (
            dict(
                moe_router_load_balancing_type="variance",
                moe_aux_loss_coeff=1e-3,
                num_moe_experts=None,
            ),
            "moe_router_load_balancing_type 'variance' needs num_moe_experts",
        ),
        (
            dict(moe_variance_loss_form="code"),
            "moe_variance_loss_form must be one of ['paper', 'reference_code']",
        ),
    ],
)
def test_bad_config_names_the_field(over, message):
    with pytest.raises(ValueError) as info:
        make(**over)
    assert message in str(info.value)


def test_orthogonality_off_needs_none_of_its_requirements():
    # top-1 with a pre-softmax router and the flex dispatcher are fine when the type is not named
    make(
        moe_router_topk=1,
        moe_router_pre_softmax=True,
        moe_token_dispatcher_type="flex",
        moe_router_load_balancing_type=["aux_loss", "variance"],
        moe_aux_loss_coeff=[1e-2, 1e-3],
    )


# --------------------------------------------------------------------------- flags


def test_the_lead_example_command_line():
    c = config_from(
        "--moe-router-load-balancing-type aux_loss dpsl variance orthogonality "
        "--moe-aux-loss-coeff 1e-3 0.01 1e-3 1e-4 --moe-router-topk 2 "
        "--moe-orthogonality-loss-form reference_code"
    )
    assert (c.moe_dpsl_coeff, c.moe_variance_coeff, c.moe_orthogonality_coeff) == (0.01, 1e-3, 1e-4)
    assert (c.moe_variance_loss_form, c.moe_orthogonality_loss_form) == ("paper", "reference_code")


def test_each_form_flag_is_a_config_field_with_the_config_default():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    fields = {f.name: f for f in dataclasses.fields(DPSLTransformerConfig)}
    actions = {a.dest: a for a in parser()._actions}
    for flag, field, _ in REGULARIZER_FLAGS:
        assert actions[field].option_strings == [flag] and field in fields and fields[field].kw_only
        assert (
            actions[field].default is None and fields[field].default == "paper"
        )  # None: not given


@pytest.mark.parametrize(
    "cmdline, message",
    [
        (
            "--moe-router-load-balancing-type aux_loss variance --moe-aux-loss-coeff 1e-3 "
            "-0.001 --moe-router-topk 2",
            "--moe-aux-loss-coeff: the value in variance's slot is its coefficient and must be "
            ">= 0, got -0.001",
        ),
        (
            "--moe-router-load-balancing-type orthogonality --moe-aux-loss-coeff 1e-4 "
            "--moe-router-topk 1",
            "--moe-router-load-balancing-type 'orthogonality' compares the outputs of one "
            "token's k experts: it needs "
            "--moe-router-topk >= 2, got 1",
        ),
        (
            "--moe-router-load-balancing-type orthogonality --moe-aux-loss-coeff 1e-4 "
            "--moe-router-topk 2 "
            "--moe-token-dispatcher-type flex",
            "supports --moe-token-dispatcher-type 'allgather' and 'alltoall'",
        ),
        (
            "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
            "--moe-router-topk 2 "
            "--moe-variance-loss-form reference_code",
            "--moe-variance-loss-form needs --moe-router-load-balancing-type to include 'variance'",
        ),
        (
            "--moe-router-load-balancing-type variance --moe-aux-loss-coeff 1e-3 "
            "--moe-router-topk 2 "
            "--moe-orthogonality-loss-form paper",
            "--moe-orthogonality-loss-form needs --moe-router-load-balancing-type to include "
            "'orthogonality'",
        ),
    ],
)
def test_errors_name_the_flag(cmdline, message):
    with pytest.raises(ValueError) as info:
        config_from(cmdline)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "--moe-router-load-balancing-type varianse",
            "argument --moe-router-load-balancing-type: invalid choice: 'varianse'",
        ),
        (
            "--moe-variance-loss-form code",
            "argument --moe-variance-loss-form: invalid choice: 'code'",
        ),
    ],
)
def test_unknown_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(f"{CMD} {argv}".split())
    err = capsys.readouterr().err
    assert message in err and ("orthogonality" in err or "reference_code" in err)
