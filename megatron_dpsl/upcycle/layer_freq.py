"""``--moe-layer-freq`` in Megatron-LM's spellings, parsed without ``eval`` and with a bounded size:
``2``, ``1,0,1,0``, ``[1,0,1,0]``, ``([1]*3+[0])*2``, ``2*[1,0]``.

Grammar: ``expr := term ('+' term)*``, ``term := factor ('*' factor)*``, ``factor := INT | list |
'(' expr ')'``, ``list := '[' [INT (',' INT)*] ']'``; a product needs exactly one list side. Every
list is checked against :data:`MAX_ENTRIES` before it is built, so ``[1]*10**9`` or ``9**9**9``
cannot allocate or spin.
"""

from __future__ import annotations

import re

from megatron_dpsl.upcycle.errors import UpcycleError

MAX_ENTRIES = 100_000  # far above any model's layer count
_TOKEN = re.compile(r"\s*(\d+|[\[\]()+*,])")
_FORMS = "an int, a list like [1,0,1,0], or a pattern like ([1]*3+[0])*2"


class _Parser:
    def __init__(self, text: str):
        self.text, self.tokens, pos = text, [], 0
        while pos < len(text.rstrip()):
            match = _TOKEN.match(text, pos)
            if match is None:
                self.fail(f"unexpected {text[pos:].strip()[:10]!r}")
            if len(match.group(1)) > 6:
                self.fail(f"{match.group(1)} is too large")
            self.tokens.append(match.group(1))
            pos = match.end()
        self.pos = 0

    def fail(self, why: str):
        raise UpcycleError(f"--moe-layer-freq {self.text!r}: {why}; expected {_FORMS}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            self.fail(f"expected {expected or 'more'} at token {self.pos + 1}")
        self.pos += 1
        return token

    def expr(self):
        value = self.term()
        while self.peek() == "+":
            self.take()
            right = self.term()
            if not (isinstance(value, list) and isinstance(right, list)):
                self.fail("'+' joins two lists")
            value = self.bounded(value + right)
        return value

    def term(self):
        value = self.factor()
        while self.peek() == "*":
            self.take()
            right = self.factor()
            if isinstance(value, list) == isinstance(right, list):
                self.fail("'*' repeats a list an int number of times")
            items, times = (value, right) if isinstance(value, list) else (right, value)
            if len(items) * times > MAX_ENTRIES:
                self.fail(f"more than {MAX_ENTRIES} entries")
            value = items * times
        return value

    def factor(self):
        token = self.take()
        if token.isdigit():
            return int(token)
        if token == "(":
            value = self.expr()
            self.take(")")
            return value
        if token != "[":
            self.fail(f"unexpected {token!r}")
        items = []
        while self.peek() != "]":
            item = self.take()
            if not item.isdigit():
                self.fail(f"list entries are ints, got {item!r}")
            items.append(int(item))
            if self.peek() == ",":
                self.take()
        self.take("]")
        return self.bounded(items)

    def bounded(self, items: list[int]) -> list[int]:
        if len(items) > MAX_ENTRIES:
            self.fail(f"more than {MAX_ENTRIES} entries")
        return items


def parse_layer_freq(value) -> int | list[int]:
    """An int N (layers 0, N, 2N, ... are MoE) or a per-layer 0/1 list, from any accepted
    spelling."""
    if isinstance(value, bool):
        raise UpcycleError(f"--moe-layer-freq {value!r}: expected {_FORMS}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ENTRIES or not all(isinstance(v, int) for v in value):
            raise UpcycleError(f"--moe-layer-freq: expected a list of 0/1 ints, got {value!r}")
        return list(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\s*,\s*\d+)+", text):  # 1,0,1,0
        text = f"[{text}]"
    parser = _Parser(text)
    result = parser.expr()
    if parser.peek() is not None:
        parser.fail(f"unexpected {parser.peek()!r} at token {parser.pos + 1}")
    return result
