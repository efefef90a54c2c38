"""Nothing left behind: a test's child processes and temporary files must be gone when it ends.

At configure time the run gets a temporary directory of its own, made in the
system one and exported as ``TMPDIR`` (and ``tempfile.tempdir``), so whatever
our code and its child processes create with ``tempfile`` lands there, apart
from what other users of a shared /tmp create meanwhile. pytest's own
``tmp_path`` directories stay in the system temp dir (``PYTEST_DEBUG_TEMPROOT``;
pytest keeps the last few runs' for debugging) and are not checked.

After each test, processes that appeared during it and are still alive fail
it by name (and are then killed), and so do new entries in the run's temp
directory (then removed). "Ours" means a descendant of this pytest process,
or any process whose environment carries the run's ``TMPDIR``: that also finds
a grandchild that outlived its parent and was re-parented to init. At the end
of the session the same is checked once more (what session fixtures left),
the exit status is set to failed if anything was found, and the directory is
removed. :meth:`Guard.allow` names a library cache expected there (torch's).
The kernel may lack ``/proc/<pid>/task/<tid>/children``
(CONFIG_PROC_CHILDREN), so parents come from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "sd-tests-"
TEMPROOT = "PYTEST_DEBUG_TEMPROOT"


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    state: str

    def describe(self) -> str:
        """``pid: command line`` for a report (the command may be gone by now)."""
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            raw = b""
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        return f"pid {self.pid}: {command or '?'}"


def read_processes() -> dict[int, Process]:
    """Every process visible in /proc, with its parent and state (``Z`` zombie, ``X`` dead)."""
    found: dict[int, Process] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
        found[int(entry.name)] = Process(int(entry.name), int(fields[1]), fields[0])
    return found


def descendants(root: int, processes: dict[int, Process]) -> set[int]:
    """Pids below ``root`` in the process tree (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def carries(pid: int, variable: bytes) -> bool:
    """Whether process ``pid`` started with ``variable`` (``NAME=value``) in its environment."""
    try:
        return variable in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # another user's process, or gone
        return False


def live_processes(tmpdir: Path) -> dict[int, Process]:
    """This run's live processes: descendants of pytest and anything started with its ``TMPDIR``."""
    processes = read_processes()
    me = os.getpid()
    mark = f"TMPDIR={tmpdir}".encode()
    tree = descendants(me, processes)
    return {
        pid: p
        for pid, p in processes.items()
        if pid != me and p.state not in "ZX" and (pid in tree or carries(pid, mark))
    }


def kill(processes: list[Process]) -> None:
    """SIGKILL leftovers so one test's mess does not leak into the next one or past the run."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signal.SIGKILL)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Guard:
    """The run's temp directory and what it replaced; records what was found for the summary."""

    tmpdir: Path
    saved_env: dict[str, str | None]
    saved_tempdir: str | None
    found: list[str] = field(default_factory=list)
    kept: set[str] = field(default_factory=set)

    @classmethod
    def install(cls) -> Guard:
        """Make the run's temp directory and point ``TMPDIR`` (inherited by children) at it."""
        system = tempfile.gettempdir()
        saved_env = {name: os.environ.get(name) for name in ("TMPDIR", TEMPROOT)}
        saved_tempdir = tempfile.tempdir
        tmpdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=system)).resolve()
        os.environ.setdefault(TEMPROOT, system)
        os.environ["TMPDIR"] = str(tmpdir)
        tempfile.tempdir = str(tmpdir)
        return cls(tmpdir, saved_env, saved_tempdir)

    def allow(self, name: str) -> None:
        """Let ``name`` appear in the run's temp dir: a library cache meant to outlive runs.

        It is no leftover here: it goes with the run's directory at the end.
        """
        self.kept.add(name)

    def uninstall(self) -> None:
        """Put the environment back and delete the run's temp directory."""
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = self.saved_tempdir
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def snapshot(self) -> tuple[set[int], set[str]]:
        return set(live_processes(self.tmpdir)), set(os.listdir(self.tmpdir))

    def leftovers(self, before: tuple[set[int], set[str]], who: str) -> str | None:
        """Describe, kill and remove what appeared since ``before``; None when nothing did."""
        pids, names = before
        processes = [p for pid, p in sorted(live_processes(self.tmpdir).items()) if pid not in pids]
        entries = sorted(set(os.listdir(self.tmpdir)) - names - self.kept)
        if not processes and not entries:
            return None
        lines = [f"{who} left behind:"]
        lines += [f"  live process {p.describe()}" for p in processes]
        lines += [f"  temp entry {self.tmpdir / name}" for name in entries]
        kill(processes)
        for name in entries:
            remove(self.tmpdir / name)
        report = "\n".join(lines)
        self.found.append(report)
        return report


GUARD = pytest.StashKey[Guard]()


def install(config: pytest.Config) -> Guard:
    """Give the run its own temp directory (call first thing in ``pytest_configure``)."""
    guard = config.stash[GUARD] = Guard.install()
    return guard


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(GUARD, None)
    if guard is not None:
        guard.uninstall()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture's teardown: whatever is still there fails the run."""
    guard = session.config.stash[GUARD]
    if guard.leftovers((set(), set()), "the session (its fixtures or an orphaned process)"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    guard = terminalreporter.config.stash.get(GUARD, None)
    if guard is not None and guard.found:
        terminalreporter.write_sep("=", "left behind (killed and removed)", red=True, bold=True)
        for report in guard.found:
            terminalreporter.write_line(report)


@pytest.fixture(autouse=True)
def _nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves a live child process or a temp entry, naming both."""
    guard = request.config.stash[GUARD]
    before = guard.snapshot()
    yield
    report = guard.leftovers(before, request.node.nodeid)
    if report is not None:
        pytest.fail(report, pytrace=False)
