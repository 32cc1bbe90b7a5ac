"""``semask export MODEL[.tag] [--pretrained DIR|FILE|hf-hub:ID] --format onnx --out FILE``.

Writes an ONNX file with input ``images`` (B, 3, H, W) float32 (normalised like the model's
training data) and output ``logits`` (B, K, H, W); batch, height and width are dynamic (H, W >= 33 for Swin, 61 for
MiT: ``semask.export.min_dynamic_size``).
By default the file is checked with onnxruntime against PyTorch at two sizes other than the
export size.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="registered name[.tag], e.g. semask_swin_tiny_fpn.ade20k")
    p.add_argument("--pretrained", default=None, help="weights: a model folder, a .safetensors file or hf-hub:ORG/REPO")
    p.add_argument("--num-classes", type=int, default=None, help="classes K (default: the tag's / the weights')")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(128, 160),
                   help="example input size used for tracing (the graph stays size-generic)")
    p.add_argument("--static", action="store_true", help="fix batch and size to the example's (1 x H x W)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")


def run(args: argparse.Namespace) -> int:
    from ..export import export_onnx, min_dynamic_size, verify_onnx
    from ._common import load_model

    if not args.model and not args.pretrained:
        raise SystemExit("error: give MODEL[.tag] and/or --pretrained DIR|FILE|hf-hub:ID")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise SystemExit(f"error: --out {out} should end in .onnx")
    if not args.pretrained:
        print("note: no --pretrained given, so the exported model has random weights", flush=True)
    model = load_model(args.model, args.pretrained, args.num_classes).float().eval()
    lo = min_dynamic_size(model)
    if min(args.size) < lo and not args.static:
        raise SystemExit(f"error: --size {args.size[0]} {args.size[1]}: dynamic export of this model needs H, W >= {lo}")
    batch = 1 if args.static else 2
    export_onnx(model, out, dynamic=not args.static, size=tuple(args.size), batch=batch,
                opset_version=args.opset)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): images (B, 3, H, W) -> logits (B, K, H, W)"
          + (" [static shape]" if args.static else " [dynamic batch, height, width]"))
    if not args.no_verify:
        h, w = args.size
        sizes = [(1, h, w)] if args.static else [(1, h + 37, w + 13), (2, max(lo, h // 2 + 1), max(lo, w // 2 + 3))]
        err = verify_onnx(out, model, sizes)
        print(f"onnxruntime vs PyTorch: max abs diff {err:.2e} at (B, H, W) = {sizes}")
        if err > 1e-3:
            print("error: the ONNX outputs differ from PyTorch by more than 1e-3")
            return 1
    return 0
