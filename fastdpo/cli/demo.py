"""`fastdpo demo`."""

from dataclasses import dataclass

from ..config import check_fields, opt

CONFIG_FILE = False  # no --config: the demo takes no options beyond where to write

DESCRIPTION = """Run the whole pipeline on the bundled task with a tiny model built locally: build -> sft ->
precompute -> train (DPO) -> eval, then print a before/after table and write OUTPUT/demo_report.json and
PNG plots. Nothing is downloaded; a few minutes on a 2-core CPU."""

EXAMPLES = """examples:
  fastdpo demo
  fastdpo demo --output /tmp/fastdpo-demo
"""


@dataclass
class CONFIG:
    output: str = opt("fastdpo-demo", "directory for everything the demo writes")
    reduced: bool = opt(False, "fewer steps and eval rows (for smoke tests)")
    progress: bool = opt(True, "show progress bars")
    overwrite: bool = opt(False, "write into a non-empty --output that is not a demo's (its files are replaced)")

    def __post_init__(self):
        check_fields(self)


def run(config):
    from ..demo import demo

    demo(config.output, reduced=config.reduced, progress=config.progress, overwrite=config.overwrite)
    return 0
