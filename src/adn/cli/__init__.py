"""The ``adn`` command line (also ``python -m adn``): one module per command, each with ``add(sub)`` (its
flags) and ``run(args)``; this module parses and turns errors into one-line messages.

Tables go to stdout; with ``--json`` stdout holds only JSON. Progress bars and logs go to stderr.
Errors a user can fix are printed as one ``adn: error: ...`` line with exit status 2."""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys

import torch

from ..errors import CheckpointError, DataError, TrainingDiverged, TrainingInterrupted, first_line
from . import (
    analyze,
    depth_table,
    detect,
    eval,
    export,
    import_weights,
    pareto,
    predict,
    profile,
    recalibrate,
    reproduce,
    serve,
    train,
)
from . import finetune_study
from . import eval_lm, generate, train_lm
from .common import HelpFormatter, out_of_memory

__all__ = ["build_parser", "main", "parse"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adn",
        description="Adaptive depth networks: convert, train, evaluate, "
        "profile and export networks whose depth switches at run time.",
    )
    parser.add_argument("--version", action="version", version=f"adn {__import__('adn').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add(sub)
    eval.add(sub)
    recalibrate.add(sub)
    profile.add(sub)
    export.add(sub)
    pareto.add(sub)
    depth_table.add(sub)
    predict.add(sub)
    serve.add(sub)
    analyze.add(sub)
    import_weights.add(sub)
    reproduce.add(sub)
    finetune_study.add(sub)  # adn reproduce-finetune
    detect.add(sub)  # adn detect make-synthetic|train|eval
    train_lm.add(sub)  # language models: adn train-lm, eval-lm, generate
    eval_lm.add(sub)
    generate.add(sub)
    # The study commands run each arm's commands (adn train, adn eval, ...) in their worker processes through
    # this module's main, handed to them here: they cannot import it without an import circle.
    for study in ("reproduce", "reproduce-finetune"):
        _subcommands(parser)[study].set_defaults(run_command=main)
    for command in _all_parsers(parser):  # one formatter everywhere, adn detect's commands included
        command.formatter_class = HelpFormatter
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for child in dict.fromkeys(_subcommands(parser).values()):  # (aliases map to the same parser)
        found += _all_parsers(child)
    return found


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` whose unknown options are reported by the (sub)command they were given to,
    with its usage and the closest option names: argparse reports them at the top level, with the
    top-level usage and no suggestion."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser
        for token in argv:  # the innermost command named on the line (adn detect train ...)
            command = _subcommands(command).get(token, command)
        options = [o for a in command._actions for o in a.option_strings]
        hints = []
        for token in unknown:
            if token.startswith("-"):
                close = difflib.get_close_matches(token.split("=", 1)[0], options, n=2, cutoff=0.6)
                if close:
                    hints.append(f"{token}: did you mean {' or '.join(close)}?")
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else ""))
    return args


def _resume_command(argv: list[str], checkpoint) -> str:
    """The command line that continues an interrupted run: the same one, resuming from its checkpoint."""
    kept, skip_next = [], False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token == "--resume":
            skip_next = True
        elif not token.startswith(("--resume=", "--overwrite")):
            kept.append(token)
    return "adn " + shlex.join([*kept, "--resume", str(checkpoint)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse(parser, argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except TrainingInterrupted as stop:
        print(f"adn: interrupted: {stop}. Continue with: {_resume_command(argv, stop.checkpoint)}", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, CheckpointError, DataError, TrainingDiverged) as error:
        print(f"adn: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not out_of_memory(error):
            raise
        print(
            f"adn: error: out of memory ({first_line(error)}); use a smaller batch size (-b), image size, "
            f"model or --width",
            file=sys.stderr,
        )
        return 2
    except OSError as error:  # a path that cannot be read or written (a file where a folder is expected, ...)
        if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename:
            print(
                f"adn: error: a folder is needed at {error.filename} (or above it), but a file is there; "
                f"choose another path",
                file=sys.stderr,
            )
        else:
            where = f" {error.filename}" if error.filename else ""
            print(f"adn: error: cannot use{where}: {error.strerror or error}; check the paths given", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
