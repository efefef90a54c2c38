"""The server users start: relay, local workers and (later) the HTTP API in one process."""
