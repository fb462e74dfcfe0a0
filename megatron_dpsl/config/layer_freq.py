"""``--moe-layer-freq``: Megatron-LM's syntax, parsed by a small bounded parser instead of ``eval``.

Megatron-LM's ``moe_freq_type`` accepts an int N (every N-th layer is MoE, from layer 0), the same
as a string, or a Python list expression such as ``([1]*3+[0]*1)*3``, which it hands to ``eval``:
``'[9**9**9]'`` never returns and ``'[1]*10**9'`` allocates gigabytes. :func:`parse_layer_freq`
reads the same patterns with a grammar of integers, ``[..]`` lists, ``(..)``, ``+`` and ``*`` only,
and refuses, before building them, texts longer than :data:`MAX_TEXT` characters and lists or
numbers larger than :data:`MAX_LAYERS`. The upcycler also takes a bare ``1,0,1,0``.

Grammar (Python's precedence; a list element is any expression that gives a number)::

    expr   := term ('+' term)*
    term   := factor ('*' factor)*
    factor := INT | '[' [expr (',' expr)* [',']] ']' | '(' expr ')'
"""

from __future__ import annotations

import re

MAX_TEXT = 1000
"""Longest pattern text read (characters)."""
MAX_LAYERS = 10_000
"""Largest list (layers) or number a pattern may produce; also bounds the nesting depth's work."""
_MAX_DEPTH = 64

_SYNTAX = "an int N (every N-th layer), a 0/1 list like [1,0,1,0], or a pattern like ([1]*3+[0])*2"
_TOKEN = re.compile(r"\s*(?:(\d+)|(\S))")


class LayerFreqError(ValueError):
    """A ``--moe-layer-freq`` value that is not a bounded 0/1 pattern (the message names it)."""


class _Parser:
    def __init__(self, text: str, flag: str):
        self.text, self.flag, self.depth = text, flag, 0
        self.tokens = [(m.group(1), m.group(2), m.start()) for m in _TOKEN.finditer(text)]
        self.tokens.append((None, "end", len(text)))
        self.pos = 0

    def fail(self, why: str):
        raise LayerFreqError(f"{self.flag} {self.text!r}: {why}; expected {_SYNTAX}")

    def peek(self) -> str | None:
        return self.tokens[self.pos][1]

    def take(self, symbol: str) -> None:
        number, sym, at = self.tokens[self.pos]
        if sym != symbol:
            self.fail(f"expected {symbol!r} at character {at}, got {number or sym!r}")
        self.pos += 1

    def expr(self):
        value = self.term()
        while self.peek() == "+":
            self.pos += 1
            value = self.add(value, self.term())
        return value

    def term(self):
        value = self.factor()
        while self.peek() == "*":
            self.pos += 1
            value = self.mul(value, self.factor())
        return value

    def factor(self):
        number, sym, at = self.tokens[self.pos]
        if number is not None:
            self.pos += 1
            if len(number) > len(str(MAX_LAYERS)) or int(number) > MAX_LAYERS:
                self.fail(f"{number} is larger than {MAX_LAYERS}")
            return int(number)
        if sym not in ("[", "("):
            self.fail(f"unexpected {sym!r} at character {at}")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            self.fail(f"nested deeper than {_MAX_DEPTH}")
        self.pos += 1
        value = self.expr() if sym == "(" else self.elements()
        self.take(")" if sym == "(" else "]")
        self.depth -= 1
        return value

    def elements(self) -> list:
        items: list = []
        while self.peek() != "]":
            item = self.expr()
            if isinstance(item, list):
                self.fail("a list element must be a number, not a list")
            items.append(item)
            if len(items) > MAX_LAYERS:
                self.fail(f"more than {MAX_LAYERS} layers")
            if self.peek() != ",":
                break
            self.pos += 1
        return items

    def add(self, a, b):
        if isinstance(a, list) != isinstance(b, list):
            self.fail("'+' joins two lists or two numbers, not a list and a number")
        size = len(a) + len(b) if isinstance(a, list) else a + b
        if size > MAX_LAYERS:
            self.fail(f"more than {MAX_LAYERS} layers")
        return a + b

    def mul(self, a, b):
        if isinstance(a, list) and isinstance(b, list):
            self.fail("'*' repeats a list a number of times; two lists cannot be multiplied")
        size = (len(a) if isinstance(a, list) else a) * (len(b) if isinstance(b, list) else b)
        if size > MAX_LAYERS:  # checked before the list is built
            self.fail(f"more than {MAX_LAYERS} layers")
        return a * b


def parse_layer_freq(value, flag: str = "--moe-layer-freq") -> int | list[int]:
    """An int N >= 1 (every N-th layer, from layer 0, is MoE) or a list of 0/1, one per layer.

    Takes what Megatron-LM's ``--moe-layer-freq`` takes (``2``, ``'2'``, ``'[1,0,1,0]'``,
    ``'([1]*3+[0])*2'``), a bare ``'1,0,1,0'``, or an int/list already parsed. ``LayerFreqError``
    (a ``ValueError`` starting with ``flag``) for anything else, in time linear in the text.
    """
    if isinstance(value, bool):
        raise LayerFreqError(f"{flag} {value!r}: expected {_SYNTAX}")
    if isinstance(value, (list, tuple)):
        result = list(value)
    elif isinstance(value, int):
        result = value
    else:
        text = str(value).strip()
        if len(text) > MAX_TEXT:
            raise LayerFreqError(f"{flag}: longer than {MAX_TEXT} characters; expected {_SYNTAX}")
        if re.fullmatch(r"[\d\s]+(,[\d\s]+)+,?", text):
            text = f"[{text}]"  # the upcycler's bare 1,0,1,0
        parser = _Parser(text, flag)
        result = parser.expr()
        parser.take("end")
    return _checked(result, value, flag)


def _checked(result, value, flag: str) -> int | list[int]:
    if isinstance(result, int):
        if result < 1:
            raise LayerFreqError(f"{flag} {value!r}: an int N must be >= 1 (every N-th layer)")
        return result
    if not all(isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in result):
        raise LayerFreqError(f"{flag} {value!r}: a list holds 0 (dense) or 1 (MoE) per layer")
    if not any(result):
        raise LayerFreqError(f"{flag} {value!r}: the list needs at least one MoE layer (a 1)")
    if len(result) > MAX_LAYERS:
        raise LayerFreqError(f"{flag}: more than {MAX_LAYERS} layers")
    return result
