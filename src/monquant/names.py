"""The shared vocabulary of the library and the command line, importable without torch.

One name for each thing, everywhere (JSON keys and values, tables, ``--help``; docs/cli.md lists
them): the command line validates its arguments against these tuples before it imports torch or
loads any data, and the modules that implement each concept import their names from here.

- bit-widths: integers in ``[MIN_BITS, MAX_BITS]``;
- quantizer step rules: ``paper`` (``2 w_max / (2^b - 1)``) and ``narrow`` (``w_max / (2^(b-1) - 1)``);
- granularities: ``per-tensor`` (one step for the tensor) and ``per-channel`` (one per row);
- splitting methods: ``fb`` (forward-backward), ``pr`` (Peaceman-Rachford), ``dr``
  (Douglas-Rachford) — the built-ins; :func:`monquant.solvers.register_solver` may add more;
- certificate tiers, strongest first: ``a_priori`` (``n D_b / 2 < m``, before quantizing),
  ``weyl`` (Theorem 2, ``||dW|| < m``), ``exact`` (``margin(W~) > 0``), ``none``; the low-bit
  study adds ``construction`` for factored weights that are monotone by construction;
- verdicts: ``certified``, ``refuted`` (proved non-monotone), ``undecided`` (within rounding);
- training methods: ``ptq``, ``ste``, ``margin`` (margin-aware QAT), ``proxquant-w``,
  ``proxquant-factors``;
- sweep executors: ``serial``, ``process`` (local worker processes), ``ray``.
"""

from __future__ import annotations

__all__ = [
    "EXECUTORS",
    "GRANULARITIES",
    "IMPORT_LAYOUTS",
    "MAX_BITS",
    "MIN_BITS",
    "QUANT_METHODS",
    "SPLITTING_METHODS",
    "STEP_RULES",
    "TIERS",
    "TIER_VALUES",
    "VERDICTS",
]

MIN_BITS, MAX_BITS = 2, 32
GRANULARITIES: tuple[str, ...] = ("per-tensor", "per-channel")
SPLITTING_METHODS: tuple[str, ...] = ("fb", "pr", "dr")
#: Quantizer step rules: ``paper`` ``D = 2 w_max / (2^b - 1)`` (the paper's text, the default),
#: ``narrow`` ``D = w_max / (2^(b-1) - 1)`` (the paper's code; torch.ao, TensorRT, Brevitas).
STEP_RULES: tuple[str, ...] = ("paper", "narrow")
#: The certificate tiers in the order they imply each other (a_priori => weyl => exact).
TIERS: tuple[str, ...] = ("a_priori", "weyl", "exact")
#: Every value a ``tier`` field takes.
TIER_VALUES: tuple[str, ...] = ("construction", *TIERS, "none")
VERDICTS: tuple[str, ...] = ("certified", "refuted", "undecided")
#: Checkpoint layouts ``monquant import`` reads (``monquant.storage.foreign``).
IMPORT_LAYOUTS: tuple[str, ...] = ("mondeq-quant", "monotone-op-net")
QUANT_METHODS: tuple[str, ...] = ("ptq", "ste", "margin", "proxquant-w", "proxquant-factors")
#: Where a sweep's independent tasks run (``monquant.executors``).
EXECUTORS: tuple[str, ...] = ("serial", "process", "ray")
