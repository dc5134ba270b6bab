"""Integer deployment: fixed-point arithmetic (``fixedpoint``), the integer FB solver with its
certificate (``intsolver``) and deployment files (``files``)."""
