"""Shared test setup.

Without a GPU, Triton kernels are tested on CPU tensors through Triton's interpreter, which must
be switched on before ``triton`` is first imported: that is done here, before any test module
loads. (``import torch`` does not import triton.)
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
