"""The ``triton`` backend: the kernels of :mod:`dynconv.kernels` as a trainable custom op
(``op``), with the forward's strategy and chunking (``forward``) and the backward's launches
(``backward``)."""
