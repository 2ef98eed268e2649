"""Raw text to token shards, and loaders over them."""
