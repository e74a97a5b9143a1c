"""Step 2: the harm direction, for the attention output projections only.

- :mod:`.vector`: :class:`HarmVector`, its kinds, save and load;
- :mod:`.checkpoint`: reading a harmful fine-tune (folder, file, Hub, GGUF) lazily;
- :mod:`.finetune`: the direction from a short refusal fine-tune of the found heads (the default);
- :mod:`.gradients`: the direction from the model's own refusal gradients;
- :mod:`.data`: the built-in harmful requests with refusals, and harmless requests.
"""

from .data import harmful_languages, load_harmful, load_harmless, read_harmful
from .gradients import refusal_loss
from .vector import FORMAT, KINDS, HarmVector

__all__ = [
    "FORMAT",
    "KINDS",
    "HarmVector",
    "harmful_languages",
    "load_harmful",
    "load_harmless",
    "read_harmful",
    "refusal_loss",
]
