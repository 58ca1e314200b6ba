"""Triton kernels of dynconv (installed as ``dynconv.kernels``). They know nothing of autograd.

Modules: ``mix`` (per-sample weight mixing into the conv kernels' layout), ``conv_fwd``
(implicit-GEMM forward, premix and fused), ``conv_fwd_spanning`` (the batch-spanning forward:
one implicit GEMM over the whole batch's output pixels, the bank shared, the routing applied per
expert), ``conv_fwd_tma`` (premix on Hopper's TMA tensor descriptors, for stride 1, groups 1,
bf16 / fp16 channels_last), ``conv_bwd_dx`` (grad_input: per-sample transposed
implicit GEMM), ``conv_bwd_dw`` (per-sample weight gradient on tensor cores, contracted onto
the bank and routing gradients in registers), ``configs`` (every kernel's candidate configs,
autotune keys and prunes), ``tuned_table`` (the persisted per-GPU tuned configs, consulted
before autotuning), ``_experts`` (the unrolled expert mixing that the fused forward and the
input gradient share), ``_taps`` (the x tile of a forward reduction step, tap-major or
flattened, shared by the forward kernels), ``_common`` (the interpreter switch, dot precision
settings, offset spans and the int32 limit).

One naming scheme: in module ``<op>``, ``<op>_kernel`` is the ``@triton.jit`` function,
``<op>_tuned`` its autotuner wrapped by ``tuned_table.with_tuned_table`` (its tuned-table name is
``"<op>"``), and ``<op>()`` the launcher; ``configs`` holds ``<op>_configs()``,
``prune_<op>_configs`` and ``<OP>_KEY``. Kernel arguments are ``<tensor>_ptr``,
``<tensor>_stride_<dim>`` and upper-case sizes (``C_IN_G``, ``HO``, ``NUM_EXPERTS``...).

The compile-check (``python -m dynconv.autotune compile-check``) drives the launchers of the
Triton backend on meta tensors, captures every launch with the configs the autotuner would try,
and compiles each specialisation Triton's binder gives it for sm_80 and sm_90: a new kernel is
checked as soon as a launcher launches it; any compile error, register spill or shared memory
above the target's limit fails the check.
"""
