"""``python -m dynconv.autotune compile-check``: launch capture, Triton's specialisation, resource
and SASS parsing, verdicts, and a real compile of a few captured launches.

The full check (every captured specialisation, sm_80 and sm_90, CI's Triton and Triton 3.6) runs
in CI through ``make compile-check``. Capturing and compiling need Triton's compiler, not its
interpreter, which this test process runs under: those parts run in subprocesses.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest
from helpers import env_without_interpreter

from dynconv.autotune import sass
from dynconv.autotune.compile_check import Result, parse_resource_usage
from dynconv.autotune.launch_capture import CompileJob

SAMPLE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function conv_fwd_kernel:
  REG:255 STACK:104 SHARED:1024 LOCAL:8 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# A trimmed cuobjdump -sass listing: an outer loop (0x0100-0x0400) holding an inner one
# (0x0200-0x0300) with the wgmma, a cp.async and a plain load.
SAMPLE_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
        /*0100*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;     /* 0x0 */
        /*0200*/                   LDGSTS.E.BYPASS.128 [R16], desc[UR18][R22.64], P0 ;
        /*0210*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0220*/                   WARPGROUP.ARRIVE ;
        /*0230*/                   HGMMA.64x64x16.F32 R24, gdesc[UR28].tnspB, R24 ;
        /*0240*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0300*/               @P0 BRA 0x200 ;
        /*0400*/               @P1 BRA 0x100 ;
        /*0410*/                   EXIT ;
        /*0420*/                   BRA 0x420;
"""


def test_parse_resource_usage():
    assert parse_resource_usage(SAMPLE_USAGE) == (255, 112, 1024)  # spills = STACK + LOCAL
    with pytest.raises(ValueError, match="resource usage"):
        parse_resource_usage("cuobjdump: fatal error")


def test_sass_main_loop_is_the_innermost_loop_with_the_tensor_core_op():
    instructions = sass.parse(SAMPLE_SASS)
    assert [i.op for i in instructions][:3] == ["LDC", "LDG", "LDGSTS"]
    assert sass.loops(instructions) == [(0x200, 0x300), (0x100, 0x400)]  # not the trap loop
    stats = sass.analyse(SAMPLE_SASS)
    assert (stats.wgmma, stats.mma_sync, stats.async_loads, stats.plain_loads) == (1, 0, 1, 2)
    assert stats.tensor_core == "wgmma"
    assert stats.main_loop == sass.LoopStats(instructions=6, tensor_core=1, async_loads=1,
                                             plain_loads=1, waits_for_mma=True)


def test_sass_without_tensor_cores_takes_the_largest_innermost_loop():
    text = SAMPLE_SASS.replace("HGMMA.64x64x16.F32", "FFMA")
    loop = sass.analyse(text).main_loop
    assert loop.tensor_core == 0 and loop.instructions == 6
    assert sass.analyse("no code here").main_loop is None


def _job(**overrides) -> CompileJob:
    values = dict(module="m", kernel="conv_fwd_kernel", arch=90,
                  signature={"x_ptr": "*bf16", "x_stride_c": "constexpr", "H": "i32",
                             "BLOCK_M": "constexpr"},
                  constexprs={(1,): 1, (3,): 64}, attrs={(0,): [["tt.divisibility", 16]]},
                  options={"num_warps": 4, "num_stages": 3}, labels=["a case"])
    values.update(overrides)
    return CompileJob(**values)


def test_job_descriptions():
    job = _job()
    assert job.config == "M64 w4 s3"
    assert job.dtype == "bf16"
    assert job.specialisation == "1D 1x1 0xi64 of 3"


def test_verdicts():
    limit = 1000
    assert Result(_job(), 128, 0, 999).problems(limit) == []
    assert "spills 8 bytes" in Result(_job(), 128, 8, 0).problems(limit)
    assert any("shared memory 1001 > limit" in p
               for p in Result(_job(), 128, 0, 1001).problems(limit))
    assert any("compile error" in p for p in Result(_job(), error="boom").problems(limit))


