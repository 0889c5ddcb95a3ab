"""Build shard sets from the public datasets (Flickr30k Entities, Visual Genome, SentEval) and the synthetic demo."""
