"""Backend-agnostic engine: requests, paged-KV block manager with prefix cache, scheduler,
sampler and the engine loop."""
