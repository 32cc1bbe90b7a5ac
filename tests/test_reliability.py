"""Reliability: atomic training checkpoints (crashes and SIGKILL during saves), no lost runs, image
modes read as users expect, label / input validation, one-line CLI errors."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import semask
import semask.train as train_mod
from semask.data.datasets import SegmentationFolder
from semask.data.imageio import ImageReadError, pil_to_array, read_image
from semask.data.transforms import Pad, RandomCrop, RandomFlip, Resize
from semask.train import CheckpointError, TrainConfig, Trainer, find_checkpoint, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, fpn_channels=8)


def tiny_model(k=3):
    torch.manual_seed(0)
    return semask.create_model("semask_swin_tiny_fpn", num_classes=k, drop_path_rate=0.0, decoder_dropout=0.0,
                               sem_drop=0.0, **TINY)


def weights(model):
    return {k: v.detach().clone() for k, v in train_mod.unwrap(model).state_dict().items()}


def folder_data(root: Path, n=1, size=(32, 32), k=3, label_size=None, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        lab = rng.integers(0, k, label_size or size, dtype=np.uint8)
        Image.fromarray(lab).save(root / "masks" / f"im{i}.png")
    return root


def env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SEMASK_TEST_THREADS="1")


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "semask.cli", *map(str, args)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- 1. atomic checkpoints
class _Crash(BaseException):
    pass


def _step(model, opt):
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("crash_at", range(1, 13))
def test_crash_at_every_step_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    """Interrupt the n-th file operation of a save (writes, fsyncs, renames, deletes): the folder (or
    its kept predecessor) holds model + optimizer + state of ONE iteration, and the next save heals it."""
    model = tiny_model()
    opt = train_mod.build_optimizer(model, TrainConfig(lr=1e-2))
    ck = tmp_path / "last_checkpoint"
    _step(model, opt)
    save_checkpoint(ck, model, opt, 1)
    at = {1: weights(model)}
    _step(model, opt)
    at[2] = weights(model)
    calls = {"n": 0}

    def crashing(fn):
        def wrapped(*a, **kw):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise _Crash()
            return fn(*a, **kw)
        return wrapped

    for name in ("_fsync", "save_file", "save_pretrained"):
        monkeypatch.setattr(train_mod, name, crashing(getattr(train_mod, name)))
    monkeypatch.setattr(train_mod.os, "rename", crashing(os.rename))
    monkeypatch.setattr(train_mod.shutil, "rmtree", crashing(train_mod.shutil.rmtree))
    crashed = False
    try:
        save_checkpoint(ck, model, opt, 2)
    except _Crash:
        crashed = True
    monkeypatch.undo()
    fresh, fresh_opt = tiny_model(), None
    fresh_opt = train_mod.build_optimizer(fresh, TrainConfig(lr=1e-2))
    meta = load_checkpoint(ck, fresh, fresh_opt)
    it = meta["iteration"]
    assert it in (1, 2) and (crashed or it == 2)
    for k, v in at[it].items():
        assert torch.equal(weights(fresh)[k], v), k
    assert int(next(iter(fresh_opt.state_dict()["state"].values()))["step"]) == it
    save_checkpoint(ck, model, opt, 3)  # the next save cleans up whatever the crash left
    assert find_checkpoint(ck)[1]["iteration"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint"]


def test_crash_in_the_first_save_refuses_resume_clearly(tmp_path, monkeypatch):
    model = tiny_model()
    opt = train_mod.build_optimizer(model, TrainConfig())

    def crash(*a, **kw):
        raise _Crash()

    monkeypatch.setattr(train_mod, "_fsync", crash)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path / "last_checkpoint", model, opt, 1)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="never completed.*start over without --resume"):
        load_checkpoint(tmp_path / "last_checkpoint", model, opt)


def _corrupt(tmp_path, how):
    model = tiny_model()
    opt = train_mod.build_optimizer(model, TrainConfig())
    _step(model, opt)
    ck = save_checkpoint(tmp_path / "last_checkpoint", model, opt, 1)
    state = ck / "trainer_state.json"
    if how == "truncated optimizer":
        data = (ck / "optimizer.safetensors").read_bytes()
        (ck / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "truncated optimizer, no manifest":  # checkpoints written before the manifest existed
        data = (ck / "optimizer.safetensors").read_bytes()
        (ck / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
        meta = json.loads(state.read_text())
        del meta["files"]
        state.write_text(json.dumps(meta))
    elif how == "empty state":
        state.write_text("")
    elif how == "junk state":
        state.write_bytes(b"\x00\xffjunk{")
    elif how == "list state":
        state.write_text("[1, 2]")
    elif how == "mixed iterations":  # model/optimizer of one save, state of another (the old failure)
        meta = json.loads(state.read_text())
        del meta["files"]
        meta["iteration"] = 0
        meta["scheduler"] = None
        state.write_text(json.dumps(meta))
    elif how == "missing model":
        (ck / "model.safetensors").unlink()
    return ck


@pytest.mark.parametrize("how, match", [
    ("truncated optimizer", "optimizer.safetensors is not the file saved"),
    ("truncated optimizer, no manifest", "optimizer.safetensors is truncated or corrupt"),
    ("empty state", "trainer_state.json is damaged"),
    ("junk state", "trainer_state.json is damaged"),
    ("list state", "not a semask trainer state"),
    ("mixed iterations", "mixes two saves"),
    ("missing model", "model.safetensors is missing"),
])
def test_damaged_checkpoint_gives_clear_error(tmp_path, how, match):
    ck = _corrupt(tmp_path, how)
    with pytest.raises(CheckpointError, match=match):
        Trainer(tiny_model(), [], TrainConfig(iters=2, progress=False), resume=ck)


def test_cli_resume_from_damaged_checkpoint_is_one_line(tmp_path):
    ck = _corrupt(tmp_path, "junk state")
    data = folder_data(tmp_path / "data")
    r = cli("train", "--model", "semask_swin_tiny_fpn", "--model-kwargs", json.dumps(TINY), "--num-classes", 3,
            "--format", "folder", "--data", data, "--val-split", "", "--iters", 2, "--batch-size", 1, "--crop", 32, 32,
            "--workers", 0, "--no-progress", "--freeze-bn", "--resume", ck, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines[-1].startswith("semask train: error: ") and "damaged" in lines[-1]


def _train_cmd(data, out, iters, resume=None):
    cmd = [sys.executable, "-m", "semask.cli", "train", "--model", "semask_swin_tiny_fpn", "--model-kwargs",
           json.dumps(TINY), "--num-classes", "3", "--format", "folder", "--data", str(data), "--val-split", "",
           "--iters", str(iters), "--batch-size", "1", "--crop", "32", "32", "--save-interval", "1", "--workers", "0",
           "--no-progress", "--warmup-iters", "1", "--freeze-bn", "--out", str(out)]
    return cmd + (["--resume", str(resume)] if resume else [])


def _kill_and_resume(tmp_path, capsys, n_kills, seed):
    """SIGKILL a training run with --save-interval 1 at random points (half of them timed inside a
    save), resume it, and compare the final weights with an uninterrupted run: one image and
    restored RNG make a correct resume bit-identical; a mixed checkpoint would not be."""
    from semask.cli import main

    iters = 16  # long enough that a kill lands before the run ends, also on a quiet machine
    data = folder_data(tmp_path / "data")
    ref = tmp_path / "ref"
    main(_train_cmd(data, ref, iters)[3:])  # in-process (one intra-op thread, as the subprocesses)
    want = load_file(str(ref / "model.safetensors"))
    rng = random.Random(seed)
    outcome = {"resumed": 0, "in_save": 0, "finished_first": 0}
    for i in range(n_kills):
        out = tmp_path / f"run{i}"
        ck = out / "last_checkpoint"
        p = subprocess.Popen(_train_cmd(data, out, iters), env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t_end = time.time() + 120
        while not (ck / "trainer_state.json").exists() and p.poll() is None and time.time() < t_end:
            time.sleep(0.002)
        if i % 2:  # inside a save: right after its temporary folder appears
            tmp = out / "last_checkpoint.tmp"
            while not tmp.exists() and p.poll() is None and time.time() < t_end:
                pass
            time.sleep(rng.uniform(0.0, 0.06))
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (out / "train_log.json").exists():
            outcome["finished_first"] += 1
            continue
        outcome["in_save"] += (out / "last_checkpoint.tmp").exists() or (out / "last_checkpoint.old").exists()
        capsys.readouterr()
        assert main(_train_cmd(data, out, iters, resume=ck)[3:]) == 0
        assert "resumed from" in capsys.readouterr().out
        got = load_file(str(out / "model.safetensors"))
        for k in want:
            assert torch.equal(got[k], want[k]), (i, k)
        outcome["resumed"] += 1
    return outcome


def test_sigkill_during_saves_then_resume_is_exact(tmp_path, capsys):
    outcome = _kill_and_resume(tmp_path, capsys, 3, seed=0)
    assert outcome["resumed"] >= 2, outcome


@pytest.mark.slow
def test_sigkill_during_saves_then_resume_is_exact_many(tmp_path, capsys):
    outcome = _kill_and_resume(tmp_path, capsys, 24, seed=1)
    with capsys.disabled():
        print("kill outcomes:", outcome)
    assert outcome["resumed"] >= 20 and outcome["in_save"] >= 5, outcome


# ----------------------------------------------------------------------------- 2. final evaluation
class _BrokenVal(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise ValueError("label map val/0.png is 300x100 (HxW) but its image is 360x480")


def test_failing_final_evaluation_keeps_the_trained_model(tmp_path):
    from semask.data import SyntheticScenes
    from semask.data.transforms import Normalize

    t = Trainer(tiny_model(5), SyntheticScenes(2, (32, 32), transforms=Normalize()),
                TrainConfig(iters=2, batch_size=2, shuffle=False, freeze_bn=True, num_workers=0, progress=False),
                val_set=_BrokenVal(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="300x100"):
        t.fit()
    reloaded = semask.create_model("semask_swin_tiny_fpn", pretrained=str(tmp_path))
    for k, v in weights(t.model).items():
        assert torch.equal(weights(reloaded)[k], v), k
    assert find_checkpoint(tmp_path / "last_checkpoint")[1]["iteration"] == 2
    assert json.loads((tmp_path / "train_log.json").read_text())["history"][-1]["iteration"] == 2


# ----------------------------------------------------------------------------- 3. image modes
def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0..65520
    path = _save(Image.fromarray(ramp), tmp_path / "depth16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    x = read_image(path)
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
    want = torch.from_numpy(np.round(ramp / 257.0).astype(np.uint8))
    assert torch.equal(x[0], want) and torch.equal(x[1], want)
    assert (x == 255).float().mean() < 0.01  # convert("RGB") made 99.9 % of it white


def test_float_tiff(tmp_path):
    arr = np.linspace(0, 1, 48 * 32, dtype=np.float32).reshape(48, 32)
    x = read_image(_save(Image.fromarray(arr, mode="F"), tmp_path / "f.tif"))
    assert torch.equal(x[2], torch.from_numpy(np.round(arr * 255).astype(np.uint8)))
    with pytest.raises(ImageReadError, match=r"values in \[0, 1000\].*rescale"):
        read_image(_save(Image.fromarray(arr * 1000, mode="F"), tmp_path / "g.tif"))
    bad = arr.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(_save(Image.fromarray(bad, mode="F"), tmp_path / "h.tif"))


def test_colour_modes_read_as_users_expect(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], -1)  # fully transparent: colours kept
    assert np.array_equal(read_image(_save(Image.fromarray(rgba), tmp_path / "a.png")).permute(1, 2, 0).numpy(), rgb)
    grey = rgb[..., 0]
    la = Image.fromarray(np.stack([grey, grey // 2], -1), mode="LA")
    x = read_image(_save(la, tmp_path / "la.png"))
    assert all(torch.equal(x[c], torch.from_numpy(grey)) for c in range(3))
    pal = Image.fromarray(rgb).quantize(8)
    pal.info["transparency"] = 0
    x = read_image(_save(pal, tmp_path / "p.png", transparency=0))
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(np.array(pal.convert("RGB"))))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    x = read_image(_save(cmyk, tmp_path / "c.tif"))
    assert (x.permute(1, 2, 0).int() - torch.from_numpy(rgb).int()).abs().max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white left band
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(im, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    x = read_image(path)
    assert x.shape == (3, 40, 20)
    assert x[:, :10].float().mean() > 200 and x[:, -10:].float().mean() < 50  # band now on top
    with Image.open(path) as pil:  # PIL images passed to predict get the same reading
        assert np.array_equal(pil_to_array(pil), x.permute(1, 2, 0).numpy())


def test_predict_reads_pil_16bit_like_files():
    from semask.inference import to_image_tensor
    from semask.viz import _hwc_image

    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    im = Image.fromarray(ramp)
    want = np.round(ramp / 257.0)
    assert np.array_equal(to_image_tensor(im)[0].numpy(), want)
    assert np.array_equal(_hwc_image(im)[..., 1], want)


@pytest.mark.parametrize("kind", ["empty", "truncated", "not an image", "folder"])
def test_unreadable_image_files_name_the_file(tmp_path, kind):
    path = tmp_path / "broken.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "not an image":
        path.write_text("hello")
    else:
        path.mkdir()
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(path)


# ----------------------------------------------------------------------------- 4. labels
def test_loss_names_out_of_range_label_ids():
    model = tiny_model(5).eval()  # (BatchNorm statistics of one 1x1 map cannot train)
    x = torch.randn(1, 3, 32, 32)
    y = torch.zeros(1, 32, 32, dtype=torch.long)
    y[0, 0, :3] = torch.tensor([7, 9, 255])
    with pytest.raises(ValueError, match=r"class ids \[7, 9\] outside 0..4.*num_classes=10"):
        model(x, y)
    y[0, 0, :3] = torch.tensor([-3, 1, 255])
    with pytest.raises(ValueError, match=r"\[-3\] outside 0..4"):
        model(x, y)
    y[0, 0, :3] = torch.tensor([4, 255, 0])
    assert torch.isfinite(model(x, y)["loss"])


def test_dataset_checks_label_ids_and_sizes(tmp_path):
    root = folder_data(tmp_path / "a", k=9)
    ds = SegmentationFolder(root / "images", root / "masks")
    assert ds.load(0)["label"].max() >= 5  # no class count known: no check
    ds.num_classes = 5
    with pytest.raises(ValueError, match=r"masks/im0.png contain class ids 5, 6, 7, 8 outside 0..4"):
        ds.load(0)
    root = folder_data(tmp_path / "b", size=(36, 48), label_size=(30, 10))
    with pytest.raises(ValueError, match=r"30x10 \(HxW\) but its image .*im0.png is 36x48"):
        SegmentationFolder(root / "images", root / "masks")[0]


@pytest.mark.parametrize("t", [Resize((64, 32)), RandomCrop(16), RandomFlip(1.0), Pad(64)])
def test_transforms_refuse_label_of_another_size(t):
    sample = dict(image=torch.zeros(3, 36, 48), label=torch.zeros(30, 10, dtype=torch.long), path="x.png")
    with pytest.raises(ValueError, match=r"label map is \(30, 10\) but the image is \(36, 48\).*x.png"):
        t(sample)


# ----------------------------------------------------------------------------- 5. input checks
def _mit():
    torch.manual_seed(0)
    return semask.create_model("semask_mit_b0", num_classes=4).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_input_dtype_mismatch_says_how_to_cast(dtype):
    with pytest.raises(ValueError, match=rf"input is {dtype} but the model's weights are torch.float32.*x.to"):
        _mit()(torch.rand(1, 3, 32, 32, dtype=dtype))


def test_fp32_input_under_autocast_still_runs():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = _mit()(torch.rand(1, 3, 32, 32))
    assert feats[0].shape == (1, 32, 8, 8)


@pytest.mark.parametrize("shape, match", [((0, 3, 32, 32), "empty batch"), ((1, 3, 0, 32), "0x32"),
                                          ((1, 3, 32, 0), "32x0")])
@pytest.mark.parametrize("arch", ["swin", "mit"])
def test_empty_batch_or_image_is_a_clear_error(arch, shape, match):
    model = _mit() if arch == "mit" else tiny_model().eval()
    with pytest.raises(ValueError, match=match):
        model(torch.rand(shape))


@pytest.mark.parametrize("hw", [(1, 1), (5, 40), (17, 17), (28, 28), (28, 100)])
def test_mit_runs_on_images_under_29_px(hw):
    torch.manual_seed(0)
    model = semask.create_model("semask_mit_b0_segformer", num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *hw))
    assert out.shape == (2, 4, *hw) and torch.isfinite(out).all()


def test_mit_small_map_padding_leaves_full_patches_unchanged():
    """The key/value reduction pads only maps with a side under sr_ratio: sizes with a full patch
    give exactly the plain strided conv (SegFormer's computation)."""
    attn = _mit().stages[0].blocks[0].attn
    m = torch.randn(1, 32, 9, 12)
    assert torch.equal(attn._reduce(m), attn.sr(m))
    small = torch.randn(1, 32, 3, 12)
    padded = torch.nn.functional.pad(small, (0, 0, 0, 5))
    assert torch.equal(attn._reduce(small), attn.sr(padded))


# ----------------------------------------------------------------------------- 8. CLI errors
def test_cli_error_is_one_line_with_exit_2_and_debug_traceback(tmp_path, capsys):
    from semask.cli import main

    data = tmp_path / "data"
    folder_data(data, k=9)  # ids up to 8 for a 3-class model
    args = ["train", "--model", "semask_swin_tiny_fpn", "--model-kwargs", json.dumps(TINY), "--num-classes", "3",
            "--format", "folder", "--data", str(data), "--val-split", "", "--iters", "1", "--batch-size", "1",
            "--crop", "32", "32", "--workers", "0", "--no-progress", "--freeze-bn", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("semask train: error: label map") and "outside 0..2" in err[0]
    with pytest.raises(ValueError, match="outside 0..2"):  # --debug: the exception itself (traceback)
        main(args + ["--debug"])
    with pytest.raises(SystemExit) as e:  # commands' own errors get the same form
        main(["export", "semask_swin_tiny_fpn", "--out", str(tmp_path / "x.bin")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("semask export: error: ")
    with pytest.raises(SystemExit) as e:  # an unexpected error type is named, with the --debug hint
        main(["predict", str(tmp_path / "nowhere.png"), "--model", "semask_swin_tiny_fpn", "--out", str(tmp_path)])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_predict_folder_and_skips_unreadable_images(tmp_path, capsys):
    from semask.cli import main

    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(imgs / "sub" / "b.jpg")
    (imgs / "zero.png").write_bytes(b"")
    model_dir = tmp_path / "m"
    tiny_model(3).save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["predict", str(imgs), "--pretrained", str(model_dir), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "skipped" in captured.err and "zero.png" in captured.err and "empty" in captured.err
    assert (out / "a_labels.png").exists() and (out / "sub" / "b_ids.png").exists()
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(SystemExit, match="has no images") as e:
        main(["predict", str(empty), "--pretrained", str(model_dir), "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() .startswith("semask predict: error: folder")
