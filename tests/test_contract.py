"""Every family against one contract (tests/contract.py): SeMask Swin, MiT and wrapped-timm backbones;
Swin FPN, MiT SegFormer and wrapped-timm FPN segmentors; MaskFormer and Mask2Former. Tiny configs."""
from __future__ import annotations

import pytest

import semask
from semask.backbones.mit import SeMaskMiT
from semask.backbones.swin import SeMaskSwinTransformer

from conftest import TINY_SWIN
from contract import BackboneContract, MaskFormerContract, SegmentorContract

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_MIT = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1))
TINY_PVT = dict(backbone="pvt_v2_b0", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
TINY_CONVNEXT = dict(backbone="convnext_tiny", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
# the micro MaskFormer-family size of tests/test_d2_models.py
TINY_D2 = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, conv_dim=32, mask_dim=16,
               hidden_dim=32, num_queries=6, nheads=4, dim_feedforward=32, dec_layers=2, enc_layers=1)
# odd, and >= 64 so that ConvNeXt's last (floor-rounded) stage is 2x2: global semantic attention over a
# single token has no gradient for its keys
WRAPPED_SIZE = (69, 75)
SWIN_KW = {k: v for k, v in TINY_SWIN.items() if k != "num_classes"}


# ---- backbones -------------------------------------------------------------------------------------

class TestSwinBackbone(BackboneContract):
    timm_name = "semask_swin_tiny"
    timm_kwargs = SWIN_KW
    export_size = (64, 80)
    export_check_size = (45, 70)

    def build(self, num_classes):
        return SeMaskSwinTransformer(num_classes=num_classes, **SWIN_KW)

    @pytest.mark.slow
    def test_export_program_is_size_generic(self):
        super().test_export_program_is_size_generic()  # a 2-stage Swin export runs in tests/test_export.py


class TestSwinBackboneGlobal(BackboneContract):
    """All-global semantic layers, 3 stages: other paths of the same code."""
    size = (29, 51)
    timm_name = "semask_swin_tiny"
    timm_kwargs = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=7, sem_global=True)
    features_only_kwargs = dict(out_indices=(0, 1, 2))  # timm's features_only default asks for 4 stages
    smp_encoder = False

    def build(self, num_classes):
        return SeMaskSwinTransformer(num_classes=num_classes, **self.timm_kwargs)


class TestMiTBackbone(BackboneContract):
    timm_name = "semask_mit_b0"
    timm_kwargs = TINY_MIT
    export_size = (64, 80)

    def build(self, num_classes):
        return SeMaskMiT(num_classes=num_classes, **TINY_MIT)


class TestWrappedTimmBackbone(BackboneContract):
    timm_name = "semask_wrap"
    timm_kwargs = TINY_CONVNEXT
    rounding = "floor"  # ConvNeXt's 4x4 stride-4 stem is unpadded
    size = WRAPPED_SIZE
    export_size = (64, 80)
    export_batch_one = False  # timm ConvNeXt blocks feed their convs channels-last views (see BackboneContract)

    def build(self, num_classes):
        import timm

        name = TINY_CONVNEXT["backbone"]
        kw = {k: v for k, v in TINY_CONVNEXT.items() if k != "backbone"}
        return semask.wrap(timm.create_model(name, **kw), num_classes=num_classes, sem_window_size=4)


class TestWrappedPVTBackbone(TestWrappedTimmBackbone):
    """A transformer family behind the same adapter (NLC stages, overlapping padded patch embeddings)."""
    timm_kwargs = TINY_PVT
    rounding = "ceil"
    size = (37, 45)
    export_size = None

    def build(self, num_classes):
        import timm

        kw = {k: v for k, v in TINY_PVT.items() if k != "backbone"}
        return semask.wrap(timm.create_model(TINY_PVT["backbone"], **kw), num_classes=num_classes, sem_window_size=4)


# ---- segmentors ------------------------------------------------------------------------------------

class TestSwinFPN(SegmentorContract):
    export_size = (64, 80)

    def build(self, num_classes):
        return semask.create_model("semask_swin_tiny_fpn", num_classes=num_classes, fpn_channels=16, **SWIN_KW)

    @pytest.mark.slow
    def test_export_program_is_size_generic(self):
        super().test_export_program_is_size_generic()  # tests/test_export.py exports this model too


class TestMiTSegFormer(SegmentorContract):
    def build(self, num_classes):
        return semask.create_model("semask_mit_b0_segformer", num_classes=num_classes, decoder_channels=16, **TINY_MIT)


class TestWrappedTimmFPN(SegmentorContract):
    size = WRAPPED_SIZE
    export_size = (64, 80)
    export_batch_one = False  # timm ConvNeXt blocks (see tests/contract.py)

    def build(self, num_classes):
        return semask.create_model("semask_fpn", num_classes=num_classes, fpn_channels=16, **TINY_CONVNEXT)


class TestMaskFormer(MaskFormerContract):
    export_size = (64, 96)
    export_dynamic = False

    def build(self, num_classes):
        return semask.create_model("semask_swin_large_maskformer", num_classes=num_classes, **TINY_D2)


class TestMask2Former(MaskFormerContract):
    export_size = (64, 96)
    export_dynamic = False

    def build(self, num_classes):
        return semask.create_model("semask_swin_large_mask2former", num_classes=num_classes, **TINY_D2)
