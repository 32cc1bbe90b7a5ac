"""`semask train` / `semask eval` / `semask predict` end to end on CamVid with a tiny model."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import semask
from semask.cli import main

TINY = json.dumps(dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, fpn_channels=8))


@pytest.fixture(scope="module")
def trained(camvid_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("camvid_run")
    rc = main(["train", "--model", "semask_swin_tiny_fpn", "--model-kwargs", TINY, "--format", "camvid",
               "--data", str(camvid_dir), "--iters", "2", "--batch-size", "2", "--crop", "64", "96",
               "--out", str(out), "--workers", "0", "--max-val-images", "2", "--no-progress", "--lr", "1e-3"])
    assert rc == 0
    return out


def test_train_writes_loadable_model(trained, capsys):
    assert (trained / "config.json").exists() and (trained / "model.safetensors").exists()
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["num_classes"] == 11 and cfg["pretrained_cfg"]["class_names"][0] == "sky"
    model = semask.create_model("semask_swin_tiny_fpn", pretrained=str(trained))
    assert model.num_classes == 11 and model.pretrained_cfg["dataset"] == "camvid"
    log = json.loads((trained / "train_log.json").read_text())
    assert [h["iteration"] for h in log["history"]] == [1, 2] and len(log["evals"]) == 1


def test_eval_prints_table_and_miou(trained, camvid_dir, capsys):
    rc = main(["eval", "--model", "semask_swin_tiny_fpn", "--pretrained", str(trained), "--format", "camvid",
               "--data", str(camvid_dir), "--split", "val", "--max-images", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^sky\s+[\d.]+|^sky\s+nan", out, re.M) and "bicyclist" in out
    m = re.search(r"^mIoU: ([\d.]+)$", out, re.M)
    assert m is not None and 0.0 <= float(m.group(1)) <= 100.0
    # the printed value is the metric of the model on those images
    model = semask.create_model("semask_swin_tiny_fpn", pretrained=str(trained))
    ds = semask.data.CamVidDataset(camvid_dir, "val")
    metric = semask.SegmentationMetric(11)
    for i in range(2):
        metric.update(semask.predict(model, ds[i]["image"]), ds[i]["label"])
    assert float(m.group(1)) == pytest.approx(100 * float(metric.compute()["mIoU"]), abs=0.006)


def test_predict_writes_pictures(trained, camvid_dir, tmp_path, capsys):
    img = sorted((camvid_dir / "val" / "images").iterdir())[0]
    rc = main(["predict", str(img), "--model", "semask_swin_tiny_fpn", "--pretrained", str(trained),
               "--out", str(tmp_path), "--sliding", "--crop", "180", "240"])
    assert rc == 0
    stem = img.stem
    for suffix in ("labels", "overlay", "priors", "ids"):
        assert (tmp_path / f"{stem}_{suffix}.png").exists(), suffix
    labels = np.asarray(Image.open(tmp_path / f"{stem}_labels.png"))
    ids = np.asarray(Image.open(tmp_path / f"{stem}_ids.png"))
    assert labels.shape == (360, 480, 3) and ids.shape == (360, 480) and ids.max() < 11
    priors = np.asarray(Image.open(tmp_path / f"{stem}_priors.png"))
    assert priors.shape[1] > 4 * 480  # four stage maps side by side
    assert f"{stem}_{{labels,overlay,priors,ids}}.png" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["predict", str(tmp_path / "missing.jpg"), "--model", "semask_swin_tiny_fpn", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data"):
        main(["eval", "--model", "semask_swin_tiny_fpn", "--format", "camvid"])


def test_example_finetune_script_runs(camvid_dir, tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--data", str(camvid_dir), "--model-kwargs", TINY, "--iters", "2",
                                      "--batch-size", "2", "--crop", "64", "64", "--warmup-iters", "1",
                                      "--eval-images", "1", "--out", str(tmp_path / "m")])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "iter 2: val mIoU" in out and "saved to" in out
    model = semask.create_model("semask_swin_tiny_fpn", pretrained=str(tmp_path / "m"))
    assert model.num_classes == 11 and model.pretrained_cfg["class_names"][-1] == "bicyclist"
