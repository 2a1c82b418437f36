"""KV cache hand-off: contiguous transfer layout, RecvScatter and the cann_ext transports."""
