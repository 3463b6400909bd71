"""Triton kernels (RMSNorm, causal attention) and their megatron-core adapters."""
