"""hope_dist: distributed pretraining of HOPE (Nested Learning) models."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`hope_dist.from_pretrained` without importing torch for `import hope_dist.config`."""
    if name == "from_pretrained":
        from hope_dist.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'hope_dist' has no attribute {name!r}")
