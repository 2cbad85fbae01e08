"""AMD ROCm platform: aiter kernels where installed, shared Triton kernels otherwise, RCCL."""