def test_refuses_to_run_under_interpreter(monkeypatch, capsys):
    from dynconv.autotune import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compile_check.main([]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


CAPTURE_SCRIPT = textwrap.dedent("""
    import json
    from dynconv.autotune.launch_capture import DrivenCase, jobs_for
    from dynconv.autotune.shapes import get_shape_set
    layer = next(s for s in get_shape_set("resnet18") if s.name == "layer3.0.conv2")
    jobs = jobs_for([90], [DrivenCase(layer, 32, 4, "bf16", True)])
    print(json.dumps([dict(kernel=j.kernel, signature=j.signature,
                           divisible=sorted(p[0] for p, a in j.attrs.items() if a),
                           constexprs={str(k): v for k, v in j.constexprs.items()},
                           labels=j.labels) for j in jobs]))
""")


def test_capture_specialises_like_a_real_launch():
    """A channels_last bf16 launch: every kernel is captured, pointers are 16-byte aligned and
    the unit channel stride of x is compiled as the constant 1, as Triton does at launch."""
    run = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT], capture_output=True,
                         text=True, env=env_without_interpreter(), timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = json.loads(run.stdout)
    assert {j["kernel"] for j in jobs} == {"mix_kernel", "conv_fwd_kernel",
                                           "conv_fwd_spanning_kernel", "conv_fwd_tma_kernel",
                                           "conv_bwd_dx_kernel", "conv_bwd_dw_kernel"}
    forward = [j for j in jobs if j["kernel"] == "conv_fwd_kernel"]
    assert {label.rsplit(" ", 1)[-1] for j in forward for label in j["labels"]} == {
        "fwd-premix", "fwd-fused"}
    spanning = [j for j in jobs if j["kernel"] == "conv_fwd_spanning_kernel"]
    assert spanning and all(label.endswith("fwd-spanning") for j in spanning
                            for label in j["labels"])
    for job in forward + spanning:
        names = list(job["signature"])
        assert job["signature"]["x_stride_c"] == "constexpr"
        assert job["constexprs"][str((names.index("x_stride_c"),))] == 1
        pointers = [i for i, n in enumerate(names) if n.endswith("_ptr")]
        assert set(pointers) <= set(job["divisible"])


