"""Integrations of tokenprune into other evaluation frameworks (each optional, imported on demand)."""
