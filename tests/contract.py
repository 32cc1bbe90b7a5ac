"""One contract for every SeMask family (the pattern of smp's ``tests/models/base.py``).

A family's test class subclasses :class:`BackboneContract` or :class:`SegmentorContract` (or
:class:`MaskFormerContract`) and sets a few class attributes; the base classes define the test methods.
This module has no ``test_`` prefix and its classes no ``Test`` prefix, so pytest collects them only
through their subclasses (``tests/test_contract.py``).

Subclasses implement ``build(num_classes)`` (a tiny model, fresh random weights from a fixed seed) and
may set:

* ``num_classes`` / ``other_num_classes``: K and the K' of the class-reset check;
* ``size``: an odd input size (windows, patch and stride padding all kick in);
* ``timm_name`` / ``timm_kwargs``: a name registered in timm for the ``features_only`` and smp ``tu-`` checks;
* ``export_size``: size of the ``torch.export`` example (``None``: not exported);
* ``loss_keys``: keys that ``model(x, labels)`` must return.

Every model gets non-zero semantic ``gamma`` (0 at init: the semantic branch would be the identity) and
non-trivial BatchNorm statistics, so every check sees every branch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import pytest
import torch
import torch.nn as nn

import semask
from semask.accel import is_optimized, restore
from semask.export import export_program

TOL = dict(atol=1e-5, rtol=1e-5)


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gamma and BatchNorm statistics/affines (both are identities at init), and small
    random values in every other all-zero parameter (biases, the zero-initialised sampling offsets and
    attention weights of deformable attention), which would otherwise block gradients upstream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)
            elif not p.any():
                p.normal_(0.0, 0.02, generator=g)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
    return model


def _flat(out) -> List[torch.Tensor]:
    """Every tensor of a (nested) output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def _assert_outputs_equal(got, want, **tol) -> None:
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **(tol or dict(atol=0, rtol=0)))


