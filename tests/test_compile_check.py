"""``python -m dynconv.autotune compile-check``: discovery, resource parsing, verdicts, one compile.

The full check (every kernel x config) runs in CI through ``make compile-check``; here one small
case is compiled for real in a subprocess (the test process runs under the interpreter).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from dynconv.autotune import compile_check
from dynconv.autotune.compile_check import Result, parse_resource_usage

SAMPLE = """
Resource usage:
 Common:
  GLOBAL:0
 Function conv_forward_kernel:
  REG:255 STACK:104 SHARED:1024 LOCAL:8 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    assert parse_resource_usage(SAMPLE) == (255, 112, 1024)  # spills = STACK + LOCAL


def test_parse_resource_usage_rejects_garbage():
    with pytest.raises(ValueError, match="resource usage"):
        parse_resource_usage("cuobjdump: fatal error")


def test_verdicts():
    limit = 1000
    assert Result("ok", 90, 128, 0, 999).problems(limit) == []
    assert "spills 8 bytes" in Result("spill", 90, 128, 8, 0).problems(limit)
    assert any("shared memory 1001 > limit" in p
               for p in Result("smem", 90, 128, 0, 1001).problems(limit))
    assert any("compile error" in p for p in Result("bad", 80, error="boom").problems(limit))


def test_discovery_finds_forward_kernels_with_complete_signatures():
    cases = compile_check.discover_cases()
    modules = {module for module, _, _ in cases}
    assert {"dynconv.kernels.mix", "dynconv.kernels.conv_forward"} <= modules
    names = [case.name for _, _, case in cases]
    assert len(names) == len(set(names)), "compile case names must be unique"
    for _, _, case in cases:
        function = getattr(case.kernel, "fn", case.kernel)
        arg_names = list(inspect.signature(function).parameters)
        assert set(case.signature) == set(arg_names), case.name
        constexprs = {name for name, kind in case.signature.items() if kind == "constexpr"}
        assert constexprs == set(case.constexprs), case.name
        # tl.dot's operand blocks must be >= 16 on a GPU.
        for block in ("BLOCK_N", "BLOCK_K"):
            if block in case.constexprs:
                assert case.constexprs[block] >= 16, case.name


def test_only_filter():
    cases = compile_check.discover_cases(r"^conv_fwd fused tap cl fp16 M64 N32 ")
    assert [case.name for _, _, case in cases] == ["conv_fwd fused tap cl fp16 M64 N32 K32 w4 s3"]


def test_refuses_to_run_under_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compile_check.main([]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_exit_status_reflects_failures(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake_cases = [("m", 0, None), ("m", 1, None)]
    monkeypatch.setattr(compile_check, "discover_cases", lambda only=None: fake_cases)
    verdicts = {0: Result("fine", 90, 64, 0, 100), 1: Result("spilling", 90, 255, 64, 100)}
    monkeypatch.setattr(compile_check, "compile_one",
                        lambda module, index, arch: verdicts[index])
    assert compile_check.main(["--arch", "90", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: spills 64 bytes" in out and "fine" in out
    verdicts[1] = Result("now fine", 90, 200, 0, 100)
    assert compile_check.main(["--arch", "90", "--jobs", "1"]) == 0


def test_compiles_one_case_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "compile-check", "--only",
         r"^mix fma fp16 B16 ", "--arch", "90", "--jobs", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("mix fma fp16 B16"))
    assert row.split()[-1] == "ok"
    registers = int(row.split()[-5])
    assert 0 < registers <= 255


def test_shared_memory_estimate_covers_compiled_kernel():
    """The runtime pruning's shared-memory estimate is not below what the compiler allocates."""
    from dynconv.kernels.configs import conv_forward_configs, conv_forward_shared_bytes

    largest = conv_forward_configs(interpreter=False)[-1]
    kw = largest.kwargs
    pattern = (rf"^conv_fwd premix tap cl fp32 M{kw['BLOCK_M']} N{kw['BLOCK_N']} "
               rf"K{kw['BLOCK_K']} ")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "compile-check", "--only", pattern,
         "--arch", "90", "--jobs", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("conv_fwd"))
    shared = int(row.split()[-3])
    assert 0 < shared <= conv_forward_shared_bytes(largest, 4)
