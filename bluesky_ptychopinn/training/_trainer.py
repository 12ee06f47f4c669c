"""The training loop: unsupervised physics loss (or the supervised baseline), single process or
DDP under ``torchrun``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from ..errors import InvalidInputError
from ..models import PhysicsDecoder, PtychoPINN, poisson_nll
from ._data import GroupedSamples
from ._progress import TrainingProgress
from ._resume import check_resume, resume_key

__all__ = ["TrainConfig", "TrainResult", "train"]

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Options of :func:`train` (all have working defaults)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: str = Field("adam", pattern="^(adam|adamw)$")
    weight_decay: float = Field(0.0, ge=0)
    schedule: str = Field("cosine", pattern="^(cosine|constant)$")
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float = Field(5.0, ge=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    patience: int = Field(0, ge=0, description="early stopping (0 = off)")
    finetune_epochs: int = Field(0, ge=0, description="extra epochs with the encoder frozen")
    finetune_lr_factor: float = Field(0.5, gt=0)
    loss: str = Field("poisson", pattern="^(poisson|mae|supervised)$")
    overlap: bool = True
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    checkpoint_dir: str | None = None
    log_csv: str | None = None
    tensorboard: bool = False
    progress: bool = True
    log_every_s: float = Field(10.0, ge=0, description="least seconds between two per-batch "
                               "log lines when the output is not a terminal")
    max_batches_per_epoch: int | None = None


@dataclass
class TrainResult:
    model: PtychoPINN
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    patterns_per_s: float = 0.0


def _distributed() -> tuple[bool, int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        return torch.device("cpu")
    return torch.device(name)


def _loss(batch, model, decoder, data: GroupedSamples, config: TrainConfig, device):
    counts, offsets, exp_index, members = batch
    counts = counts.to(device)
    scale = data.input_scales[exp_index].to(device)
    amplitude, phase = model(counts, scale, return_parts=True)
    if config.loss == "supervised":
        truth = torch.stack([data.truth_patches(int(e), m) for e, m in zip(exp_index, members,
                                                                          strict=True)]).to(device)
        phase_error = torch.angle(torch.exp(1j * (phase.float() - truth.angle())))
        return (amplitude.float() - truth.abs()).abs().mean() + phase_error.abs().mean()
    patches = torch.polar(amplitude.float(), phase.float())
    predicted = decoder(
        patches, offsets.to(device), data.probes[exp_index].to(device),
        data.photons[exp_index].to(device),
    )
    mask = data.masks[exp_index].to(device)[:, None]
    if config.loss == "mae":
        valid = mask.expand_as(counts)
        return (predicted - counts).abs()[valid].mean() / counts.mean().clamp_min(1e-8)
    return poisson_nll(predicted, counts, mask.expand_as(counts))


def _lr_factor(epoch: int, config: TrainConfig, total: int) -> float:
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "constant" or total <= 1:
        return 1.0
    progress = (epoch - config.warmup_epochs) / max(total - config.warmup_epochs, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


BEST_WEIGHTS = "best.safetensors"


def _replace_atomically(target: Path, write) -> None:
    """``write(tmp)`` a sibling temporary file, then rename it onto ``target``: a crash
    leaves the previous file, never half of one."""
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)


def _cpu_tensors(state: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for k, v in state.items()}


def _save_state(path: Path, model, optimizer, epoch: int, history, best_val,
                best_state: dict | None = None, key: dict | None = None) -> None:
    """Resumable state in safetensors (tensors) + JSON (scalars): no pickle.

    ``epoch`` is the next epoch to run. The best validation weights go to their own file so
    that a resumed run can still return them; every file is replaced atomically, the JSON
    last, so a crash leaves the previous JSON.
    """
    path.mkdir(parents=True, exist_ok=True)
    if best_state is not None:
        best = _cpu_tensors(best_state)
        _replace_atomically(path / BEST_WEIGHTS, lambda tmp: save_file(best, str(tmp)))
    tensors = _cpu_tensors(model.state_dict(), "model.")
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        tensors.update(_cpu_tensors(state, f"optim.{pid}."))
    _replace_atomically(path / "trainer_state.safetensors",
                        lambda tmp: save_file(tensors, str(tmp)))
    meta = {"epoch": epoch, "history": history, "best_val": best_val,
            "param_groups": opt["param_groups"], "resume_key": key}
    _replace_atomically(path / "trainer_state.json",
                        lambda tmp: tmp.write_text(json.dumps(meta, default=float)))


def _load_state(path: Path, model, optimizer,
                training_key: dict) -> tuple[int, list, float, dict | None]:
    meta = json.loads((path / "trainer_state.json").read_text())
    # Before any weight is loaded: another network would fail in load_state_dict with a
    # torch error, other data would resume silently.
    check_resume(meta.get("resume_key"), training_key, path)
    tensors = load_file(str(path / "trainer_state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    best = path / BEST_WEIGHTS
    best_state = load_file(str(best)) if best.is_file() else None
    if best_state is None and math.isfinite(float(meta["best_val"])):
        logger.warning("%s: no %s (saved by an older version); a resumed run returns its "
                       "own best or last weights", path, BEST_WEIGHTS)
    return int(meta["epoch"]), list(meta["history"]), float(meta["best_val"]), best_state


def train(
    model: PtychoPINN, data: GroupedSamples, config: TrainConfig | None = None
) -> TrainResult:
    """Train ``model`` on grouped samples.

    Parameters
    ----------
    model : PtychoPINN
        The network (its ``channels`` must match the data's).
    data : GroupedSamples
        Groups from one or more experiments, each routed to its own probe.
    config : TrainConfig, optional
        Optimiser, schedule, early stopping, fine-tuning, checkpoints, logging.

    Returns
    -------
    TrainResult
        The trained model (best validation weights when a validation split exists), the
        per-epoch history (loss, val loss, patterns/s, lr) and throughput.

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel and
    each rank trains on its shard; all ranks end with identical weights. Training is
    deterministic for a given seed on one device.
    """
    config = config or TrainConfig()
    if model.config.channels != data.channels:
        raise InvalidInputError(
            f"model has C={model.config.channels} channels, data groups have C={data.channels}"
        )
    if model.config.frame_size != data.frame_size:
        raise InvalidInputError(
            f"model frame size {model.config.frame_size} != data frame size {data.frame_size}"
        )
    distributed, rank, world = _distributed()
    device = _device(config.device, rank)
    torch.manual_seed(config.seed)
    model = model.to(device)
    decoder = PhysicsDecoder(overlap=config.overlap and data.channels > 1)

    generator = torch.Generator().manual_seed(config.seed)
    n_val = int(round(len(data) * config.val_fraction)) if len(data) > 20 else 0
    order = torch.randperm(len(data), generator=generator)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_set = torch.utils.data.Subset(data, train_idx.tolist())
    val_set = torch.utils.data.Subset(data, val_idx.tolist())

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    lr = config.lr * math.sqrt(world)  # the paper scales lr by sqrt(number of GPUs)
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=lr, weight_decay=config.weight_decay)

    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start_epoch, history, best_val = 0, [], math.inf
    best_state = None
    training_key = resume_key(model, data, config) if ckpt is not None else None
    if ckpt is not None and (ckpt / "trainer_state.json").is_file():
        start_epoch, history, best_val, best_state = _load_state(ckpt, model, optimizer,
                                                                    training_key)
        logger.info("resumed from %s at epoch %d", ckpt, start_epoch)

    total_epochs = config.epochs + config.finetune_epochs
    use_bf16 = config.bf16 and device.type == "cuda"
    writer = _tensorboard(config) if rank == 0 else None
    def loader_for(epoch: int):
        sampler = (
            torch.utils.data.distributed.DistributedSampler(
                train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
            )
            if distributed
            else None
        )
        if sampler is not None:
            sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=sampler is None,
            sampler=sampler, generator=torch.Generator().manual_seed(config.seed + epoch),
            drop_last=len(train_set) > config.batch_size,
        )

    per_epoch = len(loader_for(start_epoch))
    if config.max_batches_per_epoch:
        per_epoch = min(per_epoch, config.max_batches_per_epoch)
    progress = TrainingProgress(config.progress and rank == 0, total_epochs * per_epoch,
                                start_epoch * per_epoch, log_every_s=config.log_every_s)
    patterns, busy = 0, 0.0
    bad_epochs = 0
    with progress:
        epoch = start_epoch
        while epoch < total_epochs:
            finetune = epoch >= config.epochs
            for p in model.encoder.parameters():
                p.requires_grad_(not finetune)
            factor = _lr_factor(epoch, config, config.epochs) if not finetune else (
                config.finetune_lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            loader = loader_for(epoch)
            net.train()
            t0 = time.perf_counter()
            running, n_batches = 0.0, 0
            t_batch = t0
            for b, batch in enumerate(loader):
                if config.max_batches_per_epoch and b >= config.max_batches_per_epoch:
                    break
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = _loss(batch, net, decoder, data, config, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                running += float(loss.detach())
                n_batches += 1
                in_batch = batch[0].shape[0] * batch[0].shape[1]
                patterns += in_batch
                now = time.perf_counter()
                progress.batch(epoch + 1, b + 1, per_epoch, loss=float(loss.detach()),
                               seconds=now - t_batch, patterns=in_batch)
                t_batch = now
            elapsed = time.perf_counter() - t0
            busy += elapsed
            val = _evaluate(net, decoder, data, val_set, config, device) if n_val else math.nan
            record = {
                "epoch": epoch + 1, "loss": running / max(n_batches, 1), "val_loss": val,
                "lr": lr * factor, "finetune": finetune, "seconds": elapsed,
                "patterns_per_s": patterns / busy if busy else 0.0,
            }
            history.append(record)
            if writer is not None:
                for key in ("loss", "val_loss", "lr", "patterns_per_s"):
                    writer.add_scalar(key, record[key], epoch + 1)
            _append_csv(config.log_csv, record, rank)
            status = (f"loss {record['loss']:.4f} val {val:.4f} "
                      f"{record['patterns_per_s']:.0f} patt/s")
            progress.epoch(epoch + 1, total_epochs, status)
            monitored = val if n_val else record["loss"]
            improved = monitored < best_val
            if improved:
                best_val, bad_epochs = monitored, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            next_epoch = epoch + 1
            if config.patience and bad_epochs >= config.patience and not finetune:
                # Early stopping ends the main phase only: fine-tuning (if any) still runs, from
                # the best weights. The checkpoint records the jump, so a resume does not train
                # the skipped main epochs.
                logger.info("early stopping at epoch %d", epoch + 1)
                next_epoch = config.epochs
                if config.finetune_epochs and best_state is not None and n_val:
                    model.load_state_dict(best_state)
            if ckpt is not None and rank == 0:
                # The best weights are written only when they change (a file per improvement).
                _save_state(ckpt, model, optimizer, next_epoch, history, best_val,
                            best_state if improved else None, training_key)
            epoch = next_epoch
    if best_state is not None and n_val:
        model.load_state_dict(best_state)
    if writer is not None:
        writer.close()
    for p in model.parameters():
        p.requires_grad_(True)
    return TrainResult(model=model.eval(), history=history, best_val=best_val,
                       patterns_per_s=patterns / busy if busy else 0.0)


@torch.no_grad()
def _evaluate(net, decoder, data, subset, config, device) -> float:
    net.eval()
    loader = torch.utils.data.DataLoader(subset, batch_size=max(config.batch_size, 64))
    total, count = 0.0, 0
    for batch in loader:
        total += float(_loss(batch, net, decoder, data, config, device)) * batch[0].shape[0]
        count += batch[0].shape[0]
    return total / max(count, 1)


def _append_csv(path: str | None, record: dict, rank: int) -> None:
    if not path or rank != 0:
        return
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def _tensorboard(config: TrainConfig):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        logger.warning("tensorboard is not installed; metrics go to the CSV only")
        return None
    return SummaryWriter(log_dir=str(Path(config.log_csv or "runs").with_suffix("")) + "_tb")


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (used by the CLI and tests)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global seed for third-party code
