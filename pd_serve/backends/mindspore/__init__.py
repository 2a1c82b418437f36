"""MindSpore backend: the Llama-family decoder as graph-mode cells behind ModelRunner."""
