"""The package's layer order, enforced: every ``megatron_dpsl`` import points down (or sideways
within one subpackage). docs/architecture.md draws this table; change both together.

Each import of package code is parsed (module level, inside functions, under ``TYPE_CHECKING``;
docstrings are not code) and resolved to the subpackage it reaches, including names the root
``megatron_dpsl`` re-exports (``from megatron_dpsl import DPSLRouter`` reaches ``routing``).
"""

from __future__ import annotations

import ast
import pathlib

import megatron_dpsl

PACKAGE_DIR = pathlib.Path(megatron_dpsl.__file__).parent

LAYERS = {
    "losses": 1,  # pure tensor math
    "metrics": 2,  # pure metric functions
    "config": 3,  # DPSLTransformerConfig and the plugin's choices
    "parallel": 4,  # cross-rank token gather, token groups
    "tracking": 5,  # logging metrics (router diagnostics, Megatron's tracker, routing stats)
    "routing": 6,  # the routers, the MoE layer
    "models": 7,  # layer specs, model builders
}
"""Library layers, lowest first: a module may import its own layer and any lower one."""

ENTRY_POINTS = ("megatron_lm", "train", "upcycle")
"""Entry points: they may import every library layer and themselves, and nothing imports them."""

ENTRY_POINT_EXCEPTIONS = {
    ("train", "megatron_dpsl.megatron_lm.args"): "the trainer parses the same plugin flags as "
    "Megatron-LM's launcher and builds its config through the same translation",
    ("train", "megatron_dpsl.upcycle"): "the quickstart runs the upcycler as one of its stages",
}
"""(importing entry point, imported module): the only imports between entry points, with why."""


def _subpackage(module: str) -> str | None:
    parts = module.split(".")  # megatron_dpsl.__init__ is the root facade: in no subpackage
    if len(parts) > 1 and parts[0] == "megatron_dpsl" and parts[1] != "__init__":
        return parts[1]
    return None


def _root_name_module(name: str) -> str:
    """Where ``from megatron_dpsl import name`` really comes from."""
    if (PACKAGE_DIR / name).is_dir() or (PACKAGE_DIR / f"{name}.py").is_file():
        return f"megatron_dpsl.{name}"
    if name in megatron_dpsl._LAZY:
        return megatron_dpsl._LAZY[name]
    value = megatron_dpsl.__dict__.get(name)
    return getattr(value, "__module__", None) or "megatron_dpsl"


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every ``megatron_dpsl`` import in the code of ``module``."""
    here = module.split(".")
    found = []
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[: len(here) - node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "megatron_dpsl":
                found += [(node.lineno, _root_name_module(a.name)) for a in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m.split(".")[0] == "megatron_dpsl"]


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer``'s subpackage may not import ``imported`` (None when it may)."""
    src, dst = _subpackage(importer), _subpackage(imported)
    if dst is None or src is None or src == dst:
        return None  # the root facade, or within one subpackage
    if dst in ENTRY_POINTS:
        allowed = any(
            src == who and (imported + ".").startswith(what + ".")
            for who, what in ENTRY_POINT_EXCEPTIONS
        )
        return None if allowed else f"{src} imports the entry point {dst}"
    if src in ENTRY_POINTS:
        return None
    if src not in LAYERS or dst not in LAYERS:
        return f"{src or dst} is in no layer of tests/unit/test_layers.py"
    if LAYERS[dst] > LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]}): upward"
    return None


def _module_name(path: pathlib.Path) -> str:
    return ".".join(["megatron_dpsl", *path.relative_to(PACKAGE_DIR).with_suffix("").parts])


def test_every_subpackage_has_a_place():
    subpackages = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS) | set(ENTRY_POINTS)


def test_imports_point_down():
    bad = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        importer = _module_name(path)
        for line, imported in imported_modules(path.read_text(), importer):
            why = violation(importer, imported)
            if why:
                bad.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {imported}: {why}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import():
    """The rule itself: an upward, a lazy (in-function) and a re-exported import are caught."""
    assert violation("megatron_dpsl.config.x", "megatron_dpsl.routing.ac.state")
    assert violation("megatron_dpsl.losses.dpsl", "megatron_dpsl.metrics.routing")
    assert violation("megatron_dpsl.models.gpt", "megatron_dpsl.train.trainer")
    assert violation("megatron_dpsl.upcycle.cli", "megatron_dpsl.megatron_lm.args")
    assert violation("megatron_dpsl.routing.router", "megatron_dpsl.config.ac") is None
    assert violation("megatron_dpsl.train.model", "megatron_dpsl.megatron_lm.args") is None
    text = "def f():\n    from megatron_dpsl import DPSLRouter\n    from ..routing import router\n"
    found = imported_modules(text, "megatron_dpsl.config.planted")
    assert found == [(2, "megatron_dpsl.routing.router"), (3, "megatron_dpsl.routing")]
    assert all(violation("megatron_dpsl.config.planted", m) for _, m in found)
