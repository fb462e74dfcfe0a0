"""Faults: a conversion killed hard (SIGKILL) leaves its temporary directory; the next run of the
same output removes it when it is provably dead, and never touches a live conversion's, another
host's, or anything that is not ours. Real processes, real kills
(tests/support/workers/upcycle_kill_worker.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.common import WORKERS, child_env
from support.upcycle import write_tiny_hf_llama

from megatron_dpsl.upcycle import ownership
from megatron_dpsl.upcycle.cli import main

WORKER = WORKERS / "upcycle_kill_worker.py"
ARGS = ["--num-experts", "4", "--moe-router-topk", "2", "--no-progress"]


def _hidden(parent: Path, name: str = "moe") -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _start_stuck_conversion(src: Path, out: Path, ready: Path) -> subprocess.Popen:
    """A real CLI run in its own process, stopped while writing layer 1 (layer 0 is on disk)."""
    cmd = [
        sys.executable,
        str(WORKER),
        str(ready),
        "--source",
        str(src),
        "--output",
        str(out),
        *ARGS,
    ]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"worker exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached layer 1")
        time.sleep(0.1)
    return proc


def test_sigkilled_conversion_is_swept_by_the_next_run_but_a_live_one_is_not(tmp_path, capsys):
    src = write_tiny_hf_llama(tmp_path / "hf", layers=3)
    out = tmp_path / "moe"
    worker = _start_stuck_conversion(src, out, tmp_path / "ready")
    try:
        [tmp] = _hidden(tmp_path)
        assert (
            tmp.name.startswith(".moe.upcycle-tmp-") and ownership.read_owner(tmp).pid == worker.pid
        )
        data_bytes = ownership.tree_size(tmp)
        assert data_bytes > 0  # layer 0 and the non-layer tensors are written

        # a concurrent conversion of the same output: the live worker's directory is left alone
        assert main(["--source", str(src), "--output", str(out), *ARGS]) == 0
        err = capsys.readouterr().err
        assert (
            f"left alone {tmp}" in err
            and f"in use by a live conversion (pid {worker.pid} on host" in err
        )
        assert tmp.is_dir() and (out / "release").is_dir()
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    assert _hidden(tmp_path) == [
        tmp
    ]  # SIGKILL: nothing cleaned up, the record still names the dead pid

    # the next run of this output removes it and says so (with --force: the output exists from
    # above)
    assert main(["--source", str(src), "--output", str(out), "--force", *ARGS]) == 0
    err = capsys.readouterr().err
    assert f"removed stale temporary directory {tmp}" in err and f"pid {worker.pid}" in err
    assert "no longer running" in err
    assert _hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "hf",
        "moe",
        "ready",
    ]
    assert json.loads((out / "upcycle_config.json").read_text())["options"]["num_experts"] == 4


def _fake_leftover(parent: Path, name: str, record: dict | None, payload: int = 4096) -> Path:
    path = parent / name
    (path / "release").mkdir(parents=True)
    (path / "release" / "__0_0.distcp").write_bytes(b"\0" * payload)
    if record is not None:
        (path / ownership.OWNER_FILE).write_text(json.dumps(record))
    return path


def test_sweep_removes_only_what_is_provably_ours_and_dead(tmp_path):
    target = tmp_path / "moe"
    # a dead owner on this host: a real process that has exited, recorded like write_owner does
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = dict(
        vars(ownership.Owner.current(target)),
        pid=child.pid,
        start_ticks=ownership.process_start_ticks(child.pid),
    )
    child.kill()
    child.wait()
    dead = _fake_leftover(tmp_path, ".moe.upcycle-tmp-dead0001", record)
    # another node's conversion on a shared filesystem: its processes cannot be seen from here
    other_host = _fake_leftover(
        tmp_path, ".moe.upcycle-tmp-node0002", {**record, "host": socket.gethostname() + "-b"}
    )
    # the same host after a reboot (or a second machine with this name): not provable
    rebooted = _fake_leftover(
        tmp_path, ".moe.upcycle-tmp-boot0003", {**record, "boot_id": "another-boot"}
    )
    # no record: an older megatron-dpsl, or a conversion in its first instant
    unrecorded = _fake_leftover(tmp_path, ".moe.upcycle-tmp-none0004", None)
    # a previous output moved aside by --force: the user's checkpoint
    aside = _fake_leftover(tmp_path, ".moe.upcycle-old-0005", None)
    # a record naming another output, a symlink with our prefix, and another output's directory
    elsewhere = _fake_leftover(
        tmp_path, ".moe.upcycle-tmp-else0006", {**record, "target": str(tmp_path / "x")}
    )
    (tmp_path / ".moe.upcycle-tmp-link0007").symlink_to(other_host)
    other_output = _fake_leftover(
        tmp_path, ".moe2.upcycle-tmp-dead0008", {**record, "target": str(tmp_path / "moe2")}
    )

    report = {
        lo.path.name: lo for lo in ownership.sweep(target, remove=False)
    }  # what --dry-run does
    assert not report[dead.name].removed and "a real run removes it" in report[dead.name].reason
    assert dead.is_dir()

    dead_size = ownership.tree_size(dead)  # 4096 payload bytes + the record
    report = {lo.path.name: lo for lo in ownership.sweep(target)}
    assert report[dead.name].removed and not dead.exists()
    assert (
        report[dead.name].size == dead_size
        and f"({dead_size / 1024:.1f} KiB)" in report[dead.name].message()
    )
    assert f"pid {child.pid}" in report[dead.name].message()
    for kept, why in [
        (other_host, "another host"),
        (rebooted, "reboot"),
        (unrecorded, "no owner record"),
        (aside, "moved aside by --force"),
        (elsewhere, "names another output"),
    ]:
        assert not report[kept.name].removed and why in report[kept.name].reason, report[kept.name]
        assert (kept / "release" / "__0_0.distcp").stat().st_size == 4096
    assert (
        ".moe.upcycle-tmp-link0007" not in report
        and (tmp_path / ".moe.upcycle-tmp-link0007").is_symlink()
    )
    assert other_output.name not in report and other_output.is_dir()


def test_reused_pid_counts_as_dead(tmp_path):
    """A record whose pid now belongs to a process started at another time (this test's own pid)."""
    target = tmp_path / "moe"
    record = dict(vars(ownership.Owner.current(target)))
    record["start_ticks"] -= 1  # same pid, different start: the owner is gone, the pid was reused
    stale = _fake_leftover(tmp_path, ".moe.upcycle-tmp-reus0001", record)
    live = _fake_leftover(
        tmp_path, ".moe.upcycle-tmp-live0002", dict(vars(ownership.Owner.current(target)))
    )
    report = {lo.path.name: lo for lo in ownership.sweep(target)}
    assert (
        report[stale.name].removed and "now belongs to another process" in report[stale.name].reason
    )
    assert not report[live.name].removed and live.is_dir()


def test_failed_conversion_leaves_nothing_and_names_the_flag(tmp_path, capsys):
    """Bad input: status 2, an error naming the flag and what is allowed, and no output or temp
    dir."""
    src = write_tiny_hf_llama(tmp_path / "hf")
    cases = [
        (
            ["--num-experts", "6", "--granularity", "4"],
            "--num-experts 6 is not a multiple of --granularity 4",
        ),
        (
            ["--num-experts", "4", "--moe-router-topk", "5"],
            "--moe-router-topk must be in [1, 4], got 5",
        ),
        (
            ["--num-experts", "6", "--granularity", "3", "--moe-router-topk", "3"],
            "FFN hidden size 64 is not divisible by --granularity 3",
        ),
        (
            ["--num-experts", "4", "--moe-layer-freq", "[1,0,1]"],
            "--moe-layer-freq has 3 entries; the source has 2",
        ),
        (
            ["--num-experts", "4", "--activation", "gelu"],
            "--activation 'gelu' conflicts with the HF config",
        ),
        (
            ["--num-experts", "4", "--weight-scaling", "exact", "--expert-noise-std", "0.1"],
            "--weight-scaling exact cannot be exact here: --expert-noise-std",
        ),
    ]
    for flags, message in cases:
        assert (
            main(["--source", str(src), "--output", str(tmp_path / "moe"), "--no-progress", *flags])
            == 2
        )
        err = capsys.readouterr().err
        assert f"megatron-dpsl-upcycle: error: {message}" in err, (flags, err)
    with pytest.raises(SystemExit) as exc:  # argparse: the flag and the allowed choices
        main(
            [
                "--source",
                str(src),
                "--output",
                str(tmp_path / "moe"),
                "--num-experts",
                "4",
                "--router-init",
                "x",
            ]
        )
    assert exc.value.code == 2
    assert "argument --router-init: invalid choice: 'x' (choose from" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
