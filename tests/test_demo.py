"""`semask demo --quick`: trains on the built-in scenes, mIoU after > before, saves, reloads, draws."""
import json
import re

import numpy as np
from PIL import Image

from semask.cli import main


def test_demo_quick_improves_miou_and_writes_outputs(tmp_path, capsys):
    rc = main(["demo", "--quick", "--iters", "15", "--size", "48", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"mIoU before: ([\d.]+)%\s+after: ([\d.]+)%", out)
    assert m is not None, out
    before, after = float(m.group(1)), float(m.group(2))
    assert after > before + 10, out  # an untrained model guesses; 15 steps already learn sky/grass/road
    assert "predictions identical" in out
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["num_classes"] == 5 and cfg["pretrained_cfg"]["class_names"][:2] == ["sky", "building"]
    pics = sorted((tmp_path / "predictions").glob("scene_*.png"))
    assert len(pics) == 4
    panel = np.asarray(Image.open(pics[0]))
    assert panel.shape[1] > 7 * 48 and panel.shape[2] == 3  # image, truth, prediction, 4 prior maps
