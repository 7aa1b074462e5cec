"""See what a pruner keeps: visual tokens mapped back to image regions, and the figure.

* :func:`token_regions` -- per prunable view of one image, each token's box in original-image
  pixels (:class:`ViewRegions`), for every supported family.
* :func:`draw_tokens` -- one panel: the image with kept tokens bright and dropped ones dimmed
  (and the method's scores as a heatmap); :func:`compose` -- panels side by side.
"""
from .draw import compose, draw_tokens, panel_layout, view_groups
from .regions import ViewRegions, token_regions

__all__ = ["ViewRegions", "token_regions", "draw_tokens", "compose", "panel_layout", "view_groups"]
