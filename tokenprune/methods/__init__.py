"""Built-in pruners; importing this package registers them."""
from . import fastv, fopru, pool, random  # noqa: F401  (imported for their @register_pruner)
