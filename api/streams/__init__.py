"""The Daydream-compatible /v1/streams API: streams, their ids and keys, params."""
