"""The two ways a worker steps its model: DeepSpeed (ZeRO 0-3) or plain DDP.

Both expose the same small surface to the loop: `loss(batch)`, `backward(loss)`,
`step()` (called after every micro-batch; the optimizer moves on accumulation
boundaries), `module` (the unwrapped model for evaluation and generation), `lr`,
and `save(dir)` / `load(dir)` for checkpoints that resume the optimizer and schedule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from damoc.compat import import_muon_uncompiled, skip_shm_comm_build
from damoc.lm.nll import causal_lm_loss
from damoc.train.args import TrainArgs

STATE_FILE = "state.json"


def resolve_precision(precision: str, deepspeed: bool, cuda: bool) -> torch.dtype:
    """auto: bf16 (fp16 where bf16 is missing) on GPU; fp32 on CPU, where bf16 matmuls without AMX are
    slower (bench/train_overhead.py: 4,555 fp32 vs 3,655 bf16 tokens/s, plain loop, 2 cores).
    fp16 is refused on CPU (DeepSpeed: "not supported on your device")."""
    if precision == "fp16" and not cuda:
        raise ValueError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16")
    if precision == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def deepspeed_config(micro_batch: int, grad_accum: int, zero_stage: int, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # progress is the loop's job
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, model, optimizer, scheduler, cfg: dict[str, Any]):
        import deepspeed

        skip_shm_comm_build()
        import_muon_uncompiled()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
        self.zero_stage = cfg["zero_optimization"]["stage"]

    @property
    def module(self):
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def loss(self, batch):
        # ZeRO-3 gathers the head's weights in the engine's own forward: there the full logits are kept.
        return causal_lm_loss(self.engine, batch, scored_only=self.zero_stage != 3)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: Path, rank: int, client: dict[str, Any]) -> bool:
        # Every rank writes its ZeRO partition; Ray Train merges the ranks' folders into one checkpoint.
        self.engine.save_checkpoint(str(path), tag="ds", client_state={}, exclude_frozen_parameters=True)
        if rank == 0:
            (path / STATE_FILE).write_text(json.dumps(client))
        return True

    def load(self, path: Path) -> dict[str, Any]:
        self.engine.load_checkpoint(str(path), tag="ds", load_module_strict=False)
        return json.loads((path / STATE_FILE).read_text())


class DDPEngine:
    def __init__(self, model, optimizer, scheduler, grad_accum: int, dtype: torch.dtype, device, local: bool):
        self.raw = model
        if local:  # one process, nothing to synchronise
            self.model = model.to(device)
        else:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(model)  # DDP when world size > 1
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum, self.dtype, self._device = grad_accum, dtype, device
        self._micro = 0
        self.zero_stage = None

    @property
    def module(self):
        return self.raw

    @property
    def device(self) -> torch.device:
        return self._device

    def loss(self, batch):
        if self.dtype == torch.float32:
            return causal_lm_loss(self.model, batch)
        with torch.autocast(device_type=self._device.type, dtype=self.dtype):
            return causal_lm_loss(self.model, batch)

    def backward(self, loss) -> None:
        self._micro += 1
        last = self._micro % self.grad_accum == 0
        if not last and hasattr(self.model, "no_sync"):
            with self.model.no_sync():  # all-reduce once per optimizer step
                (loss / self.grad_accum).backward()
        else:
            (loss / self.grad_accum).backward()

    def step(self) -> None:
        if self._micro % self.grad_accum:
            return
        params = [p for p in self.raw.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, path: Path, rank: int, client: dict[str, Any]) -> bool:
        if rank != 0:  # replicas are identical; rank 0 writes the whole state
            return False
        from safetensors.torch import save_file

        trainable = {n: p.detach().cpu().contiguous() for n, p in self.raw.named_parameters() if p.requires_grad}
        save_file(trainable, str(path / "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   path / "optimizer.pt")
        (path / STATE_FILE).write_text(json.dumps(client))
        return True

    def load(self, path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(weights) - {n for n, _ in self.raw.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {path} does not fit this model: {sorted(missing)[:3]}")
        self.raw.load_state_dict(weights, strict=False)
        # Our own file, written by this loop: optimizer moments are not weights.
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        return json.loads((path / STATE_FILE).read_text())


def build_engine(model, args: TrainArgs, dtype: torch.dtype, device):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    if args.deepspeed:
        os.environ.setdefault("LOCAL_RANK", "0")
        cfg = deepspeed_config(args.batch_size, args.grad_accum, args.zero_stage, dtype)
        return DeepSpeedEngine(model, optimizer, scheduler, cfg)
    return DDPEngine(model, optimizer, scheduler, args.grad_accum, dtype, device, args.local)
