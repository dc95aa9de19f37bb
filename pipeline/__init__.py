"""Everything about data: image tree -> shards (`pipeline.preprocess`) -> batches."""
__version__ = "0.1.0"
