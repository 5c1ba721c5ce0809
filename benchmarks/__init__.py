"""eebench: early-exit methods compared side by side on the same backbones, data, seeds and clocks."""

__version__ = "0.1.0"
