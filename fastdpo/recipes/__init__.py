"""The commands' recipes, one module each: `precompute`, `train`, `sft`, `eval`, `compare`.

Each holds its command's config dataclass and the function that runs it (`fastdpo.train(...)` is
`fastdpo.recipes.train.train`); the CLI (`fastdpo.cli`) only parses flags into the config.
"""
