"""pipelines: Stable Diffusion on diffusers (base-model loading, the embedded world and its judges).

`load_base` and `load_embedded_lm` are light to import: diffusers/transformers load on first call.
"""

from pipelines.base import DEFAULT_BASE, load_base, load_embedded_lm

__all__ = ["DEFAULT_BASE", "load_base", "load_embedded_lm"]
