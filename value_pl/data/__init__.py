"""Read at run time: the shard schema, the WebDataset data module, per-backbone collation, the feature cache."""
