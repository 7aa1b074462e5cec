"""The lmms-eval model manifest, found through the ``lmms_eval.models`` entry point.

lmms-eval imports this module while ``lmms_eval.models`` initialises, so it imports nothing from
lmms-eval but the registry's manifest class (anything else would be a circular import).
"""
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="tokenprune",
    simple_class_path="tokenprune.integrations.lmms_eval.model.TokenPrune",
    chat_class_path="tokenprune.integrations.lmms_eval.model.TokenPruneChat",
)
