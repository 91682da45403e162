"""fastdpo: offline-reference preference optimisation for LLMs.

Stage 1, `fastdpo precompute`, runs the frozen reference model once and writes token ids and
reference log-probs to Arrow shards. Stage 2, `fastdpo train`, streams those shards and trains
the policy alone.
"""

__version__ = "0.1.0"
