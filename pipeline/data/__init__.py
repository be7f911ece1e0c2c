"""Data: sources, the sample generator, video reading, splits, cached arrays, augmentation."""
