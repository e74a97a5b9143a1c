"""Tuning: search the head count and the scale per language for the best refusal vs. KL trade-off.

- :mod:`.study`: :func:`tune` (Optuna, resumable), the held-out verification, the files it writes;
- :mod:`.proxy`: the one-forward-pass objective (:class:`RefusalProxy`);
- :mod:`.space`: the :class:`SearchSpace`;
- :mod:`.front`: the Pareto front, choosing a point, the plot;
- :mod:`.records`: the trials as rows and CSV, ``chosen.json`` read back.
"""

from .front import choose, pareto_front
from .proxy import RefusalProxy
from .records import load_tune_config
from .space import SearchSpace
from .study import TuneResult, tune

__all__ = ["RefusalProxy", "SearchSpace", "TuneResult", "choose", "load_tune_config", "pareto_front", "tune"]
