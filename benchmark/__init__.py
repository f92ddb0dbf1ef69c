"""dtda-bench: a benchmark for distributional training data attribution (d-TDA).

Sign convention, fixed once for the whole suite: every effect is **removed minus full**,
``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``. Mlodozeniec et al. 2025 (d-TDA, arXiv 2506.12965)
eq. (1) is full − removed; convert at the boundary.
"""

__version__ = "0.1.0"
