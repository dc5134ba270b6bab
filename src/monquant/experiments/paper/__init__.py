"""The source paper's experiments (``monquant reproduce``): phase transition, displacement,
QAT vs PTQ, iterate quantization, the stage driver (``reproduce``) and its report."""
