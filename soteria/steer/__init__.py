"""Step 3: subtract the harm direction from the selected heads, in place and reversibly.

- :mod:`.patcher`: :class:`SoteriaPatcher` (apply, revert, unsteered);
- :mod:`.plan`: the request checked and planned per layer (shared with the on-disk edit);
- :mod:`.offload`: weights of accelerate-offloaded layers;
- :mod:`.config`: :class:`SoteriaConfig`, the record of a steering.
"""

from .config import SoteriaConfig
from .patcher import SoteriaPatcher

__all__ = ["SoteriaConfig", "SoteriaPatcher"]
