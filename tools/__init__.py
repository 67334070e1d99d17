"""Command-line tools around hope_dist: parameter counts, metric plots, checkpoint conversion."""
