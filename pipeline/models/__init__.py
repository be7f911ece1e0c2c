"""Models: the three builders, their backbones, and fitting."""
