"""Triton kernels of dynconv (installed as ``dynconv.kernels``). They know nothing of autograd.

Modules: ``configs`` (autotune config generation and pruning, shared by all kernels), ``mix``
(per-sample weight mixing), ``conv_forward`` (implicit-GEMM forward, premix and fused),
``conv_dgrad`` (grad_input: per-sample transposed implicit GEMM), ``conv_wgrad`` (per-sample
weight gradient contracted onto the bank, bias-bank and routing gradients in its epilogue),
``tuned_table`` (the persisted per-GPU tuned configs, consulted before autotuning), ``offsets``
(how far offsets reach into a tensor, and the int32 limit).

Compile-check contract: ``python -m dynconv.autotune compile-check`` imports every module of this
package (``pkgutil.iter_modules``) and, where a module defines a module-level function
``compile_cases()``, compiles each case it returns for sm_80 and sm_90 with no GPU. A case is a
``dynconv.kernels.configs.CompileCase``::

    CompileCase(kernel,     # the @triton.jit function itself, not an autotuner around it
                signature,  # {arg name: "*fp16" | "*bf16" | "*fp32" | "i32" | "i64" | "constexpr"}
                constexprs, # {arg name: value} for every constexpr (block sizes included)
                num_warps, num_stages,
                name,       # readable, unique: "conv_fwd fused tap cl fp16 M64 N32 K32 w4 s3"
                divisible)  # optional: names of arguments that are multiples of 16 (aligned)

A kernel module adds its own ``compile_cases()`` (usually every config of its config function
in a few representative dtypes); nothing needs registering elsewhere. Arguments that real
launches pass as 1 (unit strides) are specialized by Triton as constexpr 1: compile them that
way (signature "constexpr", value 1) so the check sees the code that actually runs. Any
compile error, any register spill and any shared memory above the target's limit fail the
check.
"""
