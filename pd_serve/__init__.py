"""pd-serve: disaggregated prefill/decode LLM serving, MindSpore-native with a PyTorch backend."""

__version__ = "0.1.0"
