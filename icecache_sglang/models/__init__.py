"""Pinned real models and data from PyPI wheels (fetch), prompts (texts), Q/K/V capture (capture)."""
