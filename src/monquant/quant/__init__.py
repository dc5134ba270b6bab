"""Quantization: the uniform weight quantizer (``uniform``), iterate quantizers (``iterate``,
Corollary 2), straight-through estimators (``ste``) and ProxQuant (``prox``)."""
