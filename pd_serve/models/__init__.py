"""Model architectures (Llama/Qwen family), Hugging Face checkpoint loading and tokenizers."""
