"""Kernel correctness: parity checks against float32 references (GDN, attention, MoE experts).

`python -m qnext.kernels --suite fast|full|gdn-fast|bug640|cpu` runs a suite; `make doctor` runs
`fast`. Every check prints its relative errors next to their thresholds; NaN always fails.
"""
from .report import Check, markdown_table, perturbed, rel_err  # noqa: F401
