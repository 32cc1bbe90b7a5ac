"""Inference speed of SeMask Swin-T FPN at 512x512 (batch 1, eval) across execution modes, in one run:
eager fp32, channels-last, torch.compile (inductor), bf16 autocast and ONNX Runtime (CPU), reported as
latency ratios to eager fp32 (issue #8 benchmark; target on the 2-core CPU: compiled >= 1.3x eager).

    python benchmarks/speed.py [--size 512] [--reps 8] [--threads 0] [--skip compile,onnx]

Timings of all modes are interleaved (round-robin) so load from other processes hits them alike.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import semask
from _timing import bench_parser, interleaved_medians, load_note, median_ms, setup_threads


def main() -> None:
    ap = bench_parser(__doc__, reps=8)
    ap.add_argument("--model", default="semask_swin_tiny_fpn")
    ap.add_argument("--skip", default="", help="comma-separated modes to skip: channels_last,compile,bf16,onnx")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    threads = setup_threads(args.threads)
    torch.manual_seed(0)
    model = semask.create_model(args.model, num_classes=150).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref = model(x)
    modes, notes = {"eager fp32": lambda: model(x)}, {}

    if "channels_last" not in skip:
        model_cl = semask.create_model(args.model, num_classes=150).eval()
        model_cl.load_state_dict(model.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        modes["channels-last"] = lambda: model_cl(x_cl)
    if "compile" not in skip:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            err = (compiled(x) - ref).abs().max().item()
        notes["compiled"] = f"compile {time.perf_counter() - t0:.0f} s, max |diff| {err:.1e}"
        modes["compiled (inductor)"] = lambda: compiled(x)
    if "bf16" not in skip:
        def bf16() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        with torch.no_grad():
            out = bf16().float()
        notes["bf16"] = (f"max |diff| {(out - ref).abs().max().item():.2e} (max |logit| {ref.abs().max().item():.2f}), "
                         f"argmax agreement {(out.argmax(1) == ref.argmax(1)).float().mean().item():.4f}")
        modes["bf16 autocast"] = bf16
    if "onnx" not in skip:
        import onnxruntime as ort

        from semask.export import export_onnx

        path = Path(tempfile.mkdtemp()) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, size=(args.size, args.size), batch=1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # no busy-waiting after a run: ORT's spinning threads would steal the cores of the next mode
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}
        err = abs(sess.run(None, feed)[0] - ref.numpy()).max()
        notes["onnx"] = f"export {time.perf_counter() - t0:.0f} s, max |diff| {err:.1e}"
        modes["ONNX Runtime (CPU)"] = lambda: sess.run(None, feed)

    with torch.no_grad():
        times = interleaved_medians(modes, reps=args.reps, settle=1)
    base = median_ms(times["eager fp32"])
    print(f"{args.model} {args.size}x{args.size} batch 1, {threads} threads, {args.reps} interleaved reps, "
          f"torch {torch.__version__}")
    for k, v in times.items():
        ms = median_ms(v)
        print(f"  {k:22s} median {ms:8.1f} ms   speed-up vs eager fp32 {base / ms:5.2f}x")
    for k, v in notes.items():
        print(f"  [{k}] {v}")
    print(f"  {load_note()}")


if __name__ == "__main__":
    main()
