"""Built-in pruners; importing this package registers them."""
from . import cdpruner, dart, divprune, fastv, fopru, pdrop, pool, random, sparsevlm, vispruner, visionzip  # noqa: F401  (imported for their @register_pruner)
from . import fastvid, scissor, visionzip_video  # noqa: F401  (the video methods)
from . import prumerge  # noqa: F401  (PruMerge / PruMerge+: adaptive, merged before the projector)
from . import flowcut, tome  # noqa: F401  (in the vision encoder)
from . import holov  # noqa: F401  (HoloV: chunk budgets after the projector)
from . import gprune  # noqa: F401  (G-Prune: norm flow over a similarity graph)
from . import mustdrop  # noqa: F401  (MustDrop: in the tower, in the LLM and on the decode cache)
from . import v2drop  # noqa: F401  (V2Drop: variation-ranked drops inside the LLM)
