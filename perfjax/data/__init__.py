"""Data: the synthetic phantom, the TFDS dataset, readers for real data, preprocessing."""
