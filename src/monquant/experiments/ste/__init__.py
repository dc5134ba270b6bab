"""The finite-sample STE study (``monquant ste-recovery``): the binary two-layer model and its STE
gradient (``binary_ste``), scaling-law fits (``scaling_fit``) and the driver with its report
(``study``)."""
