"""The commands' recipes, one module each: `precompute`, `train`, `sft`, `eval`, `compare`.

Each holds its command's config, one flat dataclass with every option written out (default, help, `--help`
group; validated in its `__post_init__`), and the function that runs it (`fastdpo.train(...)` is
`fastdpo.recipes.train.train`); the CLI (`fastdpo.cli`) only parses flags into the config.
"""
