"""PyTorch backend: the Llama-family decoder and its ModelRunner (CPU and CUDA)."""
