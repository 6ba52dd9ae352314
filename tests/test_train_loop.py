"""The per-worker loop on Ray Train (2 CPU workers): DeepSpeed ZeRO-2 bf16 and DDP, LoRA and full
fine-tuning, and a worker killed mid-run resuming from the last checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from trainkit import fit, loop_cfg, write_split

from damoc.runtime import connect


@pytest.fixture(scope="module")
def ray4():
    os.environ.pop("RAY_ADDRESS", None)
    rt = connect(None, num_cpus=4)
    yield rt
    rt.shutdown()


def curve(result):
    df = result.metrics_dataframe
    return df["step"].tolist(), df["eval_loss"].tolist()


@pytest.mark.parametrize("method,deepspeed", [("lora", True), ("full", False)], ids=["lora-zero2-bf16", "full-ddp"])
def test_loop_trains_and_reports(ray4, tmp_path, tiny_model, method, deepspeed):
    data = write_split(tmp_path / "data")
    cfg = loop_cfg(tiny_model("llama", hidden=32, layers=2), data, method=method, precision="bf16" if deepspeed else "fp32",
                   deepspeed={"enabled": deepspeed, "zero_stage": 2})
    result = fit(cfg, data, tmp_path / "store")
    steps, losses = curve(result)
    m = result.metrics
    assert steps == [4, 8, 12] and m["workers"] == 2 and m["restarts"] == 0
    assert losses[-1] < losses[0]  # it learns the QA rows
    if method == "lora":
        assert 0 < m["trainable_params"] < m["forward_params"] / 2
    else:
        assert m["trainable_params"] == m["forward_params"]
    # every micro-batch token on both workers, and FLOPs from them
    assert m["train_tokens"] > 12 * 2 * 4 * 5 and m["train_flops"] == 6 * m["forward_params"] * m["train_tokens"]
    assert {"exact_match", "rouge_l"} <= set(m)  # generation metrics at the last step
    assert result.checkpoint is not None


@pytest.mark.parametrize("method,deepspeed", [("full", True), ("lora", False)], ids=["full-zero2-bf16", "lora-ddp-bf16-autocast"])
def test_loop_other_combinations_run(ray4, tmp_path, tiny_model, method, deepspeed):
    data = write_split(tmp_path / "data", repeat=1)
    cfg = loop_cfg(tiny_model("gpt2", hidden=32, layers=2), data, method=method, max_steps=4, eval_every=2,
                   precision="bf16", deepspeed={"enabled": deepspeed, "zero_stage": 2}, grad_accum=2)
    steps, losses = curve(fit(cfg, data, tmp_path / "store"))
    assert steps == [2, 4] and all(v == v for v in losses)


def kill_a_worker_after_checkpoints(storage, killed: list):
    import psutil

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        # A checkpoint folder appears before Train's controller registers its report: wait for a
        # few, then a little longer, so the kill lands after at least one was registered.
        if len(list(storage.glob("fit/checkpoint_*"))) >= 3:
            time.sleep(2)
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if any("RayTrainWorker" in a for a in p.info["cmdline"] or [])]
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                killed.append((workers[-1].pid, time.time()))
                return
        time.sleep(0.05)


def test_killed_worker_resumes_from_last_checkpoint(ray4, tmp_path, tiny_model):
    data = write_split(tmp_path / "data")
    cfg = loop_cfg(tiny_model("llama", hidden=32, layers=2), data, max_steps=300, eval_every=10, lr=1e-3)
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_checkpoints, args=(tmp_path / "store", killed))
    killer.start()
    result = fit(cfg, data, tmp_path / "store", max_failures=1)
    killer.join()
    assert killed, "no worker was killed"
    m = result.metrics
    assert m["step"] == 300 and m["restarts"] == 1
    assert 10 <= m["start_step"] < 300  # resumed from a checkpoint, not from step 0
    # the run's reports: up to the checkpoint it resumed from, then on from there without a gap
    steps = result.metrics_dataframe["step"].tolist()
    assert steps == sorted(set(steps)) and steps[-1] == 300
