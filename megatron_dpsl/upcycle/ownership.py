"""Who owns a conversion's temporary directory, and finding the ones nobody owns any more.

A conversion writes into ``.<name>.upcycle-tmp-<hex>`` beside the output and renames it into place
at the end; Ctrl-C, SIGTERM and errors remove it. A conversion killed hard (SIGKILL, the OOM killer,
a node failure) cannot, and at 100 B parameters that leaves hundreds of GB behind. So each
temporary directory carries an owner record (:data:`OWNER_FILE`: host name, boot id, PID namespace,
pid and the process's start time in clock ticks since boot), and every conversion first sweeps the
temporary directories of the same output.

A directory is removed only when it is provably ours and dead: its name is ours for this output,
it is a real directory (not a symlink), its record names this output, and its owner ran on this
host, since the same boot, in the same PID namespace, and that pid is now gone or belongs to a
process started at another time (a reused pid). Anything else is reported with its size and left
alone: another host's conversion (a shared filesystem is visible from many nodes, and no local
check can see a remote process), a container with its own PID namespace, a host that rebooted (or
another host with the same name), a directory without a record (an older megatron-dpsl, or a
conversion in its first instant), and ``.upcycle-old-`` directories (a replaced output moved aside
by ``--force``: the user's previous checkpoint).

Why not a lock (``fcntl.flock``) held for the conversion's life: on the filesystems large
checkpoints live on it does not prove liveness across nodes. Lustre mounted with ``localflock``
grants each node its own lock, NFS locks depend on lockd/NFSv4 state and can be lost or refused, and
a lock that is wrongly free means deleting a live conversion. A record read back and checked on
the owner's own host needs no lock service and fails safe: when in doubt, nothing is removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

OWNER_FILE = ".upcycle-owner.json"
TMP_INFIX = ".upcycle-tmp-"
OLD_INFIX = ".upcycle-old-"
TOOL = "megatron-dpsl-upcycle"


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if
    unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def canonical(target: Path) -> str:
    """``target`` with its parent's symlinks resolved: one name for one output directory."""
    target = Path(target).absolute()
    return os.path.join(os.path.realpath(target.parent), target.name)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Owner:
    """The conversion process that owns a temporary directory."""

    target: str  # the absolute output path it writes
    host: str
    boot_id: str | None  # /proc/sys/kernel/random/boot_id: changes at every boot
    pid_namespace: str | None  # pids are comparable only within one namespace (containers)
    pid: int
    start_ticks: int | None  # tells a reused pid from the owner
    started_utc: str
    tool: str = TOOL

    @classmethod
    def current(cls, target: Path) -> Owner:
        return cls(
            target=canonical(target),
            host=socket.gethostname(),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_namespace=_pid_namespace(),
            pid=os.getpid(),
            start_ticks=process_start_ticks(os.getpid()),
            started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started_utc}"


def write_owner(tmp: Path, target: Path) -> None:
    """Record this process as the owner of ``tmp`` (written to a side name, then renamed: never half
    a record)."""
    record = json.dumps(dataclasses.asdict(Owner.current(target)))
    side = tmp / f"{OWNER_FILE}.{uuid.uuid4().hex[:8]}"
    side.write_text(record)
    os.rename(side, tmp / OWNER_FILE)


def read_owner(tmp: Path) -> Owner | None:
    """The record in ``tmp``, or None if absent or not one of ours."""
    text = _read(str(tmp / OWNER_FILE))
    if text is None:
        return None
    try:
        data = json.loads(text)
        owner = Owner(**data)
    except (ValueError, TypeError):
        return None
    return owner if owner.tool == TOOL else None


def is_dead(owner: Owner) -> tuple[bool, str]:
    """(True, why) only when ``owner`` provably no longer runs; else (False, why it cannot be
    told)."""
    me = Owner.current(Path(owner.target))
    if owner.host != me.host:
        return (
            False,
            f"owned by another host ({owner.describe()}): cannot see its processes from here",
        )
    if owner.boot_id is None or owner.boot_id != me.boot_id:
        return (
            False,
            f"owner {owner.describe()} ran before a reboot or on another machine of the same name",
        )
    if owner.pid_namespace is None or owner.pid_namespace != me.pid_namespace:
        return False, f"owner {owner.describe()} ran in another PID namespace (container)"
    try:
        os.kill(owner.pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True, f"{owner.describe()}, no longer running"
    except PermissionError:
        pass  # it exists (another user's process): compare start times below
    ticks = process_start_ticks(owner.pid)
    if ticks is not None and owner.start_ticks is not None and ticks != owner.start_ticks:
        return (
            True,
            f"{owner.describe()}, no longer running (pid {owner.pid} now belongs to another "
            "process)",
        )
    return False, f"in use by a live conversion ({owner.describe()})"


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove_owned(path: Path) -> None:
    """Delete ``path``, its owner record last: a removal cut short is still recognised next time."""
    for entry in path.iterdir():
        if entry.name == OWNER_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / OWNER_FILE).unlink(missing_ok=True)
    path.rmdir()


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A temporary or aside directory of the same output found by :func:`sweep`."""

    path: Path
    size: int
    removed: bool
    reason: str

    def message(self) -> str:
        from megatron_dpsl.upcycle.summary import format_bytes

        verb = "removed stale temporary directory" if self.removed else "left alone"
        return f"{verb} {self.path} ({format_bytes(self.size)}): {self.reason}"


def sweep(target: Path, remove: bool = True) -> list[Leftover]:
    """Find the temporary (and aside) directories of ``target``; remove those provably dead if
    ``remove``."""
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        name = entry.name
        if name.startswith(f".{target.name}{OLD_INFIX}"):
            why = f"a previous {target.name} moved aside by --force; restore or delete it by hand"
            found.append(Leftover(entry, tree_size(entry), False, why))
            continue
        if (
            not name.startswith(f".{target.name}{TMP_INFIX}")
            or entry.is_symlink()
            or not entry.is_dir()
        ):
            continue
        owner = read_owner(entry)
        if owner is None:
            why = (
                "no owner record (an older megatron-dpsl, or a conversion starting now); "
                "delete it by hand if no conversion of this output runs"
            )
            found.append(Leftover(entry, tree_size(entry), False, why))
            continue
        size = tree_size(entry)
        if owner.target != canonical(target):
            found.append(
                Leftover(entry, size, False, f"its record names another output, {owner.target}")
            )
            continue
        dead, why = is_dead(owner)
        if not dead or not remove:
            found.append(
                Leftover(entry, size, False, why if not dead else f"{why}; a real run removes it")
            )
            continue
        # claim it first: of two sweeps racing, one rename wins and the other finds nothing
        claimed = parent / f".{target.name}{TMP_INFIX}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, claimed)
            _remove_owned(claimed)
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(Leftover(entry, size, False, f"{why}; could not remove it: {exc}"))
            continue
        found.append(Leftover(entry, size, True, why))
    return found
