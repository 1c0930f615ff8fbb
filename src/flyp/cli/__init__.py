"""The ``flyp`` command line. Every subcommand calls the same functions as the Python API.

One module per verb (finetune.py, evaluate.py, ...) declares that verb's options beside the
code that runs it: ``register(sub)`` adds its parser, whose handler is the module's ``run``.
Here the parser is assembled from them, in the order ``flyp --help`` lists them, and ``main``
runs one with flyp's handling of bad input, Ctrl-C, SIGTERM and a closed pipe. What the verbs
share is in _common.py; what they ask of a run directory, in flyp.rundir. A verb imports what
it runs with (flyp.rundir, torch, ...) inside its ``run``: ``flyp --help`` and ``--version``
build every parser without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator

from flyp.cli import compare, data, evaluate, export, finetune, predict, report, sweep, wise
from flyp.cli._common import Interrupted, Parser
from flyp.cli._common import data_choices as _data_choices  # noqa: F401 (tests import it here)

# The verbs, in the order `flyp --help` lists them.
VERBS = (finetune, evaluate, compare, sweep, data, report, wise, export, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flyp", description="Finetune CLIP-like models like they were pretrained.")
    parser.add_argument("--version", action="version", version=f"flyp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for verb in VERBS:
        verb.register(sub)
    return parser


def _version() -> str:
    """The installed package's version (read from its metadata: no import of flyp's modules)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flyp")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand (the ``flyp`` entry point).

    Bad input (a recipe, data, model, checkpoint, run directory or path of the user's) ends with
    one line on stderr and exit status 2; Ctrl-C with one line saying what was kept and how to
    continue, status 130; output cut short by its reader (``flyp data ... | head``) quietly,
    status 141 (128 + SIGPIPE, as a shell reports it). Anything else is a bug and keeps its
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _sigterm_as_interrupt():
            try:
                status = _main(argv)
                if status == 0:
                    _end_together()
                return status
            except Interrupted as err:
                print(f"interrupted: {_stopped_by(err)}{err}", file=sys.stderr)
                return _interrupted_status(err)
            except KeyboardInterrupt as err:
                print(
                    f"interrupted: {_stopped_by(err)}nothing half-written was left",
                    file=sys.stderr,
                )
                return _interrupted_status(err)
            finally:
                sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except BrokenPipeError:
        # The reader went away (head, less): the Python docs' recipe. Point stdout at devnull
        # so that the interpreter's own flush at exit finds nothing to complain about.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _end_together() -> None:
    """A finished verb under torchrun: every rank ends the process group at once
    (:func:`flyp.distributed.end_distributed`). Nothing to do, and torch not imported, where no
    group was started."""
    if "flyp.distributed" in sys.modules:
        sys.modules["flyp.distributed"].end_distributed(together=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop, torchrun ending its workers): handled as
    Ctrl-C is, so it leaves the same files and says the same things, with exit status 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while a verb runs (the main thread only: Python runs
    signal handlers there); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _was_terminated(err: BaseException) -> bool:
    return isinstance(err, Terminated) or isinstance(err.__context__, Terminated)


def _stopped_by(err: BaseException) -> str:
    """What stopped the verb, where the message does not say it already."""
    if _was_terminated(err):
        return "stopped by SIGTERM; "
    return "" if isinstance(err, Interrupted) else "stopped by Ctrl-C; "


def _interrupted_status(err: BaseException) -> int:
    return 143 if _was_terminated(err) else 130  # 128 + the signal, as a shell reports it


# What the machine answered, in words a user can act on (an OSError's errno).
_MACHINE_ANSWERS = {
    errno.ENOSPC: "no space left on the device; free space or choose another --out",
    errno.EDQUOT: "the disk quota is used up; free space or choose another --out",
    errno.EROFS: "the file system is read-only; choose an --out on a writable disk",
    errno.ENAMETOOLONG: "a file name is too long; choose a shorter --out or recipe name",
}


# A path that is not what flyp reads or writes there, named by the error (a run's metrics.json
# that is a folder, a link that loops on the way to a root): the path, then one of these.
_PATH_ANSWERS = {
    errno.EISDIR: "is a folder where flyp reads or writes a file; move it away or fix the path",
    errno.ENOTDIR: "is not a folder, or a part of it is a file; fix the path",
    errno.ELOOP: "is, or passes through, a symbolic link that loops; remove the link or fix it",
}


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _main(argv: list[str]) -> int:
    """Parse and run one subcommand; its expected errors become one line and status 2."""
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed: an interrupted run says how to continue it
    # After parsing: --help and --version need none of these (nor torch, which they import).
    from flyp.checkpoint import CheckpointError
    from flyp.data.folders import DataError
    from flyp.errors import RunError
    from flyp.models.base import ModelSpecError
    from flyp.recipe import RecipeError
    from flyp.report import ReportError

    expected = (
        RecipeError,
        DataError,
        ModelSpecError,
        RunError,
        CheckpointError,
        ReportError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
    )
    try:
        return args.func(args)
    except expected as err:
        from flyp.outputs import for_terminal

        print(f"error: {for_terminal(_one_line(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        answer = _MACHINE_ANSWERS.get(err.errno)
        from flyp.outputs import for_terminal

        if answer is None and err.errno in _PATH_ANSWERS and err.filename:
            print(f"error: {for_terminal(f'{err.filename} {_PATH_ANSWERS[err.errno]}')}", file=sys.stderr)
            return 2
        if answer is None:
            raise

        # a copy's error names its source first; the file being written is its second name
        target = err.filename2 or err.filename
        where = f"cannot write {target}: " if target else ""
        print(f"error: {for_terminal(where + answer)}", file=sys.stderr)
        return 2
