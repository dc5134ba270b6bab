"""Training: the loop (``loop``), quantized training methods (``methods``: STE, margin-aware,
ProxQuant placements), the lean optimizer and schedule (``optim``) and run folders (``runs``)."""
