"""semask.predict: whole / sliding-window / TTA equivalences, input types, resize policy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semask
from semask.data.transforms import keep_ratio_size
from semask.inference import normalize_images, to_image_tensor

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = semask.create_model("semask_swin_tiny_fpn", num_classes=4, embed_dim=8, depths=(1, 1, 1, 1),
                            num_heads=(1, 1, 1, 1), window_size=4, fpn_channels=8).eval()
    m.pretrained_cfg = dict(m.pretrained_cfg, test_scale=None)
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 40, 52), generator=g, dtype=torch.uint8)


def _probs(model, x_uint8):
    with torch.no_grad():
        return model(normalize_images(x_uint8.float(), MEAN, STD)).softmax(1)


def test_whole_equals_model_softmax(model, images):
    labels, probs = semask.predict(model, images, return_probs=True, batch_size=2)
    ref = _probs(model, images)
    for i in range(2):
        torch.testing.assert_close(probs[i], ref[i], atol=1e-5, rtol=1e-5)
        assert labels[i].dtype == torch.int64 and torch.equal(labels[i], ref[i].argmax(0))


def test_slide_single_crop_equals_whole(model, images):
    _, whole = semask.predict(model, images, return_probs=True)
    _, slide = semask.predict(model, images, mode="slide", crop_size=(40, 52), stride=(13, 17), return_probs=True)
    _, bigger = semask.predict(model, images, mode="slide", crop_size=(64, 64), stride=8, return_probs=True)
    for i in range(2):
        torch.testing.assert_close(slide[i], whole[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bigger[i], whole[i], atol=1e-6, rtol=1e-6)


def test_slide_matches_mmseg_loop(model, images):
    """Overlapping windows: the count-matrix average of mmseg's slide_inference, written as its loop."""
    crop, stride = (24, 32), (16, 20)
    x = normalize_images(images.float(), MEAN, STD)
    h, w = x.shape[-2:]
    preds = torch.zeros(2, 4, h, w)
    count = torch.zeros(1, 1, h, w)
    h_grids = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    w_grids = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    with torch.no_grad():
        for hi in range(h_grids):
            for wi in range(w_grids):
                y1, x1 = hi * stride[0], wi * stride[1]
                y2, x2 = min(y1 + crop[0], h), min(x1 + crop[1], w)
                y1, x1 = max(y2 - crop[0], 0), max(x2 - crop[1], 0)
                preds[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
    ref = (preds / count).softmax(1)
    _, probs = semask.predict(model, images, mode="slide", crop_size=crop, stride=stride, return_probs=True,
                              batch_size=3)
    for i in range(2):
        torch.testing.assert_close(probs[i], ref[i], atol=1e-5, rtol=1e-5)


def test_tta_one_scale_no_flip_equals_plain_and_flip_average(model, images):
    plain = semask.predict(model, images[0])
    one, p_one = semask.predict(model, images[0], scales=(1.0,), flip=False, return_probs=True)
    assert torch.equal(one, plain)
    torch.testing.assert_close(p_one, _probs(model, images[:1])[0], atol=1e-5, rtol=1e-5)
    _, p_flip = semask.predict(model, images[0], flip=True, return_probs=True)
    ref = (_probs(model, images[:1]) + _probs(model, images[:1].flip(-1)).flip(-1))[0] / 2
    torch.testing.assert_close(p_flip, ref, atol=1e-5, rtol=1e-5)


def test_multiscale_tta_resizes_back(model, images):
    _, p = semask.predict(model, images[0], scales=(0.5, 1.5), return_probs=True)
    ref = 0
    for r in (0.5, 1.5):
        size = (int(40 * r + 0.5), int(52 * r + 0.5))
        xs = F.interpolate(images[:1].float(), size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = model(normalize_images(xs, MEAN, STD))
        ref = ref + F.interpolate(logits, size=(40, 52), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(p, ref[0] / 2, atol=1e-5, rtol=1e-5)
    assert semask.predict(model, images[0], tta=True).shape == (40, 52)


def test_keep_ratio_test_resize(model, images):
    model.pretrained_cfg["test_scale"] = (64, 48)
    try:
        label = semask.predict(model, images[0])
    finally:
        model.pretrained_cfg["test_scale"] = None
    size = keep_ratio_size(40, 52, (64, 48))
    assert size == (48, 62)
    xs = F.interpolate(images[:1].float(), size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = F.interpolate(model(normalize_images(xs, MEAN, STD)), size=(40, 52), mode="bilinear")
    assert label.shape == (40, 52) and torch.equal(label, logits[0].argmax(0))


def test_input_types_agree(model, images, tmp_path):
    arr = images[0].permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(tmp_path / "im.png")
    ref = semask.predict(model, images[0])
    for inp in (arr, Image.fromarray(arr), str(tmp_path / "im.png"), images[0].float() / 255, [images[0]]):
        out = semask.predict(model, inp)
        assert torch.equal(out[0] if isinstance(out, list) else out, ref)
    mixed = semask.predict(model, [images[0], images[1, :, :30, :20], images[1]], batch_size=2)
    assert [tuple(m.shape) for m in mixed] == [(40, 52), (30, 20), (40, 52)]
    assert torch.equal(mixed[2], semask.predict(model, images[1]))


def test_bad_inputs(model, images):
    with pytest.raises(ValueError, match="permute"):
        to_image_tensor(images[0].permute(1, 2, 0))
    with pytest.raises(ValueError, match="0..1"):
        to_image_tensor(images[0].float())
    with pytest.raises(ValueError, match="mode"):
        semask.predict(model, images[0], mode="tiles")
    with pytest.raises(ValueError, match="crop_size"):
        m = semask.create_model("semask_swin_tiny_fpn", num_classes=2, embed_dim=8, depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 1, 1), fpn_channels=8)
        m.pretrained_cfg = None
        semask.predict(m, images[0], mode="slide")
    with pytest.raises(ValueError, match="autocast"):
        semask.predict(model, images[0], autocast="int8")


def test_bf16_autocast_runs(model, images):
    labels = semask.predict(model, images, autocast="bf16", batch_size=2)
    ref = semask.predict(model, images)
    agree = np.mean([(a == b).float().mean().item() for a, b in zip(labels, ref)])
    assert labels[0].shape == (40, 52) and agree > 0.8
