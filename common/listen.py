"""Listening sockets bound up front, so a port in use is one clear line, not a traceback."""

from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """The address is taken; ``str()`` is a sentence naming it, for a one-line error."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"port {port} on {host} is in use")
        self.host, self.port = host, port

    def __str__(self) -> str:
        return self.strerror or ""


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock
