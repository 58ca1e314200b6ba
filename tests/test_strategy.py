"""How the ``triton`` backend picks a strategy per call: forced (``dynconv.use_strategy``), the
tuned table's measured choice, benchmark mode's timed choice (``dynconv.set_benchmark``), the
rule; and the batch-spanning strategies on PyTorch's convolutions. Under Triton's interpreter,
with a fake timer where a choice is proved."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import env_without_interpreter

import dynconv
from dynconv import dynamic_conv2d
from dynconv.backends import benchmark
from dynconv.backends.triton import strategy
from dynconv.kernels import tuned_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_state(monkeypatch, tmp_path):
    """No table but the test's own, benchmark mode off and its cache empty, before and after."""
    monkeypatch.setenv(tuned_table.ENV_DIR, str(tmp_path / "tables"))
    monkeypatch.delenv(benchmark.ENV_BENCHMARK, raising=False)
    tuned_table.clear_cache()
    strategy.clear_benchmark_cache()
    monkeypatch.setattr(benchmark, "_benchmark", None)
    yield
    strategy.clear_benchmark_cache()
    tuned_table.clear_cache()


def _inputs(batch=2, channels=8, size=6, experts=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    bank = torch.randn(experts, channels, channels, 3, 3, generator=generator) * 0.2
    routing = torch.softmax(torch.randn(batch, experts, generator=generator), dim=1)
    bias = torch.randn(experts, channels, generator=generator)
    return [t.requires_grad_(True) for t in (x, bank, routing, bias)]


def _fake_timer(times: dict[str, float], calls: list):
    """A timer that runs nothing and says ``times[strategy]`` ms for a run of that strategy."""
    def timer(run, device, repeats):
        name = run.keywords["strategy"]
        calls.append(name)
        return times[name]
    return timer


def _grads(y, leaves, grad_out):
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]


# fp32 through PyTorch's convolutions and the interpreter's dots (ieee: tf32 is a GPU format),
# against the same computation in fp32 by the loop: reductions of ~100 terms
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("forward,backward", [("spanning_torch", "spanning_torch"),
                                              ("premix", "spanning_torch"),
                                              ("spanning_torch", "per_sample")])
def test_use_strategy_forces_both_directions(forward, backward):
    leaves = _inputs()
    want_y = dynamic_conv2d(*leaves, padding=1, backend="loop")
    grad_out = torch.randn_like(want_y)
    want = _grads(want_y, leaves, grad_out)
    with dynconv.use_strategy(forward=forward, backward=backward):
        y = dynamic_conv2d(*leaves, padding=1, backend="triton")
        got = _grads(y, leaves, grad_out)
    assert strategy.last_choice["forward"][1:] == (forward, "forced")
    assert strategy.last_choice["backward"][1:] == (backward, "forced")
    for name, g, w in zip(("y", "x", "bank", "routing", "bias"), got, want):
        torch.testing.assert_close(g, w, **TOLERANCE, msg=name)
    # outside the block: the rule again
    dynamic_conv2d(*leaves, padding=1, backend="triton")
    assert strategy.last_choice["forward"][2] == "rule"


def test_use_strategy_nests_and_checks_its_arguments():
    with dynconv.use_strategy(backward="spanning_torch"):
        with dynconv.use_strategy(forward="fused"):
            assert (strategy.forced("forward"), strategy.forced("backward")) == (
                "fused", "spanning_torch")
        assert strategy.forced("forward") is None
    assert strategy.forced("backward") is None
    with pytest.raises(ValueError, match="forward must be one of .*'bogus'"):
        with dynconv.use_strategy(forward="bogus"):
            pass
    with pytest.raises(ValueError, match="backward must be one of .*'premix'"):
        with dynconv.use_strategy(backward="premix"):
            pass
    with pytest.raises(TypeError, match="enabled must be a bool"):
        dynconv.set_benchmark("yes")


