"""`fastdpo demo`."""

CONFIG_FILE = False  # no --config: the demo takes no options beyond where to write

DESCRIPTION = """Run the whole pipeline on the bundled task with a tiny model built locally: build -> sft ->
precompute -> train (DPO) -> eval, then print a before/after table and write OUTPUT/demo_report.json and
PNG plots. Nothing is downloaded; a few minutes on a 2-core CPU."""

EXAMPLES = """examples:
  fastdpo demo
  fastdpo demo --output /tmp/fastdpo-demo
"""


def add_arguments(parser):
    parser.add_argument("--output", default="fastdpo-demo", help="directory for everything the demo writes "
                                                                  "(default: fastdpo-demo)")
    parser.add_argument("--reduced", action="store_true", help="fewer steps and eval rows (for smoke tests)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args):
    from ..demo import demo

    demo(args.output, reduced=args.reduced, progress=args.progress)
    return 0
