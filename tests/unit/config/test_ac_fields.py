"""The Adaptive Clustering router's config fields and ``--moe-ac-*`` flags: values, defaults, errors
naming
the field (config) or the flag (command line)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_dpsl.megatron_lm import args as dpsl_args
from megatron_dpsl.megatron_lm.args import (
    add_dpsl_args,
    add_moe_load_balancing_args,
    dpsl_config_from_args,
)

BASE = dict(
    num_layers=4, hidden_size=16, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2
)
FLAGS = "--num-layers 4 --hidden-size 16 --num-attention-heads 2 --num-experts 4"


def make(**over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig(**{**BASE, **over})


def parser():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-experts", type=int, default=None)
    add_moe_load_balancing_args(p)
    return add_dpsl_args(p)


def config_from(cmdline: str, **overrides):
    return dpsl_config_from_args(parser().parse_args(f"{FLAGS} {cmdline}".split()), **overrides)


# ---------------------------------------------------------------- config
def test_defaults_are_the_official_language_model_recipe_and_off():
    c = make()
    assert (c.moe_ac_layers, c.moe_ac_eps, c.moe_ac_clip, c.moe_ac_weight_norm) == (
        None,
        1e-4,
        10.0,
        "feature",
    )
    assert not c.moe_ac_enabled
    assert not make(moe_ac_layers=[]).moe_ac_enabled


def test_fields_are_keyword_only():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    fields = [f for f in dataclasses.fields(DPSLTransformerConfig) if f.name.startswith("moe_ac_")]
    assert len(fields) == 4 and all(f.kw_only for f in fields)


@pytest.mark.parametrize(
    "over",
    [
        dict(moe_ac_layers=[2, 3, 4]),
        dict(moe_ac_layers=[3, 4], moe_layer_freq=[1, 0, 1, 1]),
        dict(moe_ac_layers=[3], moe_layer_freq=2),
        dict(moe_ac_layers=[2], moe_ac_clip=None, moe_ac_weight_norm="global"),
        dict(
            moe_ac_layers=[2],
            moe_router_load_balancing_type=["aux_loss", "dpsl"],
            moe_aux_loss_coeff=[1e-2, 0.0],
        ),
        dict(moe_ac_layers=[2], cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn"]),
    ],
    ids=[
        "all_but_first",
        "pattern_list",
        "every_other",
        "no_clip_global",
        "with_dpsl",
        "attention_graphs",
    ],
)
def test_valid(over):
    assert make(**over).moe_ac_enabled


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(moe_ac_layers=[1, 2]), "moe_ac_layers: layer 1 is the first MoE layer"),
        (
            dict(moe_ac_layers=[3], moe_layer_freq=[0, 0, 1, 1]),
            "moe_ac_layers: layer 3 is the first MoE layer",
        ),
        (dict(moe_ac_layers=[5]), "moe_ac_layers: layer 5 is outside 1..num_layers=4"),
        (dict(moe_ac_layers=[0]), "moe_ac_layers: layer 0 is outside"),
        (
            dict(moe_ac_layers=[2], moe_layer_freq=[1, 0, 1, 1]),
            "moe_ac_layers: layer 2 is not an MoE layer (MoE layers: [1, 3, 4])",
        ),
        (dict(moe_ac_layers=[2, 2]), "moe_ac_layers lists a layer more than once"),
        (dict(moe_ac_layers=["2"]), "moe_ac_layers: expected a list of layer numbers"),
        (dict(moe_ac_layers=[True]), "moe_ac_layers: expected a list of layer numbers"),
        (dict(moe_ac_layers=2), "moe_ac_layers: expected a list of layer numbers"),
        (
            dict(moe_ac_layers=[2], num_moe_experts=None, moe_router_topk=2),
            "moe_ac_layers: the AC router needs MoE layers",
        ),
        (
            dict(moe_ac_layers=[2], moe_input_jitter_eps=0.1),
            "moe_input_jitter_eps=0.1 cannot be combined with moe_ac_layers",
        ),
        (
            dict(moe_ac_layers=[2], cuda_graph_impl="local"),
            "moe_ac_layers cannot be combined with cuda_graph_impl='local'",
        ),
        (
            dict(
                moe_ac_layers=[2],
                cuda_graph_impl="transformer_engine",
                cuda_graph_scope=["attn", "moe_router"],
            ),
            "capturing the router",
        ),
        (dict(moe_ac_eps=0.0), "moe_ac_eps: must be > 0 and finite, got 0.0"),
        (dict(moe_ac_eps=-1e-4), "moe_ac_eps: must be > 0"),
        (dict(moe_ac_eps=float("nan")), "moe_ac_eps: must be > 0 and finite"),
        (dict(moe_ac_eps=True), "moe_ac_eps: must be > 0"),
        (dict(moe_ac_clip=0), "moe_ac_clip: must be > 0 and finite (or None: no cap), got 0"),
        (dict(moe_ac_clip=float("inf")), "moe_ac_clip: must be > 0 and finite"),
        (
            dict(moe_ac_weight_norm="rows"),
            "moe_ac_weight_norm must be one of ['feature', 'cluster', 'global'], got 'rows'",
        ),
    ],
)
def test_bad_values_name_the_field(over, message):
    with pytest.raises(ValueError) as info:
        make(**over)
    assert message in str(info.value)


def test_numbers_are_checked_even_with_ac_off():
    """A typo in a value should not wait until the layers are switched on."""
    with pytest.raises(ValueError, match="moe_ac_clip"):
        make(moe_ac_clip=-3.0)


# ---------------------------------------------------------------- flags
def test_every_ac_flag_is_a_config_field_given_as_none_by_default():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    fields = {f.name for f in dataclasses.fields(DPSLTransformerConfig)}
    actions = [a for a in parser()._actions if a.dest.startswith("moe_ac_")]
    assert sorted(a.dest for a in actions) == sorted(n for n in fields if n.startswith("moe_ac_"))
    assert sorted(a.dest for a in actions) == sorted(dpsl_args.AC_FIELDS)
    for action in actions:
        assert action.option_strings == [dpsl_args.flag_for_field(action.dest)]
        assert action.default is None  # not given: the config default applies


def test_flags_fill_the_fields():
    c = config_from(
        "--moe-ac-layers 2 4 --moe-ac-eps 1e-3 --moe-ac-clip 1.5 --moe-ac-weight-norm cluster"
    )
    assert (c.moe_ac_layers, c.moe_ac_eps, c.moe_ac_clip, c.moe_ac_weight_norm) == (
        [2, 4],
        1e-3,
        1.5,
        "cluster",
    )
    assert config_from("--moe-ac-layers 2 --moe-ac-clip none").moe_ac_clip is None
    c = config_from("--moe-ac-layers 3")
    assert (c.moe_ac_eps, c.moe_ac_clip, c.moe_ac_weight_norm) == (1e-4, 10.0, "feature")
    assert not config_from("").moe_ac_enabled


def test_ac_combines_with_dpsl_flags():
    c = config_from(
        "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 1e-3 0 "
        "--moe-ac-layers 2 3 4"
    )
    assert c.moe_dpsl_enabled and c.moe_ac_enabled


def test_flags_added_once():
    p = parser()
    add_dpsl_args(p)  # a launcher may pass the provider to a parser that already has the flags
    assert sum(a.dest == "moe_ac_layers" for a in p._actions) == 1


@pytest.mark.parametrize(
    "cmdline, message",
    [
        ("--moe-ac-layers 1 2", "--moe-ac-layers: layer 1 is the first MoE layer"),
        ("--moe-ac-layers 9", "--moe-ac-layers: layer 9 is outside 1..num_layers=4"),
        ("--moe-ac-layers 2 --moe-ac-eps 0", "--moe-ac-eps: must be > 0"),
        ("--moe-ac-layers 2 --moe-ac-clip -1", "--moe-ac-clip: must be > 0"),
        ("--moe-ac-eps 1e-3", "--moe-ac-eps: the Adaptive Clustering flags need --moe-ac-layers"),
        (
            "--moe-ac-weight-norm global",
            "--moe-ac-weight-norm: the Adaptive Clustering flags need --moe-ac-layers",
        ),
    ],
)
def test_errors_name_the_flag(cmdline, message):
    with pytest.raises(ValueError) as info:
        config_from(cmdline)
    assert message in str(info.value)


def test_megatron_flag_conflict_names_both_flags():
    with pytest.raises(
        ValueError, match="--moe-input-jitter-eps=0.1 cannot be combined with --moe-ac-layers"
    ):
        config_from("--moe-ac-layers 2", moe_input_jitter_eps=0.1)


@pytest.mark.parametrize(
    "cmdline, message",
    [
        ("--moe-ac-weight-norm rows", "argument --moe-ac-weight-norm: invalid choice: 'rows'"),
        ("--moe-ac-clip lots", "argument --moe-ac-clip: expected a number or 'none', got 'lots'"),
        ("--moe-ac-layers two", "argument --moe-ac-layers: invalid int value: 'two'"),
    ],
)
def test_bad_flag_values_are_argparse_errors(cmdline, message, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(f"{FLAGS} {cmdline}".split())
    assert message in capsys.readouterr().err


def test_python_api_is_exported_lazily():
    import megatron_dpsl
    from megatron_dpsl.routing.ac.clustering import adaptive_clustering_weights
    from megatron_dpsl.routing.ac.router import ACRouter
    from megatron_dpsl.routing.ac.state import ACRoutingState

    assert megatron_dpsl.ACRouter is ACRouter and megatron_dpsl.ACRoutingState is ACRoutingState
    assert megatron_dpsl.adaptive_clustering_weights is adaptive_clustering_weights
    assert {"ACRouter", "ACRoutingState", "adaptive_clustering_weights"} <= set(
        megatron_dpsl.__all__
    )