def test_benchmark_mode_is_off_by_default_and_follows_its_switches(monkeypatch):
    assert not benchmark.benchmark_enabled()
    monkeypatch.setenv(benchmark.ENV_BENCHMARK, "1")
    assert benchmark.benchmark_enabled()
    dynconv.set_benchmark(False)  # the call wins over the environment
    assert not benchmark.benchmark_enabled()
    dynconv.set_benchmark(True)
    assert benchmark.benchmark_enabled()


def test_benchmark_mode_times_each_key_once_and_keeps_the_fastest(monkeypatch):
    calls: list = []
    times = {"premix": 3.0, "fused": 1.0, "spanning": 2.0, "premix_tma": 0.5,
             "spanning_torch": 4.0, "per_sample": 2.0}
    monkeypatch.setattr(benchmark, "TIMER", _fake_timer(times, calls))
    dynconv.set_benchmark(True)
    leaves = _inputs()
    y = dynamic_conv2d(*leaves, padding=1, backend="triton")
    # premix_tma cannot run an NCHW fp32 call: not timed, not chosen
    assert sorted(calls) == sorted(["premix", "fused", "spanning", "spanning_torch"])
    assert strategy.last_choice["forward"][1:] == ("fused", "benchmark")
    torch.testing.assert_close(y, dynamic_conv2d(*leaves, padding=1, backend="loop"),
                               **TOLERANCE)
    y.sum().backward()
    assert sorted(calls[4:]) == ["per_sample", "spanning_torch"]
    assert strategy.last_choice["backward"][1:] == ("per_sample", "benchmark")
    # the same key again: no timing
    calls.clear()
    dynamic_conv2d(*leaves, padding=1, backend="triton").sum().backward()
    assert calls == []
    assert strategy.last_choice["forward"][1:] == ("fused", "benchmark")
    # another shape, another key: timed
    dynamic_conv2d(*_inputs(batch=3), padding=1, backend="triton")
    assert len(calls) == 4
    # a strategy that fails to run is not chosen
    calls.clear()
    times["fused"] = 99.0

    def broken(run, device, repeats):
        if run.keywords["strategy"] == "spanning":
            raise RuntimeError("no such kernel here")
        return times[run.keywords["strategy"]]

    monkeypatch.setattr(benchmark, "TIMER", broken)
    dynamic_conv2d(*_inputs(size=7), padding=1, backend="triton")
    assert strategy.last_choice["forward"][1:] == ("premix", "benchmark")


def test_the_tuned_tables_choice_comes_first(tmp_path, monkeypatch):
    """A measured choice in the table beats benchmark mode and the rule; forcing beats it."""
    leaves = _inputs()
    key = strategy.call_key(leaves[0].shape, leaves[1].shape, (1, 1), (1, 1), (1, 1), 1,
                            torch.float32, False, True)
    assert key == "B2 C8x6x6 O8 k3x3 s1x1 p1x1 d1x1 g1 K3 fp32 nchw bias"
    folder = tmp_path / "tables"
    folder.mkdir()
    import triton

    slug, name = tuned_table.device_id(torch.device("cpu"))
    table = {"format": 1, "device": name, "triton": triton.__version__, "kernels": {},
             "strategies": {"forward": {key: {"strategy": "spanning_torch"}},
                            "backward": {key + " grads1111": {"strategy": "spanning_torch"}}}}
    (folder / f"{slug}.json").write_text(json.dumps(table))
    calls: list = []
    monkeypatch.setattr(benchmark, "TIMER", _fake_timer({}, calls))
    dynconv.set_benchmark(True)
    y = dynamic_conv2d(*leaves, padding=1, backend="triton")
    y.sum().backward()
    assert calls == []
    assert strategy.last_choice["forward"] == (key, "spanning_torch", "table")
    assert strategy.last_choice["backward"] == (key + " grads1111", "spanning_torch", "table")
    with dynconv.use_strategy(forward="premix"):
        dynamic_conv2d(*leaves, padding=1, backend="triton")
    assert strategy.last_choice["forward"][1:] == ("premix", "forced")


