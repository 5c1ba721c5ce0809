"""Figures from a results store: see :mod:`eebench.plots.curves`."""
