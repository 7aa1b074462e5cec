"""See what a pruner keeps: visual tokens mapped back to image regions, and the figure.

* :func:`token_regions` -- per prunable view of one image, each token's box in original-image
  pixels (:class:`ViewRegions`), for every supported family; for a video, per frame view, in frame
  pixels (:func:`video_regions`).
* :func:`draw_tokens` -- one panel: the image with kept tokens bright and dropped ones dimmed
  (and the method's scores as a heatmap); :func:`compose` -- panels side by side.
* :func:`draw_strip` -- a video's frame strip: one row of frames per method (:class:`StripRow`).
"""
from .draw import compose, draw_tokens, panel_layout, view_groups
from .regions import ViewRegions, token_regions, video_regions
from .strip import StripRow, draw_strip

__all__ = ["ViewRegions", "token_regions", "video_regions", "draw_tokens", "compose", "panel_layout", "view_groups",
           "StripRow", "draw_strip"]
