"""Data: the built-in procedural `shapes` data set."""
