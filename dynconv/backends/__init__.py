"""The implementations behind ``dynamic_conv2d``, looked up by name in :mod:`.registry`.

- ``reference``: the plain-autograd baselines users write today (``loop``, ``grouped``);
- ``custom_op``: the ``torch.library`` op definition that ``native`` and ``triton`` share;
- ``native/``: PyTorch's own kernels with a lean custom backward (op, formulations, rule);
- ``triton/``: the Triton kernels of :mod:`dynconv.kernels` as a trainable op (op, forward,
  backward).

Backends import :mod:`dynconv.geometry` and the kernels, never the dispatcher.
"""

from .registry import BACKEND_NAMES, Backend, check_backend_name, get_backend, resolve

__all__ = ["BACKEND_NAMES", "Backend", "check_backend_name", "get_backend", "resolve"]
