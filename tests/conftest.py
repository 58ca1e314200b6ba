"""Shared test setup: the Triton interpreter switch and the fixtures tests share (the cases,
the float64 reference and the bound-based assert are in helpers.py).

Without a GPU, Triton kernels are tested on CPU tensors through Triton's interpreter, which must
be switched on before ``triton`` is first imported: that is done here, before any test module
loads. (``import torch`` does not import triton.)
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fp32_dots(request):
    """fp32 dots in ieee (the default) or tf32, by ``torch.backends.cudnn.allow_tf32``, which
    the fp32 Triton kernels follow; restored afterwards.

    The Triton test modules use it on every test (``pytestmark``) so that fp32 tolerances can
    be fp32's; a test asks for tf32 with ``@pytest.mark.parametrize("fp32_dots", [True],
    indirect=True)``. The value given to the test is whether tf32 is on.
    """
    tf32 = getattr(request, "param", False)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    yield tf32
    torch.backends.cudnn.allow_tf32 = saved
