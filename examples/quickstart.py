"""Build a SeMask Swin-T FPN, segment a random image and show what every part computes."""
import torch

import semask

torch.manual_seed(0)
model = semask.create_model("semask_swin_tiny_fpn", num_classes=150).eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"semask_swin_tiny_fpn: {n_params / 1e6:.3f} M parameters, tag cfg: {model.pretrained_cfg['dataset']}")
image = torch.randn(1, 3, 256, 320)
with torch.inference_mode():
    out = model.forward_all(image)
for i, (f, p) in enumerate(zip(out["features"], out["priors"])):
    print(f"stage {i}: features {tuple(f.shape)}  semantic prior {tuple(p.shape)}")
print("logits", tuple(out["logits"].shape), "-> label map", tuple(out["logits"].argmax(1).shape))
