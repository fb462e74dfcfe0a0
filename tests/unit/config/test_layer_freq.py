"""``--moe-layer-freq`` (megatron_dpsl.config.layer_freq): Megatron-LM's pattern syntax through a
bounded parser, never ``eval``.

Generated patterns (Hypothesis) give exactly what Python's own evaluation of the same text gives
(the reference: what Megatron-LM's ``moe_freq_type`` computes); what Megatron-LM's ``eval`` would
never finish or would fill the memory with is refused at once, naming the flag.
"""

from __future__ import annotations

import argparse
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dpsl.config.layer_freq import MAX_LAYERS, LayerFreqError, parse_layer_freq
from megatron_dpsl.megatron_lm.args import add_dpsl_args
from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.options import UpcycleOptions


@pytest.fixture
def hang_guard():
    """Fail instead of hanging if a parse never returns (what eval('[9**9**9]') does)."""

    def expired(signum, frame):
        raise AssertionError("the parse did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2", 2),
        (3, 3),
        (" 4 ", 4),
        ("[1,0,1]", [1, 0, 1]),
        ("[1, 0, 1,]", [1, 0, 1]),
        ("1,0,1,0", [1, 0, 1, 0]),  # the upcycler's bare list
        ("([1]*3+[0]*1)*3", [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]),  # Megatron-LM's help example
        ("([0]+[1]*23)", [0] + [1] * 23),
        ("([1]*3+[0]*2)*2", [1, 1, 1, 0, 0, 1, 1, 1, 0, 0]),
        ("2*[1,0]", [1, 0, 1, 0]),
        ("[1]*(2*2)", [1, 1, 1, 1]),
        ("[1]*2*2", [1, 1, 1, 1]),
        ("[0+1, 1*0]", [1, 0]),
        ([1, 0], [1, 0]),
        ("[1]*10000", [1] * MAX_LAYERS),
    ],
)
def test_megatron_lm_syntax(text, expected):
    assert parse_layer_freq(text) == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("[9**9**9]", "unexpected '\\*'"),
        ("[1]*10**9", "unexpected '\\*'"),
        ("[1]*1000000000", "larger than 10000"),
        ("[1]*10001", "10001 is larger than 10000"),
        ("[1]*5001*2+[1]", "more than 10000 layers"),
        ("[1]*100*100*100", "more than 10000 layers"),
        ("[1]*10000*10000*10000", "more than 10000 layers"),  # refused before it is built
        ("([1]*5000)*3", "more than 10000 layers"),
        ("[1]*5000+[0]*5001", "more than 10000 layers"),
        ("99999999999999999999999", "larger than 10000"),
        ("(" * 5000 + "1" + ")" * 5000, "longer than 1000 characters"),
        ("(" * 200 + "[1]" + ")" * 200, "nested deeper than 64"),
        ("__import__('os').system('true')", "unexpected '_'"),
        ("[1]+1", "'\\+' joins two lists or two numbers"),
        ("[1]*[1]", "two lists cannot be multiplied"),
        ("[[1]]", "must be a number, not a list"),
        ("[2]", "0 \\(dense\\) or 1 \\(MoE\\)"),
        ("[0,0]", "at least one MoE layer"),
        ("[1]*0", "at least one MoE layer"),
        ("0", "must be >= 1"),
        ("-1", "unexpected '-'"),
        ("1.5", "got '\\.'"),
        ("", "unexpected 'end'"),
        ("[1", "expected ']'"),
        ("[1]]", "expected 'end'"),
        (True, "expected an int N"),
        ([1, 2], "0 \\(dense\\) or 1 \\(MoE\\)"),
    ],
)
def test_refused_at_once_naming_the_flag(hang_guard, text, why):
    with pytest.raises(LayerFreqError, match=r"^--moe-layer-freq") as err:
        parse_layer_freq(text)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(LayerFreqError, match=why):
        parse_layer_freq(text)


def _render(draw, depth: int) -> str:
    """A random pattern in Megatron-LM's syntax (kept small: its value must stay evaluable)."""
    kind = draw(
        st.sampled_from(["list", "list", "repeat", "concat", "paren"] if depth else ["list"])
    )
    if kind == "list":
        items = draw(st.lists(st.sampled_from(["0", "1"]), min_size=1, max_size=4))
        return "[" + ",".join(items) + (",]" if draw(st.booleans()) else "]")
    if kind == "repeat":
        times = str(draw(st.integers(1, 3)))
        inner = _render(draw, depth - 1)
        return f"{inner}*{times}" if draw(st.booleans()) else f"{times}*{inner}"
    if kind == "concat":
        return f"{_render(draw, depth - 1)}+{_render(draw, depth - 1)}"
    return f"({_render(draw, depth - 1)})"


@st.composite
def patterns(draw):
    return _render(draw, draw(st.integers(0, 4)))


@settings(max_examples=200, deadline=None)
@given(patterns())
def test_generated_patterns_give_what_python_gives(text):
    expected = eval(text, {"__builtins__": {}}, {})  # the reference, on generated text only
    if any(expected):
        assert parse_layer_freq(text) == expected
    else:
        with pytest.raises(LayerFreqError, match="at least one MoE layer"):
            parse_layer_freq(text)


def test_upcycler_option_uses_the_parser(hang_guard):
    assert UpcycleOptions(num_experts=4, moe_layer_freq="([1]+[0])*2").moe_layer_freq == [
        1,
        0,
        1,
        0,
    ]
    with pytest.raises(UpcycleError, match=r"^--moe-layer-freq '\[9\*\*9\*\*9\]'"):
        UpcycleOptions(num_experts=4, moe_layer_freq="[9**9**9]")


def test_megatron_lm_parser_gets_the_bounded_type(hang_guard, capsys):
    """add_dpsl_args (the extra_args_provider) replaces the type of the parser's --moe-layer-freq;
    here a type that fails the test if Megatron-LM's eval-based one were still called."""

    def megatron_eval_type(value):
        raise AssertionError("Megatron-LM's eval-based moe_freq_type was called")

    parser = argparse.ArgumentParser(prog="pretrain_gpt.py")
    parser.add_argument("--moe-layer-freq", type=megatron_eval_type, default=1)
    parser.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss")
    add_dpsl_args(parser)
    assert (
        parser.parse_args(["--moe-layer-freq", "([1]*3+[0])*2"]).moe_layer_freq == [1, 1, 1, 0] * 2
    )
    assert parser.parse_args([]).moe_layer_freq == 1
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--moe-layer-freq", "[9**9**9]"])
    assert exc.value.code == 2
    assert "argument --moe-layer-freq" in capsys.readouterr().err
