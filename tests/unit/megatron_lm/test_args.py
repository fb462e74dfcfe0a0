"""The DPSL flags: argparse -> DPSLTransformerConfig by field name, list forms, errors naming the
flag, docs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from megatron_dpsl.config.load_balancing import PLUGIN_LOAD_BALANCING_TYPES
from megatron_dpsl.megatron_lm import args as dpsl_args
from megatron_dpsl.megatron_lm import docs as dpsl_docs
from megatron_dpsl.megatron_lm.args import (
    add_dpsl_args,
    add_moe_load_balancing_args,
    dpsl_config_from_args,
    translate_config_error,
)

REPO = Path(__file__).resolve().parents[3]
NUM_EXPERTS = 4
BASE = f"--num-layers 2 --hidden-size 16 --num-attention-heads 2 --num-experts {NUM_EXPERTS}"


def standalone_parser() -> argparse.ArgumentParser:
    """A trainer-style parser: model flags of its own, then the load-balancing flags and the DPSL
    flags."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-attention-heads", type=int)
    parser.add_argument("--num-experts", type=int, default=None)
    add_moe_load_balancing_args(parser)
    return add_dpsl_args(parser)


def megatron_style_parser() -> argparse.ArgumentParser:
    """The two flags exactly as Megatron-LM core_v0.16.1's ``_add_moe_args`` defines them (no
    'dpsl')."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group(title="moe")
    group.add_argument(
        "--moe-router-load-balancing-type",
        nargs="+",
        type=str,
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
        default="aux_loss",
        help="Determines the load balancing strategy for the router.",
    )
    group.add_argument(
        "--moe-aux-loss-coeff", type=float, nargs="+", default=0.0, help="Scaling coefficient."
    )
    return parser


def config_from(cmdline: str):
    return dpsl_config_from_args(standalone_parser().parse_args(f"{BASE} {cmdline}".split()))


def dpsl_actions(parser):
    return [a for a in parser._actions if a.dest.startswith("moe_dpsl_")]


# --------------------------------------------------------------------------- flags -> config


def test_every_dpsl_flag_is_a_config_field_with_matching_default():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    fields = {f.name: f for f in dataclasses.fields(DPSLTransformerConfig)}
    # the launcher fields say where a token's group comes from: read by the entry point, not the
    # config
    actions = [
        a for a in dpsl_actions(standalone_parser()) if a.dest not in dpsl_args.LAUNCHER_FIELDS
    ]
    assert sorted(a.dest for a in actions) == sorted(n for n in fields if n.startswith("moe_dpsl_"))
    for action in actions:
        assert action.option_strings == [dpsl_args.flag_for_field(action.dest)]
        # None means "not given: keep the config default"; any other default must be the config's.
        if action.default is not None:
            assert action.default == fields[action.dest].default, action.dest


@pytest.mark.parametrize(
    "cmdline, expected",
    [
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-coeff 0.05 --moe-dpsl-alpha 0.75 "
            "--moe-dpsl-gather global_batch --moe-dpsl-log-interval 7",
            dict(
                moe_dpsl_coeff=0.05,
                moe_dpsl_alpha=0.75,
                moe_dpsl_gather="global_batch",
                moe_dpsl_log_interval=7,
                moe_router_load_balancing_type="dpsl",
                moe_dpsl_group_alphas=None,
                moe_dpsl_num_groups=None,
            ),
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha 0.5 1.0 1.5 2.0",
            dict(
                moe_dpsl_alpha=[0.5, 1.0, 1.5, 2.0],
                moe_dpsl_gather="micro_batch",
                moe_dpsl_log_interval=100,
            ),
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-group-alphas [[2,2,1,1],[1,1,2,2]]",
            dict(
                moe_dpsl_group_alphas=[[2.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]],
                moe_dpsl_num_groups=None,
            ),
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha-base 1.0 "
            "--moe-dpsl-alpha-shift 0.5 "
            "--moe-dpsl-num-groups 2",
            dict(
                moe_dpsl_alpha_base=1.0,
                moe_dpsl_alpha_shift=0.5,
                moe_dpsl_num_groups=2,
                moe_dpsl_group_alphas=None,
            ),
        ),
    ],
    ids=["symmetric", "per_expert", "group_alphas", "modality_shortcut"],
)
def test_flags_fill_config_fields_by_name(cmdline, expected):
    config = config_from(cmdline)
    assert type(config).__name__ == "DPSLTransformerConfig"
    assert config.num_moe_experts == NUM_EXPERTS
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config.moe_dpsl_enabled


def test_unset_flags_keep_config_defaults():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    config = config_from("--moe-router-load-balancing-type dpsl")
    for f in dataclasses.fields(DPSLTransformerConfig):
        if f.name.startswith("moe_dpsl_"):
            assert getattr(config, f.name) == f.default, f.name


def test_group_alphas_from_json_file(tmp_path):
    rows = [[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0], [1.0, 2.0, 2.0, 1.0]]
    path = tmp_path / "priors.json"
    path.write_text(json.dumps(rows))
    config = config_from(f"--moe-router-load-balancing-type dpsl --moe-dpsl-group-alphas {path}")
    assert config.moe_dpsl_group_alphas == rows


def test_args_namespace_is_not_modified():
    ns = standalone_parser().parse_args(
        f"{BASE} --moe-router-load-balancing-type dpsl --moe-dpsl-alpha 0.75".split()
    )
    before = dict(vars(ns))
    dpsl_config_from_args(ns)
    assert vars(ns) == before


# --------------------------------------------------------------------------- list form


@pytest.mark.parametrize(
    "cmdline, types, coeffs, lam",
    [
        # λ from dpsl's slot of --moe-aux-loss-coeff
        (
            "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.001 0.02",
            ["aux_loss", "dpsl"],
            [0.001, 0.02],
            0.02,
        ),
        # slot 0: λ from --moe-dpsl-coeff
        (
            "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.001 0 "
            "--moe-dpsl-coeff 0.03",
            ["aux_loss", "dpsl"],
            [0.001, 0.0],
            0.03,
        ),
        # both given and equal
        (
            "--moe-router-load-balancing-type dpsl seq_aux_loss --moe-aux-loss-coeff 0.04 "
            "0.002 --moe-dpsl-coeff 0.04",
            ["dpsl", "seq_aux_loss"],
            [0.04, 0.002],
            0.04,
        ),
        (
            "--moe-router-load-balancing-type seq_aux_loss global_aux_loss dpsl "
            "--moe-aux-loss-coeff 0.001 0.002 0.005",
            ["seq_aux_loss", "global_aux_loss", "dpsl"],
            [0.001, 0.002, 0.005],
            0.005,
        ),
        # single type: the one coefficient is dpsl's; one-element lists become scalars (Megatron's
        # validate_args)
        ("--moe-router-load-balancing-type dpsl --moe-aux-loss-coeff 0.07", "dpsl", 0.07, 0.07),
        ("--moe-router-load-balancing-type dpsl", "dpsl", 0.0, 0.01),
    ],
)
def test_list_form_with_per_type_coefficients(cmdline, types, coeffs, lam):
    config = config_from(cmdline)
    assert config.moe_router_load_balancing_type == types
    assert config.moe_aux_loss_coeff == pytest.approx(coeffs)
    assert config.moe_dpsl_coeff == pytest.approx(lam)
    assert config.moe_dpsl_enabled


def test_without_dpsl_the_config_is_plain_megatron():
    config = config_from(
        "--moe-router-load-balancing-type aux_loss seq_aux_loss --moe-aux-loss-coeff 0.01 0.02"
    )
    assert not config.moe_dpsl_enabled
    assert config.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]


# --------------------------------------------------------------------------- parsers


def test_megatron_parser_choices_are_widened_not_duplicated():
    parser = add_dpsl_args(megatron_style_parser())
    lb = [a for a in parser._actions if a.dest == "moe_router_load_balancing_type"]
    # every plugin type appended once, after Megatron's own
    assert len(lb) == 1 and lb[0].choices[-len(PLUGIN_LOAD_BALANCING_TYPES) :] == list(
        PLUGIN_LOAD_BALANCING_TYPES
    )
    ns = parser.parse_args(
        "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.01 0".split()
    )
    assert ns.moe_router_load_balancing_type == ["aux_loss", "dpsl"]
    # a second call (patched Megatron-LM plus the launcher's provider) adds nothing and does not
    # raise
    assert add_dpsl_args(parser) is parser
    assert len(dpsl_actions(parser)) == 10  # 8 config fields + the 2 launcher fields
    assert lb[0].choices.count("variance") == 1


def test_unwidened_megatron_parser_rejects_dpsl(capsys):
    with pytest.raises(SystemExit):
        megatron_style_parser().parse_args("--moe-router-load-balancing-type dpsl".split())
    assert "invalid choice: 'dpsl'" in capsys.readouterr().err


def test_standalone_parser_gets_no_load_balancing_flag_from_add_dpsl_args():
    parser = add_dpsl_args(argparse.ArgumentParser())
    assert not [a for a in parser._actions if a.dest == "moe_router_load_balancing_type"]
    assert len(dpsl_actions(parser)) == 10
    # the helper adds it, with dpsl, exactly once
    add_moe_load_balancing_args(add_moe_load_balancing_args(parser))
    lb = [a for a in parser._actions if a.dest == "moe_router_load_balancing_type"]
    assert len(lb) == 1 and "dpsl" in lb[0].choices


# --------------------------------------------------------------------------- errors name the flag


@pytest.mark.parametrize(
    "cmdline, message",
    [
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha 1 2 3",
            "--moe-dpsl-alpha: expected 1 or 4 values (num experts), got 3",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha 0",
            "--moe-dpsl-alpha: every α must be > 0",
        ),
        (
            "--moe-router-load-balancing-type aux_loss --moe-dpsl-alpha 0.75",
            "--moe-dpsl-alpha: DPSL flags need --moe-router-load-balancing-type to include 'dpsl'",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-group-alphas [[1,2],[2,1]]",
            "--moe-dpsl-group-alphas: every row needs 4 values (num experts), got rows of 2",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha 1 --moe-dpsl-group-alphas "
            "[[1,1,1,1]]",
            "--moe-dpsl-group-alphas: give only one prior",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha-base 1 --moe-dpsl-num-groups 2",
            "--moe-dpsl-alpha-shift: the modality prior needs",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha-base 1 "
            "--moe-dpsl-alpha-shift 1 "
            "--moe-dpsl-num-groups 3",
            "--moe-dpsl-num-groups: must be >= 1 and divide --num-experts 4, got 3",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-log-interval -1",
            "--moe-dpsl-log-interval: must be >= 0",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-coeff -0.1",
            "--moe-dpsl-coeff: must be >= 0",
        ),
        (
            "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.01 -0.02",
            "--moe-aux-loss-coeff: the value in dpsl's slot is λ and must be >= 0, got -0.02",
        ),
        (
            "--moe-router-load-balancing-type dpsl --moe-dpsl-alpha-base 1 "
            "--moe-dpsl-alpha-shift -0.5 "
            "--moe-dpsl-num-groups 2",
            "--moe-dpsl-alpha-shift: must be >= 0, got -0.5",
        ),
        (
            "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.01",
            "--moe-aux-loss-coeff: expected 2 values (one per --moe-router-load-balancing-type "
            "aux_loss dpsl), got 1",
        ),
        (
            "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 0.01 0.02 "
            "--moe-dpsl-coeff 0.03",
            "--moe-dpsl-coeff: 0.03 disagrees with 0.02",
        ),
        # raised by DPSLTransformerConfig with field names, translated to flags
        (
            "--moe-router-load-balancing-type sinkhorn dpsl --moe-aux-loss-coeff 0 0",
            "--moe-router-load-balancing-type: 'dpsl' cannot be combined with 'sinkhorn'",
        ),
    ],
)
def test_errors_name_the_flag(cmdline, message):
    with pytest.raises(ValueError) as info:
        config_from(cmdline)
    assert message in str(info.value)


def test_dpsl_without_experts_names_num_experts():
    parser = standalone_parser()
    ns = parser.parse_args(
        "--num-layers 2 --hidden-size 16 --num-attention-heads 2 "
        "--moe-router-load-balancing-type dpsl".split()
    )
    with pytest.raises(ValueError, match="--num-experts"):
        dpsl_config_from_args(ns)


@pytest.mark.parametrize(
    "value, message",
    [
        ("[[1,2],", "argument --moe-dpsl-group-alphas: not valid JSON"),
        ("[1,2]", "argument --moe-dpsl-group-alphas: expected a non-empty list of non-empty lists"),
        ("no/such/file.json", "argument --moe-dpsl-group-alphas: expected a JSON list of lists"),
    ],
)
def test_bad_group_alphas_value_is_an_argparse_error(value, message, capsys):
    with pytest.raises(SystemExit):
        standalone_parser().parse_args(
            [
                *BASE.split(),
                "--moe-router-load-balancing-type",
                "dpsl",
                "--moe-dpsl-group-alphas",
                value,
            ]
        )
    assert message in capsys.readouterr().err


def test_bad_gather_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        standalone_parser().parse_args(f"{BASE} --moe-dpsl-gather everything".split())
    err = capsys.readouterr().err
    assert "--moe-dpsl-gather: invalid choice: 'everything'" in err and "micro_batch" in err


def test_translate_config_error_rewrites_field_names():
    assert (
        translate_config_error("moe_dpsl_gather must be one of [...]; num_moe_experts=4")
        == "--moe-dpsl-gather must be one of [...]; --num-experts=4"
    )
    # already a flag, or not a field name: unchanged
    assert translate_config_error("--moe-dpsl-alpha: bad") == "--moe-dpsl-alpha: bad"
    assert translate_config_error("hidden_size must be > 0") == "hidden_size must be > 0"


# --------------------------------------------------------------------------- docs


def test_flags_doc_is_current():
    committed = (REPO / "docs" / "flags.md").read_text(encoding="utf-8")
    assert dpsl_docs.render() == committed, (
        "regenerate: python -m megatron_dpsl.megatron_lm.docs > docs/flags.md"
    )


def test_flags_doc_lists_every_flag():
    rendered = dpsl_docs.render()
    for action in dpsl_actions(standalone_parser()):
        assert f"| `{action.option_strings[0]}` |" in rendered


# --------------------------------------------------------------------------- the launcher's parser
# hook


def _fake_megatron_arguments():
    """A stand-in for Megatron-LM's ``megatron.training.arguments``: ``parse_args`` looks up
    ``add_megatron_arguments`` in the module's globals at call time, as Megatron-LM's does."""
    import types

    module = types.ModuleType("fake_megatron_arguments")

    def add_megatron_arguments(parser):
        return megatron_style_parser_into(parser)

    def parse_args(argv, ignore_unknown_args=False):  # no extra_args_provider: the re-parses' shape
        parser = module.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        return parser.parse_known_args(argv)[0] if ignore_unknown_args else parser.parse_args(argv)

    module.add_megatron_arguments = add_megatron_arguments
    module.parse_args = parse_args
    return module


def megatron_style_parser_into(parser):
    group = parser.add_argument_group(title="moe")
    group.add_argument(
        "--moe-router-load-balancing-type",
        nargs="+",
        type=str,
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
        default="aux_loss",
    )
    group.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    return parser


def test_registration_reaches_parses_without_a_provider_and_is_undone(capsys):
    from megatron_dpsl.megatron_lm import registration

    module = _fake_megatron_arguments()
    stock = module.add_megatron_arguments
    argv = (
        "--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 1e-3 0.01 "
        "--moe-dpsl-alpha 0.75"
    ).split()
    with pytest.raises(SystemExit):  # what maybe_wrap_for_inprocess_restart hit before the hook
        module.parse_args(argv, ignore_unknown_args=True)
    assert "invalid choice: 'dpsl'" in capsys.readouterr().err

    registration.register_dpsl_arguments(module)
    registration.register_dpsl_arguments(module)  # idempotent: one wrapper
    assert module.add_megatron_arguments.__wrapped__ is stock and registration.is_registered(module)
    ns = module.parse_args(argv, ignore_unknown_args=True)
    assert ns.moe_router_load_balancing_type == ["aux_loss", "dpsl"] and ns.moe_dpsl_alpha == [0.75]

    registration.unregister_dpsl_arguments(module)
    assert module.add_megatron_arguments is stock and not registration.is_registered(module)
    with registration.dpsl_arguments_registered(module):
        assert module.parse_args(argv).moe_aux_loss_coeff == [1e-3, 0.01]
    assert module.add_megatron_arguments is stock


def test_plugin_types_come_from_one_constant(monkeypatch):
    """Registration, the standalone parser and the tracker names all take the list from the
    constant."""
    from megatron_dpsl.tracking.moe_tracker import plugin_track_names

    monkeypatch.setattr(dpsl_args, "PLUGIN_LOAD_BALANCING_TYPES", ("dpsl", "variance"))
    monkeypatch.setattr(
        "megatron_dpsl.config.load_balancing.PLUGIN_LOAD_BALANCING_TYPES", ("dpsl", "variance")
    )
    parser = add_dpsl_args(megatron_style_parser())
    lb = next(a for a in parser._actions if a.dest == "moe_router_load_balancing_type")
    assert lb.choices[-2:] == ["dpsl", "variance"]
    assert parser.parse_args(
        "--moe-router-load-balancing-type aux_loss variance".split()
    ).moe_router_load_balancing_type == ["aux_loss", "variance"]
    standalone = add_moe_load_balancing_args(argparse.ArgumentParser())
    assert (
        "variance"
        in next(
            a for a in standalone._actions if a.dest == "moe_router_load_balancing_type"
        ).choices
    )
    assert plugin_track_names(["aux_loss", "variance", "dpsl"]) == ["variance_loss", "dpsl_loss"]
    assert plugin_track_names("aux_loss") == []
