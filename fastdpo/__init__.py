"""fastdpo: offline-reference preference optimisation for LLMs.

Stage 1, `fastdpo precompute`, runs the frozen reference model once and writes token ids and
reference log-probs to Arrow shards. Stage 2, `fastdpo train`, streams those shards and trains
the policy alone. From Python:

    import fastdpo
    fastdpo.precompute(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="pairs.jsonl", output="cache")
    fastdpo.train(model="Qwen/Qwen2.5-0.5B-Instruct", ref_cache="cache", output="runs/dpo", beta=0.1)

Importing fastdpo does not import torch: the modules below load it when a command runs.
"""

__version__ = "0.1.0"

# The commands as functions; their modules are `fastdpo.recipes.*` (so `fastdpo.train` is only the function)
from .recipes.compare import CompareConfig, compare  # noqa: E402
from .recipes.eval import EvalConfig, evaluate  # noqa: E402
from .recipes.precompute import PrecomputeConfig, precompute  # noqa: E402
from .recipes.sft import SFTConfig, sft  # noqa: E402
from .recipes.train import TrainConfig, train  # noqa: E402

__all__ = ["CompareConfig", "EvalConfig", "PrecomputeConfig", "SFTConfig", "TrainConfig", "__version__", "compare",
           "evaluate", "precompute", "sft", "train"]
