"""Parameters and FLOPs of SeMask-MiT + SegFormer head beside SegFormer's published numbers.

    python benchmarks/mit_flops.py [--size 512] [--num-classes 150] [--markdown]

Counts run on the meta device (no memory, no compute) with ``torch.utils.flop_counter``; the table
reports GMACs (= counted FLOPs / 2), the convention of SegFormer's paper: our count of the plain
model (``semantic_layers=False``) reproduces the paper's numbers, so the difference between the two
columns is the cost of the semantic layers. (On the meta device attention is counted through its
matmul decomposition; on CPU, torch's fused flash-attention kernel is not counted, so do not run
this on real CPU tensors.)
"""
from __future__ import annotations

import argparse
from typing import Dict, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

import semask

# SegFormer paper (Xie et al., NeurIPS 2021), Table 1, ADE20K: params (M), GFLOPs. The B5 ADE20K
# entry is measured at 640x640 (its ADE20K crop); B0-B4 at 512x512.
PUBLISHED: Dict[int, Tuple[float, float, int]] = {
    0: (3.8, 8.4, 512), 1: (13.7, 15.9, 512), 2: (27.5, 62.4, 512),
    3: (47.3, 79.0, 512), 4: (64.1, 95.7, 512), 5: (84.7, 183.3, 640),
}


def count(name: str, size: int, num_classes: int, **kwargs) -> Tuple[float, float]:
    """(params in M, GMACs) of ``name`` for one (1, 3, size, size) image, inference mode."""
    with torch.device("meta"):
        model = semask.create_model(name, num_classes=num_classes, **kwargs).eval()
        x = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() / 2e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=150)
    args = parser.parse_args()
    print(f"| model | params (M) | GMACs @{args.size} | plain SegFormer, our count | "
          "SegFormer paper (params / GFLOPs @ crop) |")
    print("|---|---|---|---|---|")
    for b in range(6):
        name = f"semask_mit_b{b}_segformer"
        p, f = count(name, args.size, args.num_classes)
        pp, pf = count(name, args.size, args.num_classes, semantic_layers=False)
        ref_p, ref_f, ref_size = PUBLISHED[b]
        print(f"| SeMask MiT-B{b} | {p:.1f} | {f:.1f} | {pp:.1f} M / {pf:.1f} | {ref_p} M / {ref_f} @{ref_size} |")
        if ref_size != args.size:  # the paper's crop for this entry differs: add a row at that size
            _, f2 = count(name, ref_size, args.num_classes)
            _, pf2 = count(name, ref_size, args.num_classes, semantic_layers=False)
            print(f"| SeMask MiT-B{b} @{ref_size} | {p:.1f} | {f2:.1f} | {pp:.1f} M / {pf2:.1f} | "
                  f"{ref_p} M / {ref_f} @{ref_size} |")


if __name__ == "__main__":
    main()
