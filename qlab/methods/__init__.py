"""Quantization methods (being unified behind one registry; see issue 10)."""
