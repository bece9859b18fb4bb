"""A controller for the Ray cluster tests: it holds its trial at every control step until a file exists.

A test that kills a node "mid-trial" needs a trial that is surely still running when the kill comes; one that
merely trains long enough finishes first on a fast machine, or never starts there on a loaded one. With this
controller every trial waits at its first control step (its model built and evaluated, its files only in the
node's temp folder) until the test has killed the node and created the file.
"""
from __future__ import annotations

import os
import time

from controllers import CONTROLLERS, Controller, Rate, TrainingStats, register


class WaitForFile(Controller):
    """Rate ``rate``, once ``path`` exists; until then each control step waits (up to ``timeout_s`` seconds).

    :param path: the file to wait for.
    :param rate: the dropout rate, in [0, 1).
    :param timeout_s: longest wait per control step, in seconds (a test that never creates the file fails
        by its own timeout, not here).
    """

    name = "wait_for_file"

    def __init__(self, path: str = "", rate: float = 0.0, timeout_s: float = 600.0) -> None:
        super().__init__()
        self.path, self.rate, self.timeout_s = path, rate, timeout_s

    def _update(self, stats: TrainingStats) -> Rate:
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.rate


if WaitForFile.name not in CONTROLLERS:
    register(WaitForFile)
