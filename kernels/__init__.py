"""Triton kernels of dynconv (installed as ``dynconv.kernels``). They know nothing of autograd."""
