"""Progress of long loops: a tqdm bar on a terminal, plain lines in a log or a worker process.

Every training and evaluation loop reports through `Progress` (a tqdm) with the figures that
matter set as its postfix (loss, reward, KL, accuracy). On a terminal it is an ordinary live bar.
When stderr is not a terminal (`bash train.sh > log`), or inside a worker process where two jobs
would overwrite one bar line, it prints one full line every `PLAIN_INTERVAL` seconds and at the
end, prefixed by the job's name, so a log shows every job moving.

Importing this module also silences transformers' own per-load bars ("Loading weights", "Writing
model shards"): one per checkpoint load, dozens per run, none of them informative.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

PLAIN_INTERVAL = 30.0  # seconds between two plain progress lines of one loop
PLAIN_ENV = "MOR_PLAIN_PROGRESS"  # set to 1 in worker processes (stages.in_workers)


def plain() -> bool:
    return os.environ.get(PLAIN_ENV) == "1" or not sys.stderr.isatty()


class Progress(tqdm):
    """tqdm that degrades to periodic plain lines (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._plain = plain()
        self._printed = -1.0  # when the last plain line was printed (tqdm's clock)
        self._closing = False
        if self._plain:
            kwargs["disable"] = False
            kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        # refresh() runs on every update and postfix change: print only every PLAIN_INTERVAL
        # seconds of progress, and the final state when the loop closes
        now = self._time()
        if self.n == 0 or not (self._closing or now - max(self._printed, self.start_t) >= PLAIN_INTERVAL):
            return True
        self._printed = now
        print((msg or self.format_meter(**self.format_dict)).strip(), file=sys.stderr, flush=True)
        return True

    def close(self):
        self._closing = True
        super().close()
