"""perfjax: patch-level 2D+time UNet segmentation, uncertainty and MBF for perfusion CMR."""

__version__ = "0.1.0"
