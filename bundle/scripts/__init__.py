"""Weakly supervised lung nodule segmentation (Feng et al., MICCAI 2017) as a MONAI bundle.

The package by role: ``pipeline`` (the method, one module a step), ``networks``, ``data`` (sources, the dataset writer,
``prepare``), ``training``, ``evaluation``, ``integration`` (running configs, the Model Zoo's checks) and ``utils``;
``quickstart`` is the demo. The repository's docs/architecture.md shows the data's way through them.
"""
