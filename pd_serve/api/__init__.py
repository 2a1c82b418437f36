"""OpenAI-compatible HTTP API of one aggregated instance: wire protocol, errors, the server."""
