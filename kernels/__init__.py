"""Triton kernels of dynconv (installed as ``dynconv.kernels``). They know nothing of autograd.

Modules: ``configs`` (autotune config generation and pruning, shared by all kernels), ``mix``
(per-sample weight mixing), ``conv_forward`` (implicit-GEMM forward, premix and fused).

Compile-check contract: ``python -m dynconv.autotune compile-check`` imports every module of this
package (``pkgutil.iter_modules``) and, where a module defines a module-level function
``compile_cases()``, compiles each case it returns for sm_80 and sm_90 with no GPU. A case is a
``dynconv.kernels.configs.CompileCase``::

    CompileCase(kernel,     # the @triton.jit function itself, not an autotuner around it
                signature,  # {arg name: "*fp16" | "*bf16" | "*fp32" | "i32" | "i64" | "constexpr"}
                constexprs, # {arg name: value} for every constexpr (block sizes included)
                num_warps, num_stages,
                name)       # readable and unique, e.g. "conv_fwd fused tap fp16 M64 N32 K32 w4 s3"

A kernel module adds its own ``compile_cases()`` (usually every config of its config function
in a few representative dtypes); nothing needs registering elsewhere. Any compile error, any
register spill and any shared memory above the target's limit fail the check.
"""