def test_compiles_captured_launches_for_sm90(tmp_path):
    """A few real compiles end to end, with the report written."""
    pattern = r"5->7 k3 s1 @9x8 B3 K1 fp32 nchw fwd-premix"
    run = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "compile-check", "--only", pattern,
         "--arch", "90", "--jobs", "1", "--report", str(tmp_path)],
        capture_output=True, text=True, env=env_without_interpreter(), timeout=600, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (csv_path,) = tmp_path.glob("codegen_triton*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert {row["kernel"] for row in rows} == {"mix", "conv_fwd"}
    for row in rows:
        assert row["status"] == "ok" and row["sm"] == "90"
        assert 0 < int(row["registers"]) <= 255
    forward = [row for row in rows if row["kernel"] == "conv_fwd"]
    assert all(row["tensor_core"] == "wgmma" for row in forward)
    (summary,) = tmp_path.glob("summary_triton*.md")
    assert "| conv_fwd | premix nchw | 90 |" in summary.read_text()


def test_no_sass_reads_resources_and_leaves_the_disassembly_out(tmp_path):
    """``--no-sass`` (CI's compile-check) still reads registers, spills and shared memory and
    gives the same verdict; only the SASS columns are empty."""
    pattern = r"5->7 k3 s1 @9x8 B3 K1 fp32 nchw fwd-premix"
    run = subprocess.run(
        [sys.executable, "-m", "dynconv.autotune", "compile-check", "--only", pattern,
         "--arch", "90", "--jobs", "1", "--no-sass", "--report", str(tmp_path)],
        capture_output=True, text=True, env=env_without_interpreter(), timeout=600, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (csv_path,) = tmp_path.glob("codegen_triton*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert rows
    for row in rows:
        assert row["status"] == "ok" and 0 < int(row["registers"]) <= 255
        assert row["spill_bytes"] == "0" and int(row["shared_bytes"]) >= 0
        assert row["tensor_core"] == "" and row["loop_instructions"] == ""


def test_shared_memory_estimate_covers_compiled_kernel():
    """The runtime pruning's shared-memory estimate is not below what the compiler allocates,
    for the largest forward config on a launch that keeps it (a wide bf16 channels_last layer,
    where the 64-channel reduction steps are allowed)."""
    script = textwrap.dedent("""
        from dynconv.autotune.compile_check import compile_job
        from dynconv.autotune.launch_capture import DrivenCase, jobs_for
        from dynconv.autotune.shapes import get_shape_set
        from dynconv.kernels.configs import conv_fwd_configs, conv_fwd_shared_bytes
        largest = max(conv_fwd_configs(interpreter=False),
                      key=lambda c: conv_fwd_shared_bytes(c, 2))
        layer = next(s for s in get_shape_set("resnet18") if s.name == "layer3.0.conv2")
        jobs = [j for j in jobs_for([90], [DrivenCase(layer, 32, 4, "bf16", True)])
                if j.kernel == "conv_fwd_kernel"
                and all(j.constexprs.get((list(j.signature).index(k),)) == v
                        for k, v in largest.kwargs.items())
                and j.options["num_stages"] == largest.num_stages]
        assert jobs, "the largest config was pruned for this layer"
        result = compile_job(jobs[0])
        print(result.shared_bytes, conv_fwd_shared_bytes(largest, 2))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env_without_interpreter(), timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled, estimate = (int(v) for v in run.stdout.split())
    assert 0 < compiled <= estimate


def test_driven_cases_include_fp32_ieee_launches():
    """fp32 is driven with tf32 on (PyTorch's default) and off ("ieee" dots, other kernels):
    the ResNet NCHW layers, one channels_last layer and the tests' odd shapes."""
    from dynconv.autotune.launch_capture import driven_cases

    cases = driven_cases()
    ieee = [c for c in cases if c.tf32 is False]
    assert all(c.dtype == "fp32" and c.label.endswith(" ieee") for c in ieee)
    assert not any(c.label.endswith(" ieee") for c in cases if c.tf32 is not False)
    names = {c.shape.name for c in ieee}
    assert {"layer1.0.conv1", "layer3.0.conv2"} <= names
    assert any(c.channels_last for c in ieee) and any(not c.channels_last for c in ieee)
    # Every fp32 shape driven with tf32 is driven with ieee dots too.
    assert {(c.shape, c.channels_last) for c in cases if c.dtype == "fp32" and c.tf32 is None
            and not c.channels_last} <= {(c.shape, c.channels_last) for c in ieee}


IEEE_CAPTURE_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from dynconv.autotune.launch_capture import DrivenCase, capture
    from dynconv.autotune.shapes import ConvShape
    shape = ConvShape("odd", 5, 7, 9, 8, 3, 3, 1, 1)
    out = {}
    for tf32 in (False, True, None):
        launches = capture([DrivenCase(shape, 3, 4, "fp32", False, tf32=tf32)], 80)
        out[str(tf32)] = sorted({(l.kernel.fn.__name__, l.kwargs["INPUT_PRECISION"])
                                 for l in launches})
        out[str(tf32) + " blocks"] = sorted({(l.kernel.fn.__name__, l.kwargs.get("BLOCK_K"),
                                              l.kwargs.get("BLOCK_P"), l.kwargs["num_warps"],
                                              l.kwargs["num_stages"]) for l in launches})
    out["restored"] = torch.backends.cudnn.allow_tf32
    print(json.dumps(out))
""")


def test_capture_drives_ieee_launches_with_their_configs():
    """A case with tf32 off is captured with "ieee" dots and the ieee configs (BLOCK_K = 16,
    the weight gradient's own configs); allow_tf32 is restored afterwards, and
    tf32=None follows the caller's setting (PyTorch's default: on)."""
    run = subprocess.run([sys.executable, "-c", IEEE_CAPTURE_SCRIPT], capture_output=True,
                         text=True, env=env_without_interpreter(), timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    kernels = {"mix_kernel", "conv_fwd_kernel", "conv_fwd_spanning_kernel",
               "conv_bwd_dx_kernel", "conv_bwd_dw_kernel"}
    assert {tuple(k) for k in out["False"]} == {(k, "ieee") for k in kernels}
    assert {tuple(k) for k in out["True"]} == {(k, "tf32") for k in kernels}
    assert out["None"] == out["True"] and out["restored"] is True
    from dynconv.kernels.configs import _CONV_BWD_DW_IEEE

    for name, block_k, block_p, warps, stages in out["False blocks"]:
        if name in ("conv_fwd_kernel", "conv_fwd_spanning_kernel", "conv_bwd_dx_kernel"):
            assert block_k == 16
        if name == "conv_bwd_dw_kernel":
            assert (block_p, warps, stages) in _CONV_BWD_DW_IEEE
    for _name, block_k, block_p, warps, stages in out["True blocks"]:
        assert block_k != 16 and (block_p, warps, stages) not in _CONV_BWD_DW_IEEE


ND_CAPTURE_SCRIPT = textwrap.dedent("""
    import json
    from dynconv.autotune.launch_capture import DrivenCase, capture, speech_1d, video_3d
    out = {}
    for name, case in (("1d", DrivenCase(speech_1d(), 2, 4, "bf16", True)),
                       ("3d", DrivenCase(video_3d(), 2, 4, "bf16", True))):
        seen = set()
        for launch in capture([case], 90):
            named = dict(zip(launch.kernel.arg_names, launch.args))
            if launch.kernel.fn.__name__ == "conv_fwd_kernel":
                seen.add((named["H"], named["W"], named["KH"], named["KW"],
                          named["x_ptr"].shape[0]))
        out[name] = sorted(seen)
    print(json.dumps(out))
""")


def test_compile_check_drives_the_1d_and_3d_layers_as_their_2d_launches():
    """The compile-check covers the 1-D and 3-D front ends through the 2-D launches they make:
    the speech-like 1-D layer as an H = 1, kh = 1 convolution of the whole batch, the video-like
    3-D one as 3x3 planes of the folded batch x output depth (2 x 8)."""
    from dynconv.autotune.launch_capture import driven_cases

    assert {c.shape.spatial_dims for c in driven_cases()} == {1, 2, 3}
    run = subprocess.run([sys.executable, "-c", ND_CAPTURE_SCRIPT], capture_output=True,
                         text=True, env=env_without_interpreter(), timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["1d"] == [[1, 1000, 1, 5, 2]]
    assert out["3d"] == [[56, 56, 3, 3, 16]]
