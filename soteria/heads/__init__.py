"""Step 1: which attention heads carry a language's in-context function.

- :mod:`.probes`: the built-in probe tasks per language, and the user's own pairs;
- :mod:`.prompts`: clean and corrupted few-shot prompts, tokenised and padded;
- :mod:`.attribution`: per-head indirect effects (attribution patching, or exact patching);
- :mod:`.search`: :func:`find_heads` / :func:`find_heads_multi`, trials averaged, cached;
- :mod:`.text`: ``source="text"`` of both: heads from plain text, no probe tasks;
- :mod:`.scores`: the :class:`HeadScores` they return;
- :mod:`.cache`, :mod:`.distributed`: the result cache and the process-group sharding.
"""

from .scores import HeadScores, HeadSet
from .search import find_heads, find_heads_multi
from .text import text_head_scores, text_languages

__all__ = ["HeadScores", "HeadSet", "find_heads", "find_heads_multi", "text_head_scores", "text_languages"]
