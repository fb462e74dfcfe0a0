"""Layer 1, losses: pure tensor math, no process groups, no Megatron.

The DPSL loss (torch and Triton), the Beta CDF, ranking, priors, the variance and orthogonality
losses. Every function takes tensors and numbers and returns tensors.
"""
