"""Storage: atomic files (``files``), JSON results (``jsonio``), safe tensor files (``tensors``:
safetensors/npz, digest, no pickle) and model checkpoints (``checkpoints``)."""
