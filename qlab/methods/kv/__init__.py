"""KV-cache quantization: what is stored for the keys and values a later token attends to."""
