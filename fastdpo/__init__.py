"""fastdpo: offline-reference preference optimisation for LLMs.

Stage 1, `fastdpo precompute`, runs the frozen reference model once and writes token ids and
reference log-probs to Arrow shards. Stage 2, `fastdpo train`, streams those shards and trains
the policy alone. From Python:

    import fastdpo
    fastdpo.precompute(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="pairs.jsonl", output="cache")
    fastdpo.train(model="Qwen/Qwen2.5-0.5B-Instruct", ref_cache="cache", output="runs/dpo", beta=0.1)
"""

__version__ = "0.1.0"

_API = {
    "precompute": ("precompute", "precompute"), "PrecomputeConfig": ("precompute", "PrecomputeConfig"),
    "train": ("train", "train"), "TrainConfig": ("train", "TrainConfig"),
    "sft": ("sft", "sft"), "SFTConfig": ("sft", "SFTConfig"),
    "evaluate": ("eval", "evaluate"), "EvalConfig": ("eval", "EvalConfig"),
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):  # lazy, so `import fastdpo` does not import torch
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")
