"""Data preparation: the sources, the dataset writer and the command that runs them."""
