"""Training engine: lr schedule, optimizer groups, accumulation / checkpointing equivalences,
resumable safetensors checkpoints, and 2-process gloo DDP == 1 process with the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import semask
from semask.data import SyntheticScenes
from semask.data.transforms import Normalize
from semask.train import TrainConfig, Trainer, poly_warmup_factor


def tiny_model(k=5):
    torch.manual_seed(0)
    return semask.create_model("semask_swin_tiny_fpn", num_classes=k, embed_dim=8, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 1), window_size=4, fpn_channels=8, drop_path_rate=0.0,
                               decoder_dropout=0.0, sem_drop=0.0)


def scenes(n=4):
    return SyntheticScenes(n, (32, 32), transforms=Normalize())


def cfg(**kw):
    base = dict(iters=1, batch_size=2, lr=1e-3, shuffle=False, freeze_bn=True, num_workers=0, progress=False)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in semask.train.unwrap(model).state_dict().items()}


def assert_same_weights(a, b, atol=1e-5):
    """Equal up to 1 % of one lr=1e-3 step: Adam's first steps are ~lr * sign(grad), so float-rounding
    differences in near-zero gradients may move single elements by ~1e-6; a wrong batch gives ~1e-3."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_poly_schedule_with_linear_warmup():
    c = TrainConfig(iters=100, lr=1e-3, warmup_iters=10, warmup_ratio=1e-6)
    assert poly_warmup_factor(0, c) == pytest.approx(1e-6)
    assert poly_warmup_factor(5, c) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup_factor(50, c) == pytest.approx(0.5)
    assert poly_warmup_factor(100, c) == 0.0
    c2 = TrainConfig(iters=100, lr=1e-3, min_lr=1e-4, poly_power=0.9)
    assert poly_warmup_factor(50, c2) == pytest.approx(0.9 * 0.5 ** 0.9 + 0.1)


def test_optimizer_uses_official_no_decay_groups():
    t = Trainer(tiny_model(), scenes(), cfg(weight_decay=0.05))
    decay_of = {id(p): g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
    named = dict(t.model.named_parameters())
    assert decay_of[id(named["backbone.layers.0.blocks.0.attn.relative_position_bias_table"])] == 0.0
    assert decay_of[id(named["backbone.norm0.weight"])] == 0.0
    assert decay_of[id(named["decode_head.conv_seg.weight"])] == 0.05
    assert len(decay_of) == sum(1 for p in t.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["accumulation", "checkpointing"])
def test_accumulation_and_grad_checkpointing_match_plain_step(variant):
    def record_grads(trainer):
        """Capture the gradients the optimizer steps with (Adam's update hides a gradient scale)."""
        grads = []
        trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(
            p.grad.clone() for p in trainer.model.parameters() if p.grad is not None))
        return grads

    plain = Trainer(tiny_model(), scenes(2), cfg(iters=1))
    g_plain = record_grads(plain)
    plain.fit()
    kw = dict(batch_size=1, accum_steps=2) if variant == "accumulation" else dict(grad_checkpointing=True)
    other = Trainer(tiny_model(), scenes(2), cfg(iters=1, **kw))
    g_other = record_grads(other)
    other.fit()
    assert len(g_plain) == len(g_other) > 0
    for a, b in zip(g_plain, g_other):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert_same_weights(weights(plain.model), weights(other.model))


def test_bf16_autocast_step_is_finite():
    t = Trainer(tiny_model(), scenes(), cfg(amp="bf16"))
    stats = t.train_step([next(t._loader())])
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()) and {"loss", "loss_ce", "loss_cate"} <= set(stats)


def test_checkpoint_resume_without_pickle(tmp_path):
    t = Trainer(tiny_model(), scenes(), cfg(iters=2, warmup_iters=1), out_dir=tmp_path)
    t.fit()
    ckpt = tmp_path / "last_checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "optimizer.safetensors",
                                                "trainer_state.json"}
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.bin"))
    reloaded = semask.create_model("semask_swin_tiny_fpn", pretrained=str(tmp_path))
    assert_same_weights(weights(t.model), weights(reloaded), atol=0)
    r = Trainer(tiny_model(), scenes(), cfg(iters=3, warmup_iters=1), resume=ckpt)
    assert r.start_iter == 2
    assert_same_weights(weights(t.model), weights(r.model), atol=0)
    a, b = t.optimizer.state_dict(), r.optimizer.state_dict()
    for pid, st in a["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][key])), key
    assert r.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * poly_warmup_factor(2, r.cfg))
    r.fit()
    assert r.result.history[0]["iteration"] == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny_model(), scenes(), cfg(), resume=tmp_path / "nowhere")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = Trainer(tiny_model(), scenes(), cfg(iters=2, batch_size=1))
        assert isinstance(t.model, torch.nn.parallel.DistributedDataParallel)
        t.fit()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights(t.model).items()}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_same_global_batch(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    single = Trainer(tiny_model(), scenes(), cfg(iters=2, batch_size=2))
    single.fit()
    assert_same_weights(load_file(out), weights(single.model))
    # and it really trained: weights moved away from the initialisation
    init = weights(tiny_model())
    assert not torch.allclose(init["decode_head.conv_seg.weight"], load_file(out)["decode_head.conv_seg.weight"])
