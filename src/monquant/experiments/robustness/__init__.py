"""Certified prediction agreement and robustness of quantized MonDEQs (issue 15)."""
