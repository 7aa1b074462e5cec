"""tokenprune as an lmms-eval model (``--model tokenprune``); see docs/lmms_eval.md.

Nothing is imported here: lmms-eval imports :mod:`.manifest` while its model registry initialises,
and :mod:`.model` (which needs lmms-eval) only when the model is used.
"""
