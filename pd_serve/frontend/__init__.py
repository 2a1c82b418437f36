"""Minimal disaggregated front end: OpenAI API in, prefill forwarding with retry, SSE relay."""
