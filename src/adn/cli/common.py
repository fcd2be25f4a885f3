"""What every ``adn`` command shares: argument types, the help formatter, the measurement flags of
eval and profile, and small readers and writers of JSON rows and plots."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from ..core.skip import SkipConfig
from ..utils import jsonout


def record_folder(record: str | None, docs: str, default_docs: str, default_record: str) -> Path:
    """Where a study keeps its run records: ``--record`` if given; ``results/...`` for the project's own
    report (the default ``--docs``); runs/ beside any other report, so that a report written elsewhere (a
    test's temporary folder, a user's experiment) never mixes its runs into the project's records."""
    if record:
        return Path(record)
    docs_path = Path(docs)
    return Path(default_record) if docs_path == Path(default_docs) else docs_path.parent / docs_path.stem / "runs"


def out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default, shown once, in words that read right for on/off flags.

    argparse's ArgumentDefaultsHelpFormatter showed nothing for options without a help text (--epochs,
    --lr, ...), "(default: None)" after help that already names the default, and "(default: True)" after
    --no-progress, which reads as if the flag were on."""

    def _format_action(self, action):
        text = _default_text(action)
        help_text = _without_auto_default(action)
        if text and "default" not in (help_text or "").lower():
            help_text = f"{help_text} ({text})" if help_text else f"({text})"
        if help_text != action.help:
            action = copy.copy(action)
            action.help = help_text
        return super()._format_action(action)


def _default_text(action) -> str | None:
    """'default: 10', 'default: off' (for a flag that is off unless given), or None (nothing to show)."""
    if action.help == argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        positive = next(o for o in action.option_strings if not o.startswith("--no-"))
        return f"default: {positive if action.default else '--no-' + positive[2:]}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "default: off"  # a store_false flag (--no-x) is off too: x is on unless it is given
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else str(action.default)
    return f"default: {value}".replace("%", "%%")  # help strings are %-formatted


def _without_auto_default(action) -> str | None:
    """Python 3.11's BooleanOptionalAction appends ' (default: %(default)s)' (True/False) by itself."""
    suffix = " (default: %(default)s)"
    if isinstance(action, argparse.BooleanOptionalAction) and action.help and action.help.endswith(suffix):
        return action.help[: -len(suffix)]
    return action.help


def add_measure_flags(p) -> None:
    p.add_argument("--skip", default="all", help="'all', or comma-separated configs such as TTFF,super,base")
    p.add_argument("--json", action="store_true", help="print JSON rows on stdout instead of a table")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip latency measurement")
    p.add_argument("--latency-batch-size", type=positive_int, default=1, help="batch size of latency measurements")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes before timing")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed forward passes (median reported)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--backend",
        default="eager",
        choices=("eager", "compile", "onnxruntime", "onnxruntime-per-depth"),
        help="engine for latency: eager PyTorch (switching depth in place), torch.compile (every "
        "sub-network compiled ahead of time), ONNX Runtime on one switchable file (one session, the "
        "depth fed as an input) or on one file per sub-network (onnxruntime-per-depth)",
    )


def skip_configs(text: str, num_stages: int) -> list[SkipConfig]:
    if text.strip().lower() == "all":
        return SkipConfig.all(num_stages)
    # Repeats and aliases ("super" and "FFF") name one sub-network: each is measured once, in order.
    return list(dict.fromkeys(SkipConfig(part, num_stages) for part in text.split(",")))


def write_plot(write, path) -> None:
    """Write a plot; failing to is a warning (the numbers are already printed), not an error. ``path`` may be
    the error :func:`plot_output` refused it with: then only the warning."""
    if isinstance(path, ValueError):
        print(
            f"adn: warning: could not write the plot {path.path}: {path} (or --no-plot); the results above are "
            f"complete",
            file=sys.stderr,
        )
        return
    try:
        write()
    except OSError as error:
        reason = (
            "a file is in the way of its folder"
            if isinstance(error, (FileExistsError, NotADirectoryError))
            else error.strerror or str(error)
        )
        print(
            f"adn: warning: could not write the plot {path} ({reason}); the results above are complete. "
            f"Choose a writable place with --plot, or --no-plot",
            file=sys.stderr,
        )
        return
    print(f"plot: {path}", file=sys.stderr)


def plot_output(given: str | None, default: Path, overwrite: bool, inputs: list[tuple[str, object]]):
    """Where to write a plot (``--plot`` as given, else ``default``), checked before the work
    (:mod:`adn.utils.outputs`). A path that must not be written is not an error: the numbers are the
    command's result, so :func:`write_plot` then says why on stderr and writes nothing. Returns the path, or
    the :class:`~adn.utils.outputs.OutputError` that refused it."""
    from ..utils.outputs import PLOT, OutputError, output_path

    try:
        return output_path(
            given if given is not None else default, PLOT, flag="--plot", overwrite=overwrite, inputs=inputs
        )
    except OutputError as error:
        error.path = given if given is not None else default
        return error


def read_rows(path: str, what: str, needed: set[str]) -> dict[str, dict]:
    try:
        rows = jsonout.loads(Path(path).read_text(), source=path)
        by_skip = {row["skip"]: row for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected the JSON printed by `adn {what} --json` ({error})") from error
    missing = needed - set(next(iter(by_skip.values()), {}))
    if not by_skip or missing:
        raise ValueError(f"{path}: rows lack {sorted(missing) or 'everything'}; produce it with `adn {what} --json`")
    return by_skip


def checkpoint_dataset(args, meta: dict, val_subset: int | None = None, skip_bad_images: bool = False):
    """The data set a checkpoint was trained on (or ``--data``/``--data-path``), un-augmented, checked
    against the checkpoint's class count: what eval and recalibrate read."""
    from ..vision.data import checkpoint_data

    return checkpoint_data(meta, args.checkpoint, args.data, args.data_path, val_subset, skip_bad_images)


def note_missing_depth_statistics(net, meta: dict, path) -> None:
    """Say on stderr when a network trained with --method joint runs its depths without statistics of
    their own: its intermediate depths then read up to 0.8 points lower than they can. Without skip-aware
    twins every norm's running averages blend both trained depths, which serve every depth as well
    (docs/reproduction.md), so such a network gets no note."""
    from ..core.depth_statistics import has_depth_statistics
    from ..core.recalibrate import batch_norms

    if (
        meta.get("method") == "joint"
        and meta.get("skip_aware_norm", True)
        and not has_depth_statistics(net)
        and batch_norms(net)
    ):
        print(
            f"adn: note: {path} was trained with --method joint and holds no per-depth batch-norm statistics; its "
            f"depths never trained explicitly read lower without them: adn recalibrate --checkpoint {path}",
            file=sys.stderr,
        )
