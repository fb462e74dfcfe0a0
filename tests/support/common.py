"""Small helpers shared by the test modules and their workers (not tests themselves).

tests/conftest.py puts tests/ (and scripts/) on ``sys.path`` for the test modules; a child
interpreter a test starts gets the same through ``child_env``'s ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
WORKERS = TESTS / "support" / "workers"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun's --master-port /
    rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- child processes


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child interpreter a test starts (torchrun worker, CLI, script).

    This checkout and tests/ importable (workers import ``megatron_cpu``, ``_support``, ...), one
    OpenMP thread per process (torchrun's ranks share the cores), and no ``MASTER_ADDR`` /
    ``MASTER_PORT`` inherited from this process (a child that hosts its own store must not pick the
    port of a process group this pytest holds). ``extra`` is applied last.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")])
    )
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun(worker: str, *args: str, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """``torch.distributed.run --nproc-per-node nproc tests/support/workers/<worker> args`` on a
    free port, from
    the repository root with ``child_env()``; output captured."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(WORKERS / worker),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def records_per_world(tmp_path_factory, worker: str):
    """``launch(world)`` -> ``{layout name: record}``: one torchrun launch of an exactness worker
    per
    world size (cached), which writes a JSON list of records (one per layout) to ``--out``."""
    import json

    import pytest

    cache = {}

    def launch(world: int) -> dict:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"{Path(worker).stem}{world}") / "results.json"
            proc = torchrun(worker, "--out", str(out), nproc=world, timeout=900)
            if proc.returncode != 0 or not out.exists():
                pytest.fail(
                    f"torchrun ({world} ranks) failed "
                    f"rc={proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
                )
            cache[world] = {r["name"]: r for r in json.loads(out.read_text())}
        return cache[world]

    return launch


# --------------------------------------------------------------------------- across megatron-core
# 0.16 / 0.19


def reset_moe_tracker() -> None:
    """Forget every MoE metric recorded so far.

    megatron-core 0.16 keeps them in a dict; 0.19 in a ``MoEMetricsTracker``, whose ``clear()``
    zeroes the values but keeps the names (and whose legacy dict view is a copy), so it is replaced
    instead.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        destroy_moe_metrics_tracker()


def moe_tracked(name: str):
    """A copy of the per-layer values recorded under ``name`` (``[num_layers]``), or None if never
    recorded."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        return None if entry is None else entry["values"].clone()
    entry = get_moe_metrics_tracker().metrics.get(name)
    return None if entry is None else entry.values.clone()


def pg():
    """Megatron's process groups as a ``ProcessGroupCollection`` (after
    ``initialize_model_parallel``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def build_mlp(mlp_spec, config, **kwargs):
    """Build a layer spec's ``mlp`` the way the installed Megatron's ``TransformerLayer`` does: 0.16
    holds a
    ``ModuleSpec`` (``build_module``), 0.19 a ``functools.partial`` that is called."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(mlp_spec, ModuleSpec):
        return build_module(mlp_spec, config=config, **kwargs)
    return mlp_spec(config=config, **kwargs)
