"""Helpers for the finetune tests: a train/eval split on disk and one Ray Train fit of the loop."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import QA_ROWS, spec_dict

from damoc.spec import spec_from_data
from damoc.train.args import train_args


def write_split(folder: Path, repeat: int = 4) -> Path:
    """train.parquet (QA_ROWS x repeat) and eval.parquet (every third row) in the data stage's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": str(i), "source": "t", **r} for i, r in enumerate(QA_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows * repeat), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[::3]), folder / "eval.parquet")
    return folder


def loop_cfg(model: Path, data: Path, rungs=(), barrier=None, **finetune) -> dict:
    spec = spec_from_data(spec_dict(**{"finetune": {"num_workers": 2, "batch_size": 4, "max_steps": 12,
                                                    "eval_every": 4, "lr": 1e-2, **finetune},
                                       "tune": {"grace_period": 2}}), check_files=False)
    return {"args": train_args(spec, "c", str(model), str(data / "train.parquet"), str(data / "eval.parquet"),
                               list(rungs), barrier, False, spec.finetune.max_steps)}


def fit(cfg: dict, data: Path, storage: Path, workers: int = 2, max_failures: int = 0):
    import ray.train
    from ray.train.torch import TorchTrainer

    from damoc.train.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(name="fit", storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    return trainer.fit()


def hopeless_copy(src, dst):
    """A copy of a tiny model whose final norm is zero: its logits are 0 whatever LoRA learns (norms are not
    LoRA targets), so it stays at the uniform distribution, clearly worse than candidates that learn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst
