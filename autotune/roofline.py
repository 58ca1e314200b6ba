"""``python -m dynconv.autotune roofline``: an H200 roofline of each dynamic-conv strategy.

A *model*, not a measurement (no GPU needed): per layer shape of a named set, at batch ``B``,
``K`` experts and a dtype, it gives the static conv's FLOPs, the dynamic conv's minimal bytes
(read x once, write y once, read the bank K x |W| once; routing negligible) and the time bound
each strategy's tiling allows, as a ratio to the static conv's roofline time. Until
``gpu-check`` measures them, these bounds are what the ``auto`` rule can go by.

Notation: ``F`` = the static conv's FLOPs (2 B Cout Ho Wo Cin/g kh kw), ``|W|`` = one weight's
elements, ``e`` = bytes per element, ``eff`` = the fraction of peak a conv kernel reaches
(``CUDNN_EFFICIENCY``, the same for cuDNN and for our kernels at best), ``m_eff`` = useful rows
/ padded rows of the GEMM's M tiles, ``n_eff`` = useful / padded columns (a conv group with
fewer output channels than the tile takes the narrowest power-of-two tile >= them, at least 16:
depthwise uses 1 column of 16), ``w_eff`` = tiles / (waves x SMs) of the grid; BLOCK_M and
BLOCK_N are each taken from (64, 128), whichever pair gives the best ``m_eff x n_eff x w_eff``
(written ``m_eff w_eff`` below for short).

- **static** (cuDNN, the floor): ``max(F / (eff peak), e (x + y + |W|) / HBM)``.
- **premix**: the mix kernel reads the bank and writes B x |W| (memory-bound: its K |W| B
  multiply-adds run at the bandwidth roof), then the conv reads W_dyn back:
  ``e (K|W| + B|W|) / HBM + max(F / (eff peak m_eff w_eff), e (x + y + B|W|) / HBM)``.
  M tiles are per sample (rows = Ho Wo padded to BLOCK_M); grid = B ceil(HoWo/BM) G
  ceil(Cout_g/BN) tiles.
- **fused**: no W_dyn, but every row tile re-reads the K bank tiles, ``B ceil(HoWo/BM) K |W| e``
  extra bytes, from L2 (``L2_BANDWIDTH``) if the bank fits in L2, else from HBM; and mixes them
  on CUDA cores (``B ceil(HoWo/BM) K |W|`` multiply-adds at ``CUDA_CORE_FLOPS``), added to the
  tensor-core time since the mix feeds the dot in the same warps:
  ``max(F / (eff peak m_eff w_eff) + mix, e (x + y + K|W|) / HBM + extra / L2-or-HBM)``,
  per-sample M tiles as premix, with the (BLOCK_M, BLOCK_N) that minimises this bound (a
  taller BLOCK_M means fewer re-reads).
- **spanning** (one static conv over K x Cin routing-scaled channels, the routing applied per
  expert to a partial accumulator, ``kernels/conv_fwd_spanning.py``): K x the FLOPs, GEMM rows
  span the batch (M = B Ho Wo, so ``m_eff`` ~ 1):
  ``max(K F / (eff peak m_eff w_eff), e (x + y + K|W|) / HBM)``.
- **grouped** (the grouped-conv trick, for reference): the static FLOPs as B separate small convs
  (per-sample M tiles as premix) plus writing and reading B x |W| mixed weights; in this model it
  is premix's bound (the model cannot see cuDNN's grouped-conv kernels being slower). It is not
  a candidate for ``best``.

Output: a markdown table (and with ``--out``, ``roofline_<set>_B<b>_K<k>_<dtype>.csv`` / ``.md``);
the last row sums the layers weighted by how often each occurs in the network.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict, dataclass

from dynconv.backends.triton.roofline_model import (  # noqa: F401  (re-exported)
    BLOCKS,
    CANDIDATES,
    CUDA_CORE_FLOPS,
    CUDNN_EFFICIENCY,
    DTYPE_BYTES,
    HBM_BANDWIDTH,
    L2_BANDWIDTH,
    L2_BYTES,
    NUM_SMS,
    STRATEGIES,
    TENSOR_PEAK_FLOPS,
    Bounds,
    Device,
    Tiling,
    best_strategy,
    h200,
    strategy_bounds,
)
from dynconv.backends.triton.roofline_model import tilings as _tilings

from .shapes import SHAPE_SETS, ConvShape, get_shape_set

# The formulas live in dynconv.backends.triton.roofline_model (Triton-free): the forward's
# ``auto`` rule and this tool use the same bounds.


def tilings(rows_per_tile_group: int, tile_groups: int, shape: ConvShape,
            sms: int) -> list[Tiling]:
    """Every (BLOCK_M, BLOCK_N) in ``BLOCKS`` for ``tile_groups`` independent GEMMs of
    ``rows_per_tile_group`` rows each and ``shape``'s Cout/g columns per conv group."""
    return _tilings(rows_per_tile_group, tile_groups, shape.cout // shape.groups, shape.groups,
                    sms)


def tiling(rows_per_tile_group: int, tile_groups: int, shape: ConvShape, sms: int) -> Tiling:
    """The tiling of :func:`tilings` with the best ``m_eff x n_eff x wave_eff`` (first on
    ties)."""
    return max(tilings(rows_per_tile_group, tile_groups, shape, sms), key=lambda t: t.eff)


