"""`fastdpo sft`: supervised fine-tuning, the stage before preference optimisation.

    fastdpo sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --output runs/sft --lr 2e-5
    fastdpo sft --model ./base --dataset pairs.jsonl --output runs/sft     # the chosen answers of a preference set
    fastdpo sft --model /tmp/tiny --dataset sft.jsonl --output /tmp/sft --max-steps 20   # tiny CPU run

Data: a preference set (trains on `chosen`), `prompt`/`completion` columns, a `messages`
conversation (trains on the last, assistant message) or a `text` column (plain language
modelling). The loss is the token-mean negative log-likelihood of the completions over each
optimizer step. The recipe is `train`'s with an `SFTObjective`: same loop, checkpoints, metrics and
scoring path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import batching, data, loop, modeling, optim, quant
from ..config import check_fields, make, opt


@dataclass
class SFTConfig:
    """`fastdpo sft`: supervised fine-tuning on completions. Every option of the command is declared here, with its
    default and help; the flags are generated from these fields. The model, run and data fields are copies of
    train's (tests/test_config.py keeps the copies equal, but for sft's own --lr default); their order is the
    saved config's."""

    GROUP_TITLES = {"lora": "LoRA (pip install 'fastdpo[peft]')"}

    # -- model --
    model: str | None = opt(None, "model: a local directory or a Hugging Face Hub id", required=True, group="model")
    revision: str | None = opt(None, "model revision (branch, tag or commit) on the Hub", group="model")
    dtype: str = opt("auto", "float32; bfloat16 weights; float16 (scoring only); bf16-mixed (fp32 weights, bf16 "
                     "autocast; training only); auto: on GPU bf16-mixed to train, bfloat16 to score; float32 on CPU",
                     choices=["auto", "float32", "bfloat16", "float16", "bf16-mixed"], group="model")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub (off: never runs remote code)",
                                  group="model")
    attn_implementation: str | None = opt(None, "transformers attention implementation (e.g. sdpa, eager, "
                                                "flex_attention; default: flex_attention on CUDA where packing "
                                                "or prefix sharing may be used, else transformers' choice)",
                                          group="model")
    logps_backend: str = opt("auto", "log-prob backend: auto (triton on CUDA, torch elsewhere), triton, torch, or "
                             "eager (full logits, the classic way)", choices=modeling.LOGPS_BACKENDS, group="model")

    # -- quantization --
    load_in_4bit: bool = opt(False, "quantize the base model's linear layers to 4 bits at load (bitsandbytes; QLoRA "
                                    "with --lora-r); embeddings, norms and LM head stay in --dtype",
                             group="quantization")
    load_in_8bit: bool = opt(False, "quantize the base model's linear layers to 8 bits at load (bitsandbytes "
                                    "LLM.int8; with --lora-r to train)", group="quantization")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 (normal float, the QLoRA paper's) or fp4",
                                   choices=["nf4", "fp4"], group="quantization")
    bnb_4bit_double_quant: bool = opt(False, "quantize the 4-bit blocks' scales too (about 0.4 bits/param less)",
                                      group="quantization")
    bnb_4bit_compute_dtype: str = opt("bfloat16", "dtype 4-bit layers dequantize to and multiply in",
                                      choices=quant.COMPUTE_DTYPES, group="quantization")

    # -- options --
    output: str | None = opt(None, "run directory: metrics.jsonl, checkpoints, final model", required=True)
    gpu_memory: str | None = opt(None, "memory budget, e.g. 16GiB, 24GB, 80 (GiB): before any weights load, refuse a "
                                 "run whose estimated peak (fastdpo plan; on CPU, peak RSS) exceeds it by over 10%")
    ignore_memory_estimate: bool = opt(False, "train even when the estimate exceeds --gpu-memory (a warning)")

    # -- optimisation --
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory", group="optimisation")
    activation_offload: bool = opt(False, "saved activations wait in (pinned) CPU memory between forward and "
                                          "backward (fastdpo.offload; with --gradient-checkpointing only the "
                                          "layers' inputs)", group="optimisation")
    optimizer: str = opt("adamw", "optimizer (bytes per trained parameter: README, Precision)",
                         choices=list(optim.OPTIMIZERS), group="optimisation")
    # sft's own default (train's is 1e-6)
    lr: float = opt(2e-5, "peak learning rate", gt=0, group="optimisation")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)", ge=0, group="optimisation")
    momentum: float = opt(0.0, "SGD momentum", ge=0, lt=1, group="optimisation")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", choices=["constant", "linear", "cosine"],
                            group="optimisation")
    warmup_steps: int = opt(0, "linear warm-up steps", ge=0, group="optimisation")
    warmup_ratio: float = opt(0.0, "warm-up as a fraction of all steps (used when --warmup-steps is 0)", ge=0, lt=1,
                              group="optimisation")
    batch_size: int = opt(4, "examples per micro-batch per process (pairs for preference losses)", ge=1,
                          group="optimisation")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x processes x accum)", ge=1,
                          group="optimisation")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables clipping)", ge=0, group="optimisation")
    epochs: int = opt(1, "passes over the data", ge=1, group="optimisation")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)", ge=1,
                                group="optimisation")
    seed: int = opt(42, "seed for data order and initialisation", ge=0, le=2**32 - 1, group="optimisation")
    shuffle: bool = opt(True, "shuffle shards and rows each epoch (deterministic from --seed and the epoch)",
                        group="optimisation")
    group_by_length: bool = opt(True, "batch examples of similar length together to cut padding",
                                group="optimisation")
    disable_dropout: bool = opt(True, "turn dropout off in the policy, as TRL does", group="optimisation")
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient", ge=1,
                             group="optimisation")

    # -- logging and checkpoints --
    log_every: int = opt(10, "print a metrics line every N steps (metrics.jsonl gets every step)", ge=1,
                         group="logging and checkpoints")
    report_to: str = opt("none", "experiment tracker, through accelerate", choices=["none", "tensorboard", "wandb"],
                         group="logging and checkpoints")
    save_steps: int | None = opt(None, "write OUT/checkpoint-STEP every N steps", ge=1, group="logging and checkpoints")
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints", ge=1,
                                       group="logging and checkpoints")
    resume: str | None = opt(None, "continue from OUT/checkpoint-STEP, or 'latest' for the newest complete one",
                             group="logging and checkpoints")
    allow_changes: bool = opt(False, "with --resume: train on with options that differ from the checkpoint's (loss, "
                                     "beta, lr, schedule, ...; README: Reliability), from the next step; "
                                     "metrics.jsonl records the change", group="logging and checkpoints")
    progress: bool = opt(True, "show a progress bar with ETA", group="logging and checkpoints")
    overwrite: bool = opt(False, "start over in an --output that holds a run (its checkpoints, logs and model are "
                                 "removed)", group="logging and checkpoints")

    # -- distributed --
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over processes with PyTorch FSDP2 "
                            "(fully_shard per decoder layer)", group="distributed")
    fsdp_lm_head: str = opt("own", "the LM head as its own FSDP unit (gathered only around the head) or in the root "
                                   "unit", choices=["own", "root"], group="distributed")
    fsdp_reshard_after_forward: bool = opt(True, "free each unit's gathered weights after its forward and gather "
                                                 "again for backward (less memory, more communication)",
                                           group="distributed")
    fsdp_cpu_offload: bool = opt(False, "keep weights, gradients and optimizer state in CPU memory (GPU only; the "
                                        "optimizer step runs on CPU)", group="distributed")

    # -- lora --
    lora_r: int | None = opt(None, "LoRA rank; enables LoRA through peft", ge=1, group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha", gt=0, group="lora")
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1, group="lora")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear", group="lora")
    merge_lora: bool = opt(False, "save the merged model instead of the adapter", group="lora")

    # -- data --
    dataset: str | None = opt(None, "Hub dataset id, a .jsonl/.json/.parquet/.csv/.arrow file, or a directory of them",
                              required=True, group="data")
    dataset_config: str | None = opt(None, "Hub dataset configuration name", group="data")
    split: str = opt("train", "dataset split to read", group="data")
    prompt_column: str = opt("prompt", "column holding the prompt (absent: extracted from chosen/rejected)",
                             group="data")
    chosen_column: str = opt("chosen", "column holding the preferred completion", group="data")
    rejected_column: str = opt("rejected", "column holding the dispreferred completion", group="data")
    max_prompt_length: int | None = opt(512, "cap on prompt tokens (none: no cap)", ge=1, group="data")
    max_length: int | None = opt(1024, "cap on prompt+completion tokens; the completion is cut (none: no cap)", ge=2,
                                 group="data")
    truncation: str = opt("keep_end", "which end of a long prompt to keep", choices=["keep_end", "keep_start"],
                          group="data")
    chat_bos: str = opt("template", "conversational rows: 'template' keeps the BOS the chat template renders (as "
                        "apply_chat_template(tokenize=True) does); 'tokenizer' also adds the tokenizer's BOS where "
                        "the template renders none", choices=["template", "tokenizer"], group="data")
    assistant_marker: str = opt("\n\nAssistant:", "implicit-prompt string data: the prompt ends after the last one",
                                group="data")
    limit: int | None = opt(None, "process only the first N rows of the split", ge=1, group="data")
    strict: bool = opt(False, "stop at the first row that would be skipped, naming it", group="data")
    completion_column: str = opt("completion", "column holding the target completion (prompt/completion data)",
                                 group="data")
    messages_column: str = opt("messages", "column holding a conversation whose last message is the target",
                               group="data")
    text_column: str = opt("text", "column holding plain text (language modelling on all of it)", group="data")


    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        loop.check_run_options(self)


