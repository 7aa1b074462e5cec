"""Shipped sweep configs (installed as ``tokenprune.configs``); ``tokenprune bench --config configs/...``
resolves names here from any folder."""