def weight_elems(shape: ConvShape) -> int:
    return shape.cout * (shape.cin // shape.groups) * shape.kh * shape.kw


@dataclass(frozen=True)
class LayerRoofline(Bounds):
    """One layer's bounds (:class:`Bounds`) with the layer's name and the call it models."""

    layer: str
    label: str
    count: int
    ho: int
    wo: int
    batch: int
    experts: int
    dtype: str

    def ratio(self, strategy: str) -> float:
        return self.time(strategy) / self.static_s

    @property
    def best(self) -> str:
        return best_strategy(self)


def layer_roofline(shape: ConvShape, batch: int = 32, experts: int = 4, dtype: str = "bf16",
                   device: Device | None = None) -> LayerRoofline:
    """The model of the module docstring for one layer shape."""
    b = strategy_bounds(batch, experts, shape.cin, shape.cout, shape.h, shape.w, shape.ho,
                        shape.wo, shape.kh, shape.kw, shape.groups, dtype, device)
    return LayerRoofline(
        layer=shape.name, label=shape.label(), count=shape.count, ho=shape.ho, wo=shape.wo,
        batch=batch, experts=experts, dtype=dtype, **asdict(b))


def roofline_table(set_name: str = "resnet18", batch: int = 32, experts: int = 4,
                   dtype: str = "bf16") -> list[LayerRoofline]:
    return [layer_roofline(s, batch, experts, dtype) for s in get_shape_set(set_name)]


def network_totals(rows: list[LayerRoofline]) -> dict[str, float]:
    """Count-weighted sums of each strategy's time (and of the per-layer best), in seconds."""
    totals = {"static": sum(r.count * r.static_s for r in rows)}
    for strategy in STRATEGIES:
        totals[strategy] = sum(r.count * r.time(strategy) for r in rows)
    totals["best"] = sum(r.count * r.time(r.best) for r in rows)
    return totals


def markdown(rows: list[LayerRoofline]) -> str:
    head = ("| layer | shape | n | Ho x Wo | GFLOP | min MB | static us | premix | fused "
            "| spanning | grouped | best |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        ratios = " | ".join(f"{r.ratio(s):.2f}x" for s in STRATEGIES)
        lines.append(
            f"| {r.layer} | {r.label} | {r.count} | {r.ho}x{r.wo} "
            f"| {r.flops / 1e9:.2f} | {r.min_bytes / 1e6:.1f} | {r.static_s * 1e6:.1f} "
            f"| {ratios} | {r.best} ({r.ratio(r.best):.2f}x) |")
    t = network_totals(rows)
    ratios = " | ".join(f"{t[s] / t['static']:.2f}x" for s in STRATEGIES)
    flops = sum(r.count * r.flops for r in rows)
    mb = sum(r.count * r.min_bytes for r in rows)
    lines.append(f"| **network** | count-weighted | {sum(r.count for r in rows)} | | "
                 f"{flops / 1e9:.2f} | {mb / 1e6:.1f} | {t['static'] * 1e6:.1f} | {ratios} "
                 f"| per-layer best {t['best'] / t['static']:.2f}x |")
    return "\n".join(lines)


CSV_FIELDS = ["layer", "label", "count", "ho", "wo", "batch", "experts", "dtype", "flops",
              "min_bytes", "static_bytes", "static_us"] + \
    [f"{s}_{c}" for s in STRATEGIES for c in ("us", "ratio")] + \
    ["best", "premix_eff", "spanning_eff", "fused_extra_bytes", "fused_extra_from",
     "premix_bound", "fused_bound", "spanning_bound"]


def csv_rows(rows: list[LayerRoofline]) -> list[dict]:
    out = []
    for r in rows:
        d = asdict(r)
        row = {k: d[k] for k in CSV_FIELDS if k in d}
        row.update(static_us=f"{r.static_s * 1e6:.3f}", best=r.best,
                   premix_eff=f"{r.premix_eff:.4f}", spanning_eff=f"{r.spanning_eff:.4f}")
        for strategy in STRATEGIES:
            row[f"{strategy}_us"] = f"{r.time(strategy) * 1e6:.3f}"
            row[f"{strategy}_ratio"] = f"{r.ratio(strategy):.4f}"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynconv.autotune roofline",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--set", default="resnet18", choices=sorted(SHAPE_SETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=sorted(TENSOR_PEAK_FLOPS))
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write roofline_<set>_B<batch>_K<experts>_<dtype>.csv/.md here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.experts < 1:
        parser.error("--batch and --experts must be >= 1")
    rows = roofline_table(args.set, args.batch, args.experts, args.dtype)
    title = (f"Roofline model (H200, not a measurement): {args.set}, B={args.batch}, "
             f"K={args.experts}, {args.dtype}; each strategy's bound / the static conv's "
             f"(cuDNN at {CUDNN_EFFICIENCY:.0%} of {TENSOR_PEAK_FLOPS[args.dtype] / 1e12:.0f} "
             f"TFLOP/s, {HBM_BANDWIDTH / 1e12:.1f} TB/s)")
    table = markdown(rows)
    print(f"{title}\n\n{table}")
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out,
                            f"roofline_{args.set}_B{args.batch}_K{args.experts}_{args.dtype}")
        with open(stem + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(csv_rows(rows))
        with open(stem + ".md", "w") as f:
            f.write(f"# {title}\n\n{table}\n")
        print(f"\nwrote {stem}.csv and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
