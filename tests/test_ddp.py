"""DistributedDataParallel (gloo, 2 CPU processes) gives the gradients of one process on the
whole batch."""

import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

from dynconv import DynamicCNN

WORLD_SIZE = 2

# Test modules are not importable from child processes (pytest's importlib mode), so each rank
# runs this script. It must build the model and batch exactly as _model() / _batch() do.
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from dynconv import DynamicCNN

    rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        DynamicCNN(num_experts=3, widths=(8, 8, 16), stem_channels=4).eval()
    )
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    shard = slice(rank * 4, (rank + 1) * 4)
    F.cross_entropy(model(x[shard]), target[shard]).backward()
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    dist.destroy_process_group()
    """
)


def _model():
    torch.manual_seed(0)
    # eval(): BatchNorm then uses its running statistics, so a half batch per rank computes
    # exactly what the whole batch computes (train-mode BN statistics would differ per rank).
    return DynamicCNN(num_experts=3, widths=(8, 8, 16), stem_channels=4).eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def test_ddp_gradients_equal_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(tmp_path / "init"),
                str(tmp_path / f"rank{rank}.pt"),
            ]
        )
        for rank in range(WORLD_SIZE)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0] * WORLD_SIZE
    model = _model()
    x, target = _batch()
    F.cross_entropy(model(x), target).backward()
    for rank in range(WORLD_SIZE):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            # DDP averages two half-batch means: the same sum in another order, so fp32 rounding.
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
