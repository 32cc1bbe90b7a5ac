"""Training engine behind ``semask train`` and ``semask demo``.

The official recipe: AdamW with the no-weight-decay groups of ``model.param_groups``, poly
learning-rate decay after a linear warm-up, the SeMask losses (CE + 0.4 x semantic CE). On top:
AMP (bf16 / fp16), gradient checkpointing, gradient accumulation, periodic evaluation, resumable
checkpoints without pickle (safetensors + JSON), tqdm progress, and DDP through ``torchrun``
(DistributedSampler, SyncBatchNorm on GPUs, gloo on CPU). One *iteration* is one optimizer step
on a global batch of ``batch_size x accum_steps x world_size`` images.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .core.folder import file_sha256
from .data.datasets import collate_samples
from .hub.io import save_pretrained
from .inference import model_cfg, predict, resolve_autocast
from .metrics import SegmentationMetric

__all__ = [
    "TrainConfig", "Trainer", "evaluate", "poly_warmup_factor", "build_optimizer", "init_distributed",
    "save_checkpoint", "load_checkpoint", "verify_checkpoint", "find_checkpoint", "CheckpointError",
    "set_dataset_cfg", "unwrap",
]


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer` (defaults: the official ADE20K FPN recipe, short)."""

    iters: int = 1000
    batch_size: int = 8  # per process and micro-step
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    clip_grad: Optional[float] = None  # L2 norm clip (None: off)
    amp: Optional[str] = None  # None | "bf16" | "fp16"
    grad_checkpointing: bool = False
    freeze_bn: bool = False  # keep BatchNorm in eval mode (small batches; exact DDP equivalence on CPU)
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under DDP on GPUs
    eval_interval: int = 0  # iterations between evaluations (0: only at the end)
    save_interval: int = 0  # iterations between resumable checkpoints (0: only at the end)
    num_workers: int = 2
    shuffle: bool = True
    seed: int = 0
    progress: bool = True
    eval_batch_size: int = 4

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def poly_warmup_factor(it: int, cfg: TrainConfig) -> float:
    """lr(it) / base_lr: mmcv's poly decay with min_lr, times its linear warm-up ramp."""
    progress = min(it, cfg.iters) / max(cfg.iters, 1)
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    factor = (1 - min_ratio) * (1 - progress) ** cfg.poly_power + min_ratio
    if it < cfg.warmup_iters:
        factor *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return factor


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the official groups (no decay for pos-embeds, relative bias tables, norms)."""
    m = unwrap(model)
    if hasattr(m, "param_groups"):
        groups = m.param_groups(cfg.weight_decay)
    else:
        params = [p for p in m.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.weight_decay),
                  dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999))


def init_distributed() -> Tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes (env vars); (rank, world_size, device).

    Uses NCCL with one GPU per local rank when CUDA is available, gloo on CPU. Without torchrun
    (no WORLD_SIZE) returns (0, 1, cuda:0 or cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


def set_dataset_cfg(model: nn.Module, dataset: str, class_names: Sequence[str], palette: Sequence[Sequence[int]],
                    crop_size: Sequence[int], test_scale: Optional[Sequence[int]] = None,
                    reduce_zero_label: bool = False) -> None:
    """Record what the model was trained on in its pretrained cfg (written by save_pretrained, read
    by ``predict`` for normalisation/resize and by the CLI for class names and colours)."""
    from .models._registry import PretrainedCfg

    base = model_cfg(model)
    arch = getattr(model, "semask_config", {}).get("architecture", base.get("architecture", ""))
    cfg = PretrainedCfg.from_dict({**base, "architecture": arch, "tag": "", "hf_hub_id": None, "source_url": None,
                                   "metrics": {}, "num_classes": len(class_names), "dataset": dataset,
                                   "class_names": tuple(class_names), "palette": tuple(map(tuple, palette)),
                                   "crop_size": tuple(crop_size), "reduce_zero_label": reduce_zero_label})
    cfg.test_scale = tuple(test_scale) if test_scale is not None else None
    model.pretrained_cfg = cfg.to_dict()
    if hasattr(model, "semask_config"):
        model.semask_config = dict(model.semask_config, pretrained_cfg=cfg.to_dict())


# ----------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Any] = {"param_groups": state["param_groups"], "scalars": {}}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["scalars"][f"{pid}.{k}"] = v
    return tensors, meta


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


CHECKPOINT_FORMAT = "semask-train-checkpoint"
_STATE_NAME, _OPTIM_NAME = "trainer_state.json", "optimizer.safetensors"


class CheckpointError(ValueError):
    """A training checkpoint that is incomplete, damaged or does not fit the model / optimizer."""


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # folders cannot be opened (or fsynced) on Windows
        return
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(path: Path) -> Tuple[Path, Path]:
    """(folder being written, previous checkpoint kept until the new one is in place)."""
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def save_checkpoint(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    scaler: Optional[Any] = None, extra: Optional[Dict[str, Any]] = None,
                    scheduler: Optional[Any] = None) -> Path:
    """A resumable checkpoint folder: the model folder (config.json + model.safetensors) plus
    ``optimizer.safetensors`` (moment tensors, RNG) and ``trainer_state.json`` (iteration, groups,
    scheduler, sizes and SHA-256 of the other files).

    Atomic: everything is written and fsynced in ``<path>.tmp``; then the previous checkpoint is
    moved to ``<path>.old``, the new one renamed to ``path`` and the old one deleted. A crash at any
    point leaves a complete checkpoint at ``path`` or (between the two renames) ``<path>.old``,
    which :func:`load_checkpoint` falls back to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _siblings(final)
    if not final.exists() and old.exists():  # an earlier save died between its two renames
        os.rename(old, final)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    save_pretrained(unwrap(model), tmp, model_card=False)
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / _OPTIM_NAME), metadata={"iteration": str(int(iteration))})
    files = sorted(f.name for f in tmp.iterdir())
    meta.update(format=CHECKPOINT_FORMAT, iteration=int(iteration),
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                scheduler=_scheduler_state(scheduler),
                files={n: dict(size=(tmp / n).stat().st_size, sha256=file_sha256(tmp / n)) for n in files},
                **(extra or {}))
    (tmp / _STATE_NAME).write_text(json.dumps(meta, indent=1, default=float))
    for n in files + [_STATE_NAME]:
        _fsync(tmp / n)
    _fsync(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def _scheduler_state(scheduler: Optional[Any]) -> Optional[Dict[str, Any]]:
    if scheduler is None:
        return None
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def verify_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """The trainer state of a complete checkpoint folder; a :class:`CheckpointError` (or
    FileNotFoundError) saying what is wrong otherwise. Every file listed in the state must have the
    recorded size and SHA-256, so model, optimizer and state come from one save."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint folder {p} does not exist; resume from <out>/last_checkpoint")
    state_file = p / _STATE_NAME
    if not state_file.exists():
        raise CheckpointError(f"{p} is not a complete training checkpoint (no {_STATE_NAME}); resume from "
                              "<out>/last_checkpoint")
    try:
        meta = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file} is damaged (not valid JSON: {e}); resume from an intact checkpoint "
                              "or start over without --resume") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int) or meta["iteration"] < 0 \
            or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{state_file} is not a semask trainer state (needs an integer 'iteration' and "
                              "the optimizer's 'param_groups'); resume from <out>/last_checkpoint")
    sched = meta.get("scheduler")
    if isinstance(sched, dict) and sched.get("last_epoch", meta["iteration"]) != meta["iteration"]:
        raise CheckpointError(f"{state_file} is inconsistent: scheduler at step {sched.get('last_epoch')}, "
                              f"trainer at iteration {meta['iteration']}; resume from an intact checkpoint")
    files = meta.get("files")
    if files is not None:  # checkpoints of earlier versions have no manifest: their files are checked on load
        for name, rec in files.items():
            f = p / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {p} is incomplete: {name} is missing")
            if f.stat().st_size != rec.get("size") or file_sha256(f) != rec.get("sha256"):
                raise CheckpointError(f"checkpoint {p} is damaged: {name} is not the file saved with {_STATE_NAME} "
                                      f"(size {f.stat().st_size}, expected {rec.get('size')}); resume from an "
                                      "intact checkpoint or start over without --resume")
    return meta


def find_checkpoint(path: os.PathLike) -> Tuple[Path, Dict[str, Any]]:
    """(folder, trainer state) of the complete checkpoint to resume from ``path``: ``path`` itself,
    or the previous checkpoint ``<path>.old`` when a save was interrupted while replacing it."""
    p = Path(path)
    tmp, old = _siblings(p)
    try:
        return p, verify_checkpoint(p)
    except (CheckpointError, FileNotFoundError) as e:
        if old.is_dir():
            try:
                return old, verify_checkpoint(old)
            except (CheckpointError, FileNotFoundError):
                pass
        if not p.exists() and not old.exists() and tmp.exists():
            raise CheckpointError(f"{p} was never completed: the run stopped during its first save, so there is "
                                  "no checkpoint to resume from; start over without --resume") from None
        raise e


def load_checkpoint(path: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Optional[Any] = None, scheduler: Optional[Any] = None) -> Dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (no unpickling) from the complete checkpoint that
    :func:`find_checkpoint` picks; returns the trainer state (``"path"``: the folder used)."""
    from .hub.io import read_model_dir

    p, meta = find_checkpoint(path)
    try:
        _, state = read_model_dir(p)
        unwrap(model).load_state_dict(state)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"the model in checkpoint {p} cannot be restored ({_one_line(e)})") from None
    optim_file = p / _OPTIM_NAME
    try:
        tensors = load_file(str(optim_file))
        with safe_open(str(optim_file), "pt") as f:
            saved_at = (f.metadata() or {}).get("iteration")
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"{optim_file} is truncated or corrupt ({_one_line(e)}); resume from an intact "
                              "checkpoint or start over without --resume") from None
    if saved_at is not None and int(saved_at) != meta["iteration"]:
        raise CheckpointError(f"checkpoint {p} mixes two saves: {_OPTIM_NAME} is from iteration {saved_at}, "
                              f"{_STATE_NAME} from {meta['iteration']}; resume from an intact checkpoint")
    rng = tensors.pop("rng.torch", None)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the optimizer state in {p} does not fit this model's optimizer ({_one_line(e)}): "
                              "resume with the model and options of the run that wrote it") from None
    if rng is not None:
        torch.set_rng_state(rng)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas)))
    return dict(meta, path=str(p))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# ----------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, *, ignore_index: int = 255,
             batch_size: int = 4, progress: bool = False, **predict_kwargs: Any) -> Dict[str, torch.Tensor]:
    """mIoU & co of ``model`` on a dataset of raw samples (``image`` uint8, ``label``). Under DDP
    each rank takes every world_size-th image and the confusion matrices are summed."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    predict_kwargs.setdefault("resize", True)
    metric = SegmentationMetric(num_classes, ignore_index)
    indices = list(range(rank, len(dataset), world))
    bar = _progress(range(0, len(indices), batch_size), progress and rank == 0, "eval", leave=False)
    for j in bar:
        samples = [dataset[i] for i in indices[j:j + batch_size]]
        preds = predict(unwrap(model), [s["image"] for s in samples], batch_size=batch_size, **predict_kwargs)
        for s, pred in zip(samples, preds):
            metric.update(pred, s["label"])
    metric.all_reduce()
    return metric.compute()


def _progress(it: Any, enable: bool, desc: str, **kw: Any) -> Any:
    if not enable:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    iterations: int
    history: List[Dict[str, float]] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0


class Trainer:
    """Train a segmentor on a dataset of transformed samples (``image`` float normalised
    (3, h, w), ``label`` (h, w)), optionally evaluating on a dataset of raw samples.

    >>> trainer = Trainer(model, train_set, TrainConfig(iters=2000, batch_size=8), val_set=val_set,
    ...                   out_dir="runs/camvid")
    >>> trainer.fit()        # progress bar with loss and lr; writes runs/camvid/{config.json,model.safetensors}

    Under ``torchrun`` call :func:`init_distributed` first; the model is moved to the device,
    converted to SyncBatchNorm (GPUs) and wrapped in DistributedDataParallel here.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, config: TrainConfig, val_set: Optional[Dataset] = None,
                 out_dir: Optional[os.PathLike] = None, num_classes: Optional[int] = None,
                 eval_kwargs: Optional[Dict[str, Any]] = None, resume: Optional[os.PathLike] = None,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = config
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.num_classes = num_classes or getattr(model, "num_classes", None)
        if self.num_classes is None:
            raise ValueError("num_classes is unknown: pass Trainer(..., num_classes=K)")
        self.amp_dtype = resolve_autocast(config.amp)
        if config.accum_steps < 1 or config.batch_size < 1 or config.iters < 1:
            raise ValueError("iters, batch_size and accum_steps must all be >= 1")
        torch.manual_seed(config.seed)
        model = model.to(self.device)
        if config.grad_checkpointing:
            backbone = getattr(model, "backbone", model)
            if not hasattr(backbone, "set_grad_checkpointing"):
                raise ValueError(f"{type(backbone).__name__} does not support gradient checkpointing")
            backbone.set_grad_checkpointing(True)
        if self.world > 1:
            if config.sync_bn and self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        self.optimizer = build_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: poly_warmup_factor(it, config))
        fp16_cuda = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16_cuda)
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_kwargs = dict(eval_kwargs or {})
        self.log = log if self.rank == 0 else (lambda s: None)
        self.start_iter = 0
        self.last_metrics: Optional[Dict[str, torch.Tensor]] = None
        self.result = TrainResult(0)
        if resume is not None:
            meta = load_checkpoint(resume, self.model, self.optimizer, self.scaler)
            self.start_iter = int(meta["iteration"])
            if self.start_iter > config.iters:
                raise CheckpointError(f"checkpoint {meta['path']} is at iteration {self.start_iter}, past iters="
                                      f"{config.iters}: resume with at least that many iterations")
            # the schedule is a function of the iteration (also for checkpoints without scheduler state)
            self.scheduler.last_epoch = self.start_iter
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                g["lr"] = base * poly_warmup_factor(self.start_iter, config)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            note = "" if Path(meta["path"]) == Path(resume) else " (the last save was interrupted: its previous checkpoint)"
            self.log(f"resumed from {meta['path']} at iteration {self.start_iter}{note}")

    def _loader(self) -> Iterator[Dict[str, Any]]:
        cfg = self.cfg
        if self.world > 1:
            sampler = DistributedSampler(self.train_set, self.world, self.rank, shuffle=cfg.shuffle, seed=cfg.seed)
        elif cfg.shuffle:
            sampler = RandomSampler(self.train_set, generator=torch.Generator().manual_seed(cfg.seed))
        else:
            sampler = SequentialSampler(self.train_set)
        loader = DataLoader(self.train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate_samples, drop_last=len(self.train_set) >= cfg.batch_size * self.world,
                            persistent_workers=cfg.num_workers > 0, pin_memory=self.device.type == "cuda")
        epoch = 0
        while True:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_step(self, batches: Sequence[Dict[str, Any]]) -> Dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns mean losses."""
        self._set_train_mode()
        sums: Dict[str, float] = {}
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        for k, batch in enumerate(batches):
            images = batch["image"].to(self.device, non_blocking=True).float()
            labels = batch["label"].to(self.device, non_blocking=True).long()
            # gradients are all-reduced only on the last micro-batch
            sync = k == len(batches) - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with amp:
                    losses = self.model(images, labels)
                loss = losses["loss"].float() / len(batches)
                self.scaler.scale(loss).backward()
            for name, v in losses.items():
                if name.startswith("loss"):
                    sums[name] = sums.get(name, 0.0) + float(v.detach()) / len(batches)
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return sums

    def evaluate(self) -> Dict[str, torch.Tensor]:
        kw = dict(batch_size=self.cfg.eval_batch_size, autocast=self.cfg.amp, progress=self.cfg.progress)
        kw.update(self.eval_kwargs)
        return evaluate(self.model, self.val_set, self.num_classes, **kw)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        data = self._loader()
        res = self.result
        bar = _progress(range(self.start_iter, cfg.iters), cfg.progress and self.rank == 0, "train",
                        initial=self.start_iter, total=cfg.iters)
        t0, seen = time.perf_counter(), 0
        for it in bar:
            lr = self.optimizer.param_groups[0]["lr"]
            stats = self.train_step([next(data) for _ in range(cfg.accum_steps)])
            seen += cfg.batch_size * cfg.accum_steps * self.world
            if not all(math.isfinite(v) for v in stats.values()):
                raise FloatingPointError(f"loss became {stats} at iteration {it + 1}; lower the lr or disable fp16")
            res.history.append(dict(iteration=it + 1, lr=lr, **stats))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            done = it + 1
            if self.val_set is not None and cfg.eval_interval and done % cfg.eval_interval == 0 and done < cfg.iters:
                self._eval_and_log(done)
            if self.out_dir is not None and cfg.save_interval and done % cfg.save_interval == 0 and self.rank == 0:
                self._checkpoint(done)
        res.seconds = time.perf_counter() - t0
        res.images_per_s = seen / max(res.seconds, 1e-9)
        res.iterations = cfg.iters
        # save before the final evaluation: an evaluation that fails must not lose the trained model
        if self.out_dir is not None and self.rank == 0:
            if not (cfg.save_interval and cfg.iters % cfg.save_interval == 0 and self.start_iter < cfg.iters):
                self._checkpoint(cfg.iters)
            self._save_model()
            self._write_log()
        if self.val_set is not None:
            try:
                self._eval_and_log(cfg.iters)
            except Exception:
                if self.out_dir is not None:
                    self.log(f"the final evaluation failed; the trained model is saved in {self.out_dir}")
                raise
            if self.out_dir is not None and self.rank == 0:
                self._write_log()
        return res

    def _checkpoint(self, iteration: int) -> None:
        save_checkpoint(self.out_dir / "last_checkpoint", self.model, self.optimizer, iteration, self.scaler,
                        scheduler=self.scheduler)

    def _save_model(self) -> None:
        """The model folder in ``out_dir``: written to a temporary folder, each file then renamed into place."""
        tmp = self.out_dir / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_pretrained(unwrap(self.model), tmp)
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            os.replace(f, self.out_dir / f.name)
        _fsync(self.out_dir)
        tmp.rmdir()

    def _write_log(self) -> None:
        res = self.result
        tmp = self.out_dir / "train_log.json.tmp"
        tmp.write_text(json.dumps(dict(config=self.cfg.to_dict(), history=res.history, evals=res.evals,
                                       images_per_s=res.images_per_s), indent=1, default=float))
        os.replace(tmp, self.out_dir / "train_log.json")

    def _eval_and_log(self, it: int) -> None:
        m = self.last_metrics = self.evaluate()
        row = dict(iteration=it, mIoU=float(m["mIoU"]), aAcc=float(m["aAcc"]), mAcc=float(m["mAcc"]))
        self.result.evals.append(row)
        self.log(f"[iter {it}] val mIoU {100 * row['mIoU']:.2f}  aAcc {100 * row['aAcc']:.2f}")
