"""The machinery that python -m gptkernels train and finetune share, one job per file: args (options, defaults,
resolution), dist (ranks, DDP), checkpoint (finding, reading, atomic writing), schedule (LR), peak (the peak FLOP/s
of MFU), output (printing, log.jsonl, loss plot) and loop (the training loop itself)."""
