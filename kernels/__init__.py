"""Compute kernels for HOPE. Imports nothing from hope_dist (data flows one way)."""
