"""The finetune stage: per-worker loop (Ray Train + DeepSpeed or DDP), Tune driver with ASHA, metrics."""
