"""hope_dist: distributed pretraining of HOPE (Nested Learning) models."""
__version__ = "0.1.0"
