"""Mixed precision (issue #8): bf16 autocast on CPU stays within documented tolerances of fp32, and
the unscaled semantic attention keeps its softmax finite in fp16."""
from __future__ import annotations

import pytest
import torch

from semask.layers import SemanticAttention

from test_export import _tiny_fpn

# Documented tolerance of bf16 autocast vs fp32 (8-bit mantissa, errors accumulate over ~20 layers):
# max |logit difference| <= 3% of the largest fp32 |logit|, and >= 98% of pixels keep their argmax.
BF16_REL_TOL = 0.03
BF16_ARGMAX_AGREEMENT = 0.98


def test_bf16_autocast_cpu_close_to_fp32():
    model = _tiny_fpn()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        ref = model.forward_all(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_all(x)
    assert out["logits"].dtype == torch.bfloat16  # autocast really ran the convs/linears in bf16
    pairs = [(out["logits"], ref["logits"])] + list(zip(out["priors"], ref["priors"]))
    for got, want in pairs:
        assert torch.isfinite(got).all()
        err = (got.float() - want).abs().max().item()
        assert err <= BF16_REL_TOL * want.abs().max().item(), err
    agree = (out["logits"].argmax(1) == ref["logits"].argmax(1)).float().mean().item()
    assert agree >= BF16_ARGMAX_AGREEMENT, agree


def _large_logit_attention() -> SemanticAttention:
    torch.manual_seed(0)
    attn = SemanticAttention(8, 4)
    with torch.no_grad():
        attn.mlp_cls_q.weight.normal_(0, 1.0)
        attn.mlp_cls_k.weight.normal_(0, 1.0)
        attn.gamma.fill_(1.0)
    return attn.eval()


def test_semantic_attention_fp16_softmax_is_safe():
    attn = _large_logit_attention()
    x = torch.randn(2, 10, 8) * 60  # unscaled q k^T reaches ~1e5, beyond fp16's 65504
    with torch.no_grad():
        prior32, y32 = attn(x)
        half = attn.half()
        q16, k16 = half.mlp_cls_q(x.half()), half.mlp_cls_k(x.half())
        # the risk being guarded against: the fp16 logits themselves overflow
        assert not torch.isfinite(q16 @ k16.transpose(1, 2)).all()
        prior16, y16 = half(x.half())
    assert y16.dtype == prior16.dtype == torch.float16
    assert torch.isfinite(y16).all() and torch.isfinite(prior16).all()
    # same result as fp32 up to fp16 rounding of the inputs/weights
    scale = y32.abs().max().item()
    assert (y16.float() - y32).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("dtype,rel_tol", [(torch.bfloat16, 0.05), (torch.float16, 2e-2)])
def test_semantic_attention_autocast_finite_and_close(dtype, rel_tol):
    # fp16 autocast (the GPU recipe; CPU autocast supports fp16 too) casts bmm inputs to fp16: the
    # fp32 upcast of the attention must not be undone by it; bf16 has fp32's range
    attn = _large_logit_attention()
    x = torch.randn(2, 10, 8) * 60
    with torch.no_grad():
        _, y32 = attn(x)
        with torch.autocast("cpu", dtype=dtype):
            prior, y = attn(x)
    assert prior.dtype == dtype
    assert torch.isfinite(y).all()
    assert (y.float() - y32).abs().max().item() <= rel_tol * y32.abs().max().item()
