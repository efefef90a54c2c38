"""Children that die with their parent: no orphan worker after the server is killed with SIGKILL.

The parent names itself in the child's environment (:data:`PARENT_ENV`); the
child calls :func:`exit_with_parent` first thing. On Linux the kernel then
sends SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a parent
that died before that call is noticed by its pid. Elsewhere a thread polls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "STREAMDIFFUSION_PARENT_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) plus this process as the parent the child must not outlive."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def exit_with_parent() -> None:
    """In a child: end with SIGTERM when the parent named by :data:`PARENT_ENV` dies (no-op without it)."""
    value = os.environ.get(PARENT_ENV, "")
    if not value.isdigit():
        return
    parent = int(value)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
    if sys.platform != "linux":
        threading.Thread(target=_watch, args=(parent,), name="lifeline", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