class SFTObjective(loop.Objective):
    """Token-mean negative log-likelihood of the completion tokens of the whole step."""

    def __init__(self, setup, device):
        self.setup, self.device = setup, device

    def step(self, model, batch: batching.Batch):
        from ..scoring import score_pairs

        rows = batch.rows
        scores = score_pairs(model, rows["prompt_ids"], rows["chosen_ids"], None, self.setup.layout,
                             self.setup.tokenizer.pad_token_id, self.device, self.setup.dtype)
        logps = scores.chosen.sum(-1)  # (N,) summed over each completion
        sums = {"nll": -logps.detach().sum(), "logps": logps.detach().sum(),
                "completion_tokens": scores.chosen_mask.sum(), "tokens": scores.num_tokens}
        return -logps.sum() / batch.step_chosen_tokens, sums

    def finish(self, sums: dict[str, float]) -> dict:
        tokens = sums["completion_tokens"]
        return {"loss": sums["nll"] / max(tokens, 1.0), "logps/chosen": sums["logps"] / max(sums["examples"], 1.0),
                "num_completion_tokens": tokens}


def sft(config: SFTConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo sft`; `fastdpo.sft(model=..., dataset=..., output=...)` works like the CLI."""
    cfg = make(SFTConfig, config, **kwargs)
    trainer = loop.Trainer(cfg, "sft")
    tokenized = data.tokenize_sft_dataset(data.load_source(cfg), trainer.tokenizer, cfg, cfg.completion_column,
                                          cfg.messages_column, cfg.text_column)
    source = batching.DatasetSource(data.keep_rows(tokenized, cfg, trainer.is_main))
    trainer.check_memory(source)  # before any weights load
    trainer.load_policy()
    return trainer.fit(source, SFTObjective(trainer.setup, trainer.device))
