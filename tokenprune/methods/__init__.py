"""Built-in pruners; importing this package registers them."""
from . import dart, divprune, fastv, fopru, pdrop, pool, random, sparsevlm  # noqa: F401  (imported for their @register_pruner)
