"""The P/D gateway: OpenAI-compatible front, scenario routing, on-demand forwarding with
rejections (and the fifo / round-robin baselines), SSE relay, request timelines and metrics."""
