"""The server users start (``python -m api``, ``sd-server``): the HTTP API, the relay and local workers in one
process.
"""
