"""The leftovers guard (tests/leftovers.py): the run's own TMPDIR, and what it finds, kills and removes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.leftovers import PREFIX, Guard, descendants, live_processes, read_processes

LIMIT = 20.0
BLOCK = "import sys; sys.stdin.read()"  # a process that lives until its stdin closes


def wait_gone(pid: int) -> None:
    """Wait for a process that is not our child to exit (a pidfd turns readable)."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], LIMIT)[0], f"pid {pid} still runs"
    finally:
        os.close(fd)


def test_children_inherit_the_runs_own_temp_dir() -> None:
    tmpdir = os.environ["TMPDIR"]
    assert Path(tmpdir).name.startswith(PREFIX) and tempfile.gettempdir() == tmpdir
    child = subprocess.run(
        [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=LIMIT,
    )
    assert child.stdout.strip() == tmpdir


def test_an_orphaned_grandchild_is_found_by_its_tmpdir() -> None:
    """Its parent exited, so it is no longer our descendant; the inherited TMPDIR still marks it ours."""
    spawn = f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {BLOCK!r}]).pid)"
    child = subprocess.Popen(
        [sys.executable, "-c", spawn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        grandchild = int(child.stdout.readline())
        assert child.wait(LIMIT) == 0
        assert grandchild not in descendants(os.getpid(), read_processes())
        assert grandchild in live_processes(Path(os.environ["TMPDIR"]))
    finally:
        child.stdin.close()  # the grandchild shares this pipe: EOF ends it
        child.stdout.close()
    wait_gone(grandchild)


def test_what_a_test_leaves_is_reported_killed_and_removed(tmp_path: Path) -> None:
    guard = Guard(tmp_path, {}, None)
    guard.allow("library-cache")
    before = guard.snapshot()
    (tmp_path / "library-cache").mkdir()
    (tmp_path / "sd-hls-left").mkdir()
    (tmp_path / "sd-hls-left" / "index.m3u8").write_text("#EXTM3U\n")
    child = subprocess.Popen([sys.executable, "-c", BLOCK], stdin=subprocess.PIPE)
    report = guard.leftovers(before, "the test")
    assert report is not None and report.startswith("the test left behind:")
    assert f"live process pid {child.pid}: {sys.executable} -c" in report
    assert f"temp entry {tmp_path / 'sd-hls-left'}" in report and "library-cache" not in report
    assert child.wait(LIMIT) == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == [tmp_path / "library-cache"]
    assert guard.leftovers(guard.snapshot(), "the next test") is None
    assert guard.found == [report]
    assert child.stdin is not None
    child.stdin.close()
