"""Everything about the network and its training."""