def test_benchmark_mode_under_torch_compile(monkeypatch):
    """The choice happens inside the custom op at run time, so a compiled graph
    (fullgraph, dynamic) benchmarks on its first call too."""
    calls: list = []
    times = {"premix": 3.0, "fused": 2.0, "spanning": 1.0, "spanning_torch": 4.0,
             "per_sample": 1.0}
    monkeypatch.setattr(benchmark, "TIMER", _fake_timer(times, calls))
    dynconv.set_benchmark(True)
    leaves = _inputs()

    def step(x, bank, routing, bias):
        return dynamic_conv2d(x, bank, routing, bias, padding=1, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    y = compiled(*leaves)
    assert "spanning" in calls
    assert strategy.last_choice["forward"][1:] == ("spanning", "benchmark")
    torch.testing.assert_close(y, step(*leaves), **TOLERANCE)


def test_triton_interpret_set_after_import_is_a_clear_error():
    script = ("import os, torch, triton\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "import dynconv\n"
              "x = torch.randn(2, 8, 6, 6)\n"
              "try:\n"
              "    dynconv.dynamic_conv2d(x, torch.randn(3, 8, 8, 3, 3), torch.rand(2, 3),\n"
              "                           padding=1, backend='triton')\n"
              "except ValueError as exc:\n"
              "    print('ValueError:', exc)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env_without_interpreter(), cwd=ROOT, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after Triton was imported" in run.stdout


def test_the_interpreter_warns_once_that_it_is_a_correctness_tool(monkeypatch):
    from dynconv.backends import registry

    monkeypatch.setattr(registry, "_interpreter_warned", False)
    leaves = [t.detach() for t in _inputs()]
    with pytest.warns(RuntimeWarning, match="correctness tool about 1000x slower"):
        dynamic_conv2d(*leaves, padding=1, backend="triton")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynamic_conv2d(*leaves, padding=1, backend="triton")


def test_native_benchmark_mode_times_the_close_formulations_once(monkeypatch):
    """On the CPU the same switch times the native formulations where the measured rule is
    within 10 % of a threshold (here the weight gradient's im2col reduction, Cin * 9 = 2304:
    exactly at it), keeps the fastest per call signature, and leaves the rule alone elsewhere."""
    from dynconv.backends.native import op, rule

    op.clear_plan_cache()
    calls: list = []

    def timer(run, device, repeats):  # the grouped plan "wins"; nothing runs
        calls.append(run)
        return 1.0 if len(calls) == 2 else 2.0

    monkeypatch.setattr(benchmark, "TIMER", timer)
    args = (2, 256, 256, (5, 5), (3, 3), (5, 5), 1, torch.float32, False,
            torch.get_num_threads(), (1, 1))
    plans = rule.close_plans(*args)
    assert len(plans) == 2 and plans[0] == rule.choose_formulations(*args)
    assert rule.close_plans(2, 16, 16, (9, 9), (3, 3), (9, 9), 1, torch.float32, False, 1,
                            (1, 1)) == [rule.choose_formulations(2, 16, 16, (9, 9), (3, 3),
                                                                 (9, 9), 1, torch.float32,
                                                                 False, 1, (1, 1))]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 5, 5, generator=generator, dtype=torch.float64)
    bank = torch.randn(2, 256, 256, 3, 3, generator=generator, dtype=torch.float64) * 0.02
    routing = torch.softmax(torch.randn(2, 2, generator=generator, dtype=torch.float64), dim=1)
    dynconv.set_benchmark(True)
    y = dynamic_conv2d(x, bank, routing, padding=1, backend="native")
    assert len(calls) == 2
    chosen = [p for k, p in op._plan_cache.items() if k[-1]]
    assert [p.formulations for p in chosen] == [plans[1]] and chosen[0].benchmarked
    dynamic_conv2d(x, bank, routing, padding=1, backend="native")
    assert len(calls) == 2  # cached
    # float64 through other formulations: the same result to rounding
    torch.testing.assert_close(y, dynamic_conv2d(x, bank, routing, padding=1, backend="loop"))
    # far from every threshold: nothing to time
    dynamic_conv2d(*[t.detach() for t in _inputs()[:3]], padding=1, backend="native")
    assert len(calls) == 2
    op.clear_plan_cache()
