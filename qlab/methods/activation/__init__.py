"""Methods that quantize activations too: W8A8 with or without SmoothQuant, and LLM.int8()."""
