"""The ``native`` backend: PyTorch's own convolution and matmul kernels with a lean custom
backward (``op``), the ways of convolving a chunk of samples (``formulations``) and the measured
rule that picks one per part (``rule``)."""
