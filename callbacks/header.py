"""Prints the baseline train_gpt.py's start-of-run log lines once the data and world size are known."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from pgolf.runlog import log0


class RunHeader(L.Callback):
    def __init__(self, lines: Callable[[L.Trainer, L.LightningModule], list[str]]):
        self.lines = lines

    def on_fit_start(self, trainer, pl_module):
        for line in self.lines(trainer, pl_module):
            log0(line)
