"""How every command of ``pipeline`` and ``launch`` ends on a person's mistake: one ``error: ...`` line, exit 2.

A command's ``main(argv) -> int`` is wrapped with :func:`command`; the project's own errors (a config, dataset,
checkpoint, weights file, tracking store, rank or run dir a person must fix) become one line on stderr and exit
status 2, the same as argparse's usage errors. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.checkpoint import CheckpointError, WeightsError
from pipeline.config import ConfigError
from pipeline.data.layout import DatasetError
from pipeline.distributed import RankError
from pipeline.lock import RunDirLocked
from pipeline.tracking import TrackingError

USAGE_EXIT_CODE = 2  # a mistake the message names; argparse exits with 2 too
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, WeightsError, TrackingError, RankError, RunDirLocked)
WEIGHTS_SUFFIXES = (".pt", ".pth")
CONFIG_SUFFIXES = (".yaml", ".yml")

Main = Callable[[list[str] | None], int]


def command(*more: type[Exception]) -> Callable[[Main], Main]:
    """Decorate a command's ``main(argv) -> int``: :data:`USER_ERRORS` (and ``more``, a launcher's own) print
    ``error: <message>`` and return 2; anything else propagates with its traceback."""
    refused = (*USER_ERRORS, *more)

    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except refused as err:
                print(f"error: {err}", file=sys.stderr)
                return USAGE_EXIT_CODE
        return run
    return wrap


def swapped_roles(usage: str, config: str | None = None, weights: str | None = None) -> str | None:
    """What is wrong when a config was passed as the weights or weights as the config (told by the file
    suffix), with the command's ``usage`` as the fix; None when both look right."""
    wrong = []
    if weights is not None and Path(weights).suffix.lower() in CONFIG_SUFFIXES:
        wrong.append(f"the weights '{weights}' is a YAML config, not a model_final.pt or checkpoint")
    if config is not None and Path(config).suffix.lower() in WEIGHTS_SUFFIXES:
        wrong.append(f"the config '{config}' is a weights file, not a YAML config")
    if not wrong:
        return None
    hint = "the two arguments are swapped" if len(wrong) == 2 else "an argument is in the wrong place"
    return f"{' and '.join(wrong)} ({hint}). Run: {usage}"
