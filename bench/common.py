"""Process plumbing shared by the benchmarks: pinned processes, RSS/CPU of a process
tree, waiting for a quiet machine, and a funded key made through Bastion's store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Processes of other benchmarks on this machine that would disturb ours (checked before
# every measurement; see wait_quiet).
OTHERS = "wrk|bench/candidates"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Every process started through it, in its own session, killed (whole group) at stop."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        cores: str | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        argv = ["taskset", "-c", cores, *cmd] if cores is not None else cmd
        log = open(self.logdir / f"{name}.log", "ab")  # the child keeps it open
        proc = subprocess.Popen(
            argv,
            cwd=cwd or ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.bench_name = name  # type: ignore[attr-defined]
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # stragglers of the group (e.g. spawned workers that outlived their parent)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)

    def log_tail(self, proc: subprocess.Popen, n: int = 2000) -> str:
        path = self.logdir / f"{proc.bench_name}.log"  # type: ignore[attr-defined]
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_until(
    check: Callable[[], bool], proc: subprocess.Popen | None, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:g}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- /proc --------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kb(pid: int) -> int:
    """VmRSS of a process and all its descendants, in kB (0 for the gone)."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by a process tree (live descendants only)."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: a process and its reaped children, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(f) for f in fields[11:15])


SHARED_SERVICES = ("postgres", "redis-server")  # serve our targets: their CPU is not foreign


def _shared_services() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() in SHARED_SERVICES:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


class ForeignCPU:
    """CPU used on the machine by processes outside this benchmark's process tree.

    Machine-wide busy time (user + nice + system, from /proc/stat) minus what our own
    tree used (reaped children included) and PostgreSQL and Redis (which serve our
    targets), between `start()` and `cores()`. Catches any other load, whatever its name
    (kernel threads doing our network work count as foreign too, so a quiet machine
    reads a few percent of a core, not zero).
    """

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _sample() -> tuple[float, int, int]:
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        busy = int(cpu[1]) + int(cpu[2]) + int(cpu[3])
        mine = sum(_ticks(p) for p in set(tree(os.getpid())) | _shared_services())
        return time.monotonic(), busy, mine

    def start(self) -> None:
        self.t0, self.busy0, self.mine0 = self._sample()

    def cores(self) -> float:
        t, busy, mine = self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy - self.busy0) - (mine - self.mine0)) / hz / max(t - self.t0, 1e-3)


FOREIGN_LIMIT = 0.15  # cores of other load above which the machine is not quiet


def foreign_load(seconds: float = 1.0) -> float:
    f = ForeignCPU()
    time.sleep(seconds)
    return f.cores()


def others_running() -> list[str]:
    """Command lines of other benchmark processes (not ours) matching OTHERS."""
    out = subprocess.run(["pgrep", "-af", OTHERS], capture_output=True, text=True).stdout
    mine = set(tree(os.getpid()))
    return [line for line in out.splitlines() if line and int(line.split()[0]) not in mine]


def busy_reason() -> str:
    """Why the machine is not quiet now ('' if it is): another benchmark, or other load."""
    if others := others_running():
        return f"another benchmark runs: {others[0][:100]}"
    load = foreign_load(1.0)
    if load > FOREIGN_LIMIT:
        top = subprocess.run(
            ["ps", "-eo", "pcpu,pid,args", "--sort=-pcpu"], capture_output=True, text=True
        ).stdout.splitlines()[1:3]
        return f"{load:.2f} cores of other load ({'; '.join(s.strip()[:80] for s in top)})"
    return ""


def wait_quiet(max_wait: float, log: Callable[[str], None]) -> float:
    """Wait until the machine is quiet (up to max_wait seconds); returns seconds waited.

    Quiet: no process matching OTHERS (`wrk`, `bench/candidates`) outside our tree, and
    under FOREIGN_LIMIT cores of CPU used by processes outside our tree over 1 s.
    """
    started = time.monotonic()
    told = False
    while (why := busy_reason()) and time.monotonic() - started < max_wait:
        if not told:
            log(f"  waiting for a quiet machine: {why}")
            told = True
        time.sleep(2)
    if why:
        log(f"  WARNING: still not quiet after {max_wait:g} s ({why}); measuring anyway")
    elif told:
        log(f"  quiet again after {time.monotonic() - started:.0f} s")
    return time.monotonic() - started


# ---- Bastion's store ----------------------------------------------------------------


def make_key(db_url: str, credit_usd: str, rpm: int, tpm: int) -> str:
    """A fresh account with `credit_usd` and a key for it; returns the key's plaintext."""
    from bastion.money import parse_usd
    from bastion.store import open_store

    async def go() -> str:
        store = open_store(db_url)
        try:
            await store.migrate()
            await store.create_account("bench", parse_usd(credit_usd))
            _, key = await store.create_key("bench", name="bench", rpm=rpm, tpm=tpm)
            return key
        finally:
            await store.close()

    return asyncio.run(go())


def account(db_url: str) -> dict[str, int]:
    from bastion.store import open_store

    async def go() -> dict[str, int]:
        store = open_store(db_url)
        try:
            a = await store.get_account("bench")
            return {"balance": a.balance, "spent": a.spent, "reserved": a.reserved}
        finally:
            await store.close()

    return asyncio.run(go())


def pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())
