"""The simulator's output: one session's datasets in memory, before they are written to a ONE cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class SessionFiles:
    """One session as files: dataset paths relative to the session folder -> their content.

    ``.npy`` paths hold arrays, ``.pqt`` and ``.csv`` paths hold DataFrames
    (e.g. ``alf/_ibl_trials.table.pqt``, ``alf/probe00/pykilosort/spikes.times.npy``).
    """

    eid: str  # uuid4 string, stable for a seed
    lab: str
    subject: str
    date: str  # 'YYYY-MM-DD'
    number: int  # session folder NNN
    datasets: dict[str, np.ndarray | pd.DataFrame]  # path relative to the session folder -> content