def _random_objective(outputs: Sequence[torch.Tensor], seed: int = 1) -> torch.Tensor:
    """A fixed random projection of the outputs (a plain sum has zero gradient through LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in outputs)


def no_stochastic_depth(model: nn.Module) -> nn.Module:
    """Train mode without drop path / dropout: a dropped block has no gradient for that step."""
    for m in model.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model.train()


def _grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_checkpointing_keeps_gradients(model: nn.Module, backward: Callable[[], None]) -> None:
    """``backward()`` (one forward + backward of ``model``) gives the same gradients with gradient
    checkpointing off and on (same seed: drop path, dropout and point sampling draw the same)."""
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(0)
        backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def _assert_every_parameter_has_gradient(model: nn.Module, allow_zero: Set[str] = frozenset()) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:8]} ({len(missing)} in all)"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:8]}"
    zero = [n for n, p in model.named_parameters()
            if p.grad is not None and not p.grad.any() and not any(s in n for s in allow_zero)]
    assert not zero, f"all-zero gradients in {zero[:8]}"


def _assert_only_class_tensors_changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor],
                                       ref_k: Dict[str, torch.Tensor], ref_k2: Dict[str, torch.Tensor]) -> None:
    """After a class reset, the tensors that changed are exactly those whose shape depends on K (from two
    meta-device builds with K and K'); every other tensor is unchanged."""
    assert after.keys() == before.keys()
    changed = {k for k in before if before[k].shape != after[k].shape}
    class_dependent = {k for k in ref_k if ref_k[k].shape != ref_k2[k].shape}
    assert changed and changed == class_dependent
    for k in before.keys() - changed:
        assert torch.equal(before[k], after[k]), k
        assert after[k].shape == ref_k2[k].shape


class _Common:
    num_classes: int = 5
    other_num_classes: int = 7
    size: Tuple[int, int] = (37, 45)
    export_size: Optional[Tuple[int, int]] = None
    export_check_size: Tuple[int, int] = (75, 83)
    # whether a program exported from a batch-2 example runs batch 1: torch's fake conv reads a guard
    # batch > 1 from a conv input with channels-last strides (timm's ConvNeXt blocks), so those don't
    export_batch_one: bool = True
    # False: only a static-shape export works (the MaskFormer family: padding to 32, the deformable
    # attention's per-level spatial shapes and the mask upsampling specialise the graph on the size)
    export_dynamic: bool = True
    # output size of a stride-r stage: "ceil" (padded / padded-conv stems), "floor" (unpadded conv stems)
    rounding: str = "ceil"
    # parameter names (substrings) whose gradient may be all zero in the tiny config
    zero_grad_ok: Set[str] = frozenset()

    def build(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def model(self, num_classes: Optional[int] = None, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return perturb(self.build(self.num_classes if num_classes is None else num_classes), seed)

    def meta_state(self, num_classes: int) -> Dict[str, torch.Tensor]:
        torch.manual_seed(0)
        with torch.device("meta"):
            return self.build(num_classes).state_dict()

    def inputs(self, batch: int = 2, size: Optional[Tuple[int, int]] = None, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 3, *(size or self.size), generator=torch.Generator().manual_seed(seed))

    def outputs(self, model: nn.Module, x: torch.Tensor):
        return model(x)

    def run(self, model: nn.Module, x: torch.Tensor):
        with torch.no_grad():
            return self.outputs(model, x)

    # ---- checks shared by backbones and segmentors ------------------------------------------------

    def test_batch_equals_single(self):
        model = self.model().eval()
        x = self.inputs(2)
        both = _flat(self.run(model, x))
        singles = [_flat(self.run(model, x[i:i + 1])) for i in range(2)]
        for j, t in enumerate(both):
            torch.testing.assert_close(t, torch.cat([s[j] for s in singles]), **TOL)

    def test_state_dict_round_trip(self, tmp_path: Path):
        from safetensors.torch import load_file, save_file

        model = self.model().eval()
        other = self.model(seed=1).eval()
        x = self.inputs(1)
        ref = self.run(model, x)
        assert not torch.equal(_flat(self.run(other, x))[0], _flat(ref)[0])  # the seed matters
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        other.load_state_dict(load_file(str(path)), strict=True)
        _assert_outputs_equal(self.run(other, x), ref)

    def test_optimize_equals_reference_and_restore_is_exact(self):
        model = self.model().eval()
        xs = [self.inputs(2), self.inputs(1, (self.size[1] + 10, self.size[0] + 6), seed=1)]
        refs = [self.run(model, x) for x in xs]
        assert semask.optimize(model, autotune=False) is model and is_optimized(model)
        for x, ref in zip(xs, refs):
            _assert_outputs_equal(self.run(model, x), ref, **TOL)
        restore(model)
        assert not is_optimized(model)
        for x, ref in zip(xs, refs):
            _assert_outputs_equal(self.run(model, x), ref)

    def test_export_program_is_size_generic(self):
        if self.export_size is None:
            pytest.skip(f"{type(self).__name__}: no torch.export check for this family")
        model = self.model().eval()
        if not self.export_dynamic:  # one static shape: the example's
            run = export_program(model, self.inputs(2, self.export_size, seed=2), dynamic=False).module()
            x = self.inputs(2, self.export_size, seed=3)
            _assert_outputs_equal(run(x), self.run(model, x), **TOL)
            return
        run = export_program(model, size=self.export_size, batch=2).module()
        x = self.inputs(3, self.export_check_size, seed=2)  # another batch and size than the example
        _assert_outputs_equal(run(x), self.run(model, x), **TOL)
        x = self.inputs(1, self.export_check_size, seed=3)
        if self.export_batch_one:
            _assert_outputs_equal(run(x), self.run(model, x), **TOL)
        else:  # known limitation (see export_batch_one); fails loudly, never silently wrong
            with pytest.raises(Exception, match=r"size\(\)\[0\] > 1"):
                run(x)


class BackboneContract(_Common):
    """``forward(x) -> (features, priors)`` backbones (Swin, MiT, wrapped timm)."""

    timm_name: Optional[str] = None
    timm_kwargs: Dict[str, object] = {}
    features_only_kwargs: Dict[str, object] = {}  # extra kwargs of the features_only build
    smp_encoder: bool = True  # smp's tu- encoders (4+ stages)

    def test_forward_shapes_follow_feature_info(self):
        model = self.model().eval()
        x = self.inputs(2)
        feats, priors = self.run(model, x)
        info = model.feature_info
        assert len(feats) == len(priors) == len(info) == len(model.out_indices)
        assert model.feature_channels == [f.shape[1] for f in feats]
        h, w = self.size
        for f, p, i in zip(feats, priors, info):
            r = i["reduction"]
            fh, fw = (-(-h // r), -(-w // r)) if self.rounding == "ceil" else (h // r, w // r)
            assert f.shape == (2, i["num_chs"], fh, fw), (f.shape, i)
            assert p.shape == (2, self.num_classes, *f.shape[-2:])
            assert torch.isfinite(f).all() and torch.isfinite(p).all()

    def test_backward_reaches_every_parameter(self):
        model = no_stochastic_depth(self.model())
        x = self.inputs(2).requires_grad_(True)
        feats, priors = model(x)
        _random_objective(feats + priors).backward()
        _assert_every_parameter_has_gradient(model, self.zero_grad_ok)
        assert x.grad is not None and x.grad.abs().sum() > 0

    def test_grad_checkpointing_same_gradients(self):
        model = self.model().train()
        x = self.inputs(2)

        def backward() -> None:
            feats, priors = model(x)
            _random_objective(feats + priors).backward()

        _assert_checkpointing_keeps_gradients(model, backward)

    def test_reset_classes_changes_only_class_tensors(self):
        k2 = self.other_num_classes
        model = self.model().eval()
        x = self.inputs(1)
        feats0, _ = self.run(model, x)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.reset_classes(k2)
        _assert_only_class_tensors_changed(before, model.state_dict(), self.meta_state(self.num_classes),
                                           self.meta_state(k2))
        assert model.num_classes == k2
        feats, priors = self.run(model, x)
        assert [f.shape for f in feats] == [f.shape for f in feats0]
        assert all(p.shape[1] == k2 for p in priors)

    def _timm_model(self, **kwargs) -> nn.Module:
        import timm

        if self.timm_name is None:
            pytest.skip(f"{type(self).__name__}: not registered in timm")
        torch.manual_seed(0)
        return timm.create_model(self.timm_name, num_classes=self.num_classes, **self.timm_kwargs, **kwargs)

    def test_timm_features_only(self):
        ours = self._timm_model().eval()
        fm = self._timm_model(features_only=True, **self.features_only_kwargs).eval()
        assert fm.feature_info.channels() == ours.feature_channels
        assert fm.feature_info.reduction() == [int(i["reduction"]) for i in ours.feature_info]
        inner = getattr(fm, "model", fm)
        inner.load_state_dict(ours.state_dict())
        x = self.inputs(1)
        with torch.no_grad():
            got, (want, _) = fm(x), ours(x)
        _assert_outputs_equal(got, want)

    def test_smp_tu_encoder(self):
        smp = pytest.importorskip("segmentation_models_pytorch")
        self._timm_model()  # skips when not registered in timm
        if not self.smp_encoder:
            pytest.skip(f"{type(self).__name__}: smp's tu- encoders need 4 stages")
        torch.manual_seed(0)
        net = smp.Unet(f"tu-{self.timm_name}", encoder_weights=None, classes=2, decoder_channels=(8,) * 5,
                       num_classes=self.num_classes, **self.timm_kwargs).eval()
        with torch.no_grad():
            out = net(self.inputs(1, (64, 64)))
        assert out.shape == (1, 2, 64, 64) and torch.isfinite(out).all()


class SegmentorContract(_Common):
    """``model(x) -> (B, K, H, W)`` and ``model(x, labels) -> loss dict`` segmentors (FPN, SegFormer)."""

    loss_keys: Set[str] = frozenset({"loss", "loss_ce", "loss_cate"})
    scores: bool = False  # MaskFormer family: semantic scores in [0, Q], not logits

    def labels(self, batch: int = 2, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        h, w = size or self.size
        g = torch.Generator().manual_seed(3)
        y = torch.randint(0, self.num_classes, (batch, h, w), generator=g)
        y[:, :3] = 255  # ignored pixels
        return y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> Dict[str, torch.Tensor]:
        return model(x, y, **kwargs)

    def test_logits_shape_at_odd_size(self):
        model = self.model().eval()
        out = self.run(model, self.inputs(2))
        assert out.shape == (2, self.num_classes, *self.size) and torch.isfinite(out).all()
        if self.scores:
            num_queries = model.sem_seg_head.predictor.num_queries
            assert (out >= 0).all() and (out <= num_queries).all()

    def test_losses_and_backward_reach_every_parameter(self):
        model = no_stochastic_depth(self.model())
        x, y = self.inputs(2), self.labels(2)
        torch.manual_seed(0)
        losses = self.loss(model, x, y)
        assert self.loss_keys <= set(losses), sorted(losses)
        assert "logits" not in losses  # only on request: the largest tensor of a step
        logits = self.loss(model, x, y, return_logits=True)["logits"]
        assert logits.shape == (2, self.num_classes, *self.size) and not logits.requires_grad
        for k, v in losses.items():
            assert v.ndim == 0 and torch.isfinite(v), (k, v)
        terms = sum(v for k, v in losses.items() if k.startswith("loss_"))
        torch.testing.assert_close(losses["loss"], terms)
        losses["loss"].backward()
        _assert_every_parameter_has_gradient(model, self.zero_grad_ok)

    def test_grad_checkpointing_same_gradients(self):
        model = self.model().train()
        x, y = self.inputs(2), self.labels(2)
        _assert_checkpointing_keeps_gradients(model, lambda: self.loss(model, x, y)["loss"].backward())

    def test_reset_classifier_changes_only_class_tensors(self):
        k2 = self.other_num_classes
        model = self.model().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.reset_classifier(k2)
        _assert_only_class_tensors_changed(before, model.state_dict(), self.meta_state(self.num_classes),
                                           self.meta_state(k2))
        assert model.num_classes == k2
        assert self.run(model, self.inputs(1)).shape == (1, k2, *self.size)
        model.train()
        torch.manual_seed(0)
        losses = self.loss(model, self.inputs(2), self.labels(2))
        assert torch.isfinite(losses["loss"])

    def test_save_pretrained_from_pretrained_round_trip(self, tmp_path: Path):
        model = self.model().eval()
        x = self.inputs(1)
        ref = self.run(model, x)
        folder = model.save_pretrained(tmp_path / "model")
        assert (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()
        again = type(model).from_pretrained(tmp_path / "model").eval()
        assert type(again) is type(model)
        _assert_outputs_equal(self.run(again, x), ref)
        again = semask.from_pretrained(tmp_path / "model").eval()  # the generic loader too
        _assert_outputs_equal(self.run(again, x), ref)


class MaskFormerContract(SegmentorContract):
    """MaskFormer / Mask2Former: scores (not logits), Hungarian-matched losses per decoder layer."""

    scores = True
    loss_keys = frozenset({"loss", "loss_ce", "loss_mask", "loss_dice", "loss_cate", "loss_ce_0"})
