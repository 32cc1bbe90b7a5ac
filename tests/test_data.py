"""Dataset readers (label mappings, folder layouts) and the official training transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from semask.data import (ADE20KDataset, CamVidDataset, CityscapesDataset, COCOStuff10kDataset, SyntheticScenes,
                         build_dataset, collate_samples)
from semask.data import transforms as T


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_camvid_reader(camvid_dir):
    train, val = CamVidDataset(camvid_dir, "train"), CamVidDataset(camvid_dir, "val")
    assert (len(train), len(val)) == (367, 101) and len(train.classes) == 11
    s = val[0]
    assert s["image"].shape == (3, 360, 480) and s["image"].dtype == torch.uint8
    raw = np.asarray(Image.open(val.labels[0]))
    assert (raw == 11).any()  # void pixels exist and become 255
    assert torch.equal(s["label"] == 255, torch.from_numpy(raw == 11))
    assert set(s["label"].unique().tolist()) <= set(range(11)) | {255}


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write(root / "images/validation/ADE_val_1.jpg", _rgb())
    _write(root / "annotations/validation/ADE_val_1.png", np.array([[0, 1, 150, 255]] * 6, dtype=np.uint8).repeat(2, 1))
    ds = ADE20KDataset(tmp_path, "val")
    assert ds[0]["label"][0].tolist() == [255, 255, 0, 0, 149, 149, 255, 255]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    _write(tmp_path / "leftImg8bit/val/bonn/bonn_0_leftImg8bit.png", _rgb(2, 4))
    _write(tmp_path / "gtFine/val/bonn/bonn_0_gtFine_labelIds.png", np.array([[7, 8, 26, 33], [0, 1, 23, 34]], np.uint8))
    s = CityscapesDataset(tmp_path, "val")[0]
    assert s["label"].tolist() == [[0, 1, 13, 18], [255, 255, 10, 255]]


def test_coco_stuff_and_generic_folder(tmp_path):
    _write(tmp_path / "coco/images/test2014/a.jpg", _rgb())
    _write(tmp_path / "coco/annotations/test2014/a_labelTrainIds.png", np.full((6, 8), 5, np.uint8))
    assert COCOStuff10kDataset(tmp_path / "coco", "val")[0]["label"].unique().tolist() == [4]
    _write(tmp_path / "gen/train/images/x.png", _rgb())
    _write(tmp_path / "gen/train/masks/x.png", np.full((6, 8), 2, np.uint8))
    ds = build_dataset("folder", tmp_path / "gen", "train")
    assert len(ds) == 1 and ds[0]["label"].unique().tolist() == [2]
    _write(tmp_path / "bad/images/y.png", _rgb())
    (tmp_path / "bad/masks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no label map"):
        build_dataset("folder", tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown dataset format"):
        build_dataset("voc", tmp_path)


def test_synthetic_scenes_deterministic():
    a, b = SyntheticScenes(4, (48, 64)), SyntheticScenes(4, (48, 64))
    assert torch.equal(a[3]["image"], b[3]["image"]) and torch.equal(a[3]["label"], b[3]["label"])
    assert not torch.equal(a[0]["image"], SyntheticScenes(4, (48, 64), split="val")[0]["image"])
    assert a[0]["image"].shape == (3, 48, 64) and a[0]["image"].dtype == torch.uint8
    labels = torch.stack([s["label"] for s in SyntheticScenes(16)])
    assert set(labels.unique().tolist()) == set(range(5))


def test_resize_keep_ratio_like_mmcv():
    assert T.keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert T.keep_ratio_size(1024, 2048, (2048, 512)) == (512, 1024)
    assert T.keep_ratio_size(360, 480, (480, 360)) == (360, 480)
    s = {"image": torch.zeros(3, 360, 480, dtype=torch.uint8), "label": torch.zeros(360, 480, dtype=torch.long)}
    torch.manual_seed(0)
    out = T.Resize((480, 360), ratios=[0.5])(s)
    assert out["image"].shape == (3, 180, 240) and out["label"].shape == (180, 240)
    assert out["label"].dtype == torch.long
    sizes = {T.Resize((480, 360), ratio_range=(0.5, 2.0))(s)["image"].shape[-1] for _ in range(5)}
    assert len(sizes) > 1 and all(240 <= w <= 960 for w in sizes)


def test_crop_flip_pad_normalize():
    torch.manual_seed(0)
    img = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12)
    lab = torch.zeros(10, 12, dtype=torch.long)
    lab[:, :4] = 1  # class 1 occupies 1/3 of the image: only crops starting at x <= 1 qualify
    s = {"image": img, "label": lab}
    out = T.RandomCrop((6, 8), cat_max_ratio=0.75)(s)
    assert out["image"].shape == (3, 6, 8)
    assert len(out["label"].unique()) == 2  # retried until no class covers > 75 %
    y, x = [int(v) for v in torch.nonzero(img[0] == out["image"][0, 0, 0])[0]]
    assert torch.equal(out["label"], lab[y:y + 6, x:x + 8])
    flipped = T.RandomFlip(1.0)(s)
    assert torch.equal(flipped["image"], img.flip(-1)) and torch.equal(flipped["label"], lab.flip(-1))
    padded = T.Pad((12, 14))(T.Normalize()(s))
    assert padded["image"].shape == (3, 12, 14) and (padded["image"][:, 10:] == 0).all()
    assert (padded["label"][10:] == 255).all() and (padded["label"][:, 12:] == 255).all()
    torch.testing.assert_close(T.Normalize([1, 2, 3], [2, 2, 2])(s)["image"][1], (img[1] - 2) / 2)


def test_photometric_distortion_hsv_roundtrip_and_range():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 16, 16), generator=g).float()
    torch.testing.assert_close(T._hsv_to_rgb(T._rgb_to_hsv(img)), img, atol=1e-3, rtol=0)
    torch.manual_seed(0)
    outs = [T.PhotoMetricDistortion()({"image": img})["image"] for _ in range(6)]
    assert all(o.min() >= 0 and o.max() <= 255 for o in outs)
    assert any(not torch.allclose(o, img) for o in outs)


def test_train_pipeline_fixed_size_batches(camvid_dir):
    torch.manual_seed(0)
    tf = T.train_transforms((96, 128), (480, 360), (0.5, 2.0), cat_max_ratio=0.75)
    ds = CamVidDataset(camvid_dir, "val", transforms=tf)
    batch = collate_samples([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 96, 128) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 96, 128)
    assert abs(float(batch["image"].mean())) < 1.5  # normalised
