"""`fastdpo` command line: one small module per subcommand.

    fastdpo demo                                              # start here: the bundled task, end to end
    fastdpo precompute --model M --dataset D --output CACHE
    fastdpo train --model M --ref-cache CACHE --output OUT

Each subcommand module names its config dataclass (`CONFIG`), whose fields become its flags
(`fastdpo.config`), and a `run(config)`. A user mistake prints one line and exits 2; a traceback
means a bug in fastdpo.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import warnings

from ..errors import TrainingStopped, UserError

SUBCOMMANDS = {
    "precompute": "run the reference model once; write token ids and reference log-probs to Arrow shards",
    "train": "train the policy from a reference cache (or with a live reference)",
    "sft": "supervised fine-tuning (the stage before preference optimisation)",
    "eval": "reward accuracy, margins, KL estimate and judged generations on a held-out cache",
    "compare": "win rate of one model's answers over another's (e.g. DPO vs SFT), judged in both orders",
    "plot": "PNG curves of one or several runs (loss, rewards, margin, accuracy, log-probs)",
    "plan": "estimate a training run's peak memory from the model's config alone, and what fits a budget",
    "cache": "inspect a reference cache (info) or check it against its files and its reference model (verify)",
    "demo": "the whole pipeline on a bundled task, nothing to download: DPO visibly improving a tiny model",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="fastdpo", description="Offline-reference preference optimisation for LLMs.",
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f".{name}", __name__)
        p = sub.add_parser(name, help=help_text, description=module.DESCRIPTION, epilog=module.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        commands = getattr(module, "COMMANDS", None)  # `fastdpo cache info|verify`: one more level
        if commands is None:
            _add_command(p, module)
            continue
        nested = p.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=Parser, required=True)
        for sub_name, sub_module in commands.items():
            _add_command(nested.add_parser(sub_name, help=sub_module.HELP, description=sub_module.DESCRIPTION,
                                           epilog=sub_module.EXAMPLES,
                                           formatter_class=argparse.RawDescriptionHelpFormatter), sub_module)
    return parser


def _add_command(p: argparse.ArgumentParser, module) -> None:
    from ..config import add_arguments

    add_arguments(p, module.CONFIG)
    if getattr(module, "CONFIG_FILE", True):
        p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags given override it")
    p.set_defaults(func=module.run, config_class=module.CONFIG)


def main(argv: list[str] | None = None) -> int:
    from ..config import from_args

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module in ("torch", "transformers", "accelerate", "datasets", "peft"):
        # deprecation notices about the libraries' own internals: nothing a fastdpo user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    run, config_class = args.func, args.config_class
    del args.func, args.config_class
    if hasattr(args, "subcommand"):
        args.command = f"{args.command} {args.subcommand}"
        del args.subcommand
    try:
        return run(from_args(config_class, args)) or 0
    except UserError as e:
        print(f"fastdpo {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        print(f"fastdpo {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fastdpo {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


_ran_distributed = False  # a process group was torn down by this process's command: see `entry`


def _close_process_group() -> None:
    """Tear down torch.distributed before the interpreter does (wait for peers, release the communicators)."""
    global _ran_distributed
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _ran_distributed = True


def entry() -> None:
    """The `fastdpo` console script and `python -m fastdpo`: `main`, then exit with its code.

    After a distributed command the process leaves without interpreter finalization. destroy_process_group
    does not end gloo's worker threads while DTensor's caches still hold the device mesh, and such a thread
    that takes the GIL while the interpreter finalizes aborts the process after its work is done ("terminate
    called without an active exception", SIGABRT; pytorch/pytorch#190489): a finished run that the launcher
    reports as failed. Every file fastdpo writes is complete and renamed by then; the exit handlers (logging's,
    a tracker's) run here, while the interpreter is whole, and the streams are flushed."""
    code = main()
    if _ran_distributed:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
