"""Training on Ray Train: the pieces the jobs in ``train_jobs/`` are assembled from.

``config`` (what a run is), ``data`` (records to tokenized prompt/completion pairs),
``methods`` (full, LoRA, QLoRA, prompt tuning), ``distributed`` (FSDP/DDP sharding and
the worker's view of the group), ``loop`` (the step loop with checkpoints), ``evaluate``
(held-out loss and accuracy), ``outputs`` (metrics.jsonl, summary.json, publishing,
registration with a server) and ``launch`` (running a loop on Ray Train).
"""
