"""engine.env: the configured rewards as a Gymnasium environment (filled in by engine/env/text.py)."""
