"""Everything about data: image tree -> shards (`pipeline.preprocess`) -> batches."""
__version__ = "0.1.0"


def __getattr__(name):
    # `from pipeline import build_loader` without importing torch and DALI into every Ray task
    if name == "build_loader":
        from pipeline.loader import build_loader
        return build_loader
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
