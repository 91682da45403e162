"""TRL's DPOTrainer as a benchmark run (a job of train_runs.py's workers), its settings matched to fastdpo's."""

from __future__ import annotations

import time

import torch


def worker_trl(job: dict) -> dict:
    """TRL's DPOTrainer with settings matched to fastdpo's; per step: end time (step end to step end: data,
    forward, backward, optimizer and logging, as fastdpo's elapsed_s) and the tokens its pairs hold."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fastdpo import data as fdata

    steps = {"ends": [], "tokens": [], "precompute_s": 0.0, "step_tokens": 0}

    def now():
        if job["device"].startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):  # runs inside __init__
            t0 = now()
            out = super()._precompute_ref_logps(*args, **kwargs)
            steps["precompute_s"] += now() - t0
            return out

        def training_step(self, model, inputs, *args, **kwargs):  # one micro-batch: chosen rows, then rejected
            steps["step_tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = now()

        def on_step_end(self, args, state, control, **kwargs):
            steps["ends"].append(now() - self.start)
            steps["tokens"].append(steps["step_tokens"])
            steps["step_tokens"] = 0

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}[job["dtype"]]
    ds = fdata.load_source(fdata.DataOptions(dataset=job["dataset"], max_prompt_length=None))
    ds = ds.select(range(min(job["n_pairs"], len(ds)))).select_columns(["prompt", "chosen", "rejected"])
    config = DPOConfig(
        output_dir=job["output"],
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"],
        max_steps=job["steps"],
        learning_rate=job["lr"],
        beta=job["beta"],
        loss_type=["sigmoid"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=job["seed"],
        bf16=job["dtype"] != "fp32",
        fp16=False,
        gradient_checkpointing=job["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=job["max_length"],
        truncation_mode="keep_start",
        padding_free=False,
        precompute_ref_log_probs=job["precompute"],
        precompute_ref_batch_size=job["precompute_batch_size"],
        model_init_kwargs={"dtype": dtype},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        use_cpu=not job["device"].startswith("cuda"),
    )
    trainer = TimedDPOTrainer(model=job["model"], args=config, train_dataset=ds, callbacks=[StepTimer()])
    trainer.train()
    return {
        "status": "ok",
        "step_end_s": steps["ends"],
        "step_tokens": steps["tokens"],
        "precompute_s": steps["precompute_s"] or None,
    }
