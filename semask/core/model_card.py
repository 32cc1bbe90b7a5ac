"""Model card (``README.md``) written next to ``config.json`` + ``model.safetensors``."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

__all__ = ["SEMASK_CITATION", "render_model_card"]

SEMASK_CITATION = """@inproceedings{jain2023semask,
  title     = {SeMask: Semantically Masked Transformers for Semantic Segmentation},
  author    = {Jain, Jitesh and Singh, Anukriti and Orlov, Nikita and Huang, Zilong and Li, Jiachen and
               Walton, Steven and Shi, Humphrey},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV) Workshops},
  year      = {2023}
}"""

_METRIC_NAMES = {"miou": "mIoU (single scale)", "miou_ms": "mIoU (multi-scale + flip)"}


def render_model_card(config: Mapping[str, Any], repo_id: Optional[str] = None,
                      metrics: Optional[Mapping[str, float]] = None, num_params: Optional[int] = None) -> str:
    """Markdown card with Hub metadata (license, library, tags, datasets), the architecture, classes,
    metrics, usage, license and the SeMask citation. ``config`` is what ``config.json`` holds."""
    from huggingface_hub import ModelCardData

    pcfg: Dict[str, Any] = dict(config.get("pretrained_cfg") or {})
    arch = config.get("architecture", "?")
    tag = pcfg.get("tag") or ""
    name = f"{arch}.{tag}" if tag else arch
    k = config.get("num_classes", pcfg.get("num_classes"))
    dataset = pcfg.get("dataset") or None
    license_id = pcfg.get("license") or "apache-2.0"
    scores = {**(pcfg.get("metrics") or {}), **(config.get("metrics") or {}), **(metrics or {})}
    data = ModelCardData(
        license=license_id, library_name="semask", pipeline_tag="image-segmentation",
        tags=["semask", "semantic-segmentation", "image-segmentation", "pytorch", "safetensors"],
        datasets=[dataset] if dataset else None,
    )
    load = (f'semask.create_model("hf-hub:{repo_id}")  # or semask.from_pretrained("{repo_id}")' if repo_id
            else 'semask.from_pretrained("path/to/this/folder")')
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name}", "",
        "[SeMask](https://arxiv.org/abs/2112.12782) (Semantically Masked Transformers) semantic segmentation "
        "model for the `semask` library, a plain-PyTorch re-implementation of "
        "[the official code](https://github.com/Picsart-AI-Research/SeMask-Segmentation)."
        + (f" Trained on **{dataset}**." if dataset else ""), "",
        "## Model details", "",
        f"- architecture: `{arch}`" + (f" (tag `{tag}`)" if tag else ""),
        f"- classes: {k}",
    ]
    if num_params is not None:
        lines.append(f"- parameters: {num_params / 1e6:.2f} M")
    mk = config.get("model_kwargs") or {}
    if mk:
        lines.append("- build arguments: " + ", ".join(f"`{a}={v!r}`" for a, v in sorted(mk.items())))
    if pcfg.get("mean") and pcfg.get("std"):
        lines.append(f"- input: RGB scaled to 0..1, normalised with mean {tuple(pcfg['mean'])}, std {tuple(pcfg['std'])}")
    if pcfg.get("crop_size"):
        lines.append(f"- training crop: {tuple(pcfg['crop_size'])}")
    if pcfg.get("source_url"):
        lines.append(f"- converted from: {pcfg['source_url']}")
    if (config.get("converted_from") or {}).get("sha256"):
        lines.append(f"- sha256 of the converted file: `{config['converted_from']['sha256']}`")
    if pcfg.get("notes"):
        lines.append(f"- notes: {pcfg['notes']}")
    lines += ["", "## Usage", "", "```python", "import semask", "",
              f"model = {load}", "model.eval()",
              *([f'# the registered tag loads this repo too: semask.create_model("{name}", pretrained=True)']
                if tag and repo_id and pcfg.get("hf_hub_id") == repo_id else []),
              "logits = model(images)  # (B, 3, H, W) normalised images -> (B, K, H, W)", "```", ""]
    if scores:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_METRIC_NAMES.get(m, m)} | {v} |" for m, v in scores.items()]
        lines.append("")
    names = pcfg.get("class_names")
    if names:
        lines += ["## Classes", "", ", ".join(f"{i}: {c}" for i, c in enumerate(names)), ""]
    lines += ["## License", "",
              f"`{license_id}`. SeMask is by Picsart AI Research (Apache-2.0); the weights keep the license of "
              "their source checkpoint and training data.", "",
              "## Citation", "", "```bibtex", SEMASK_CITATION, "```", ""]
    return "\n".join(lines)
