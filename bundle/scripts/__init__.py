"""Weakly supervised lung nodule segmentation (Feng et al., MICCAI 2017) as a MONAI bundle."""
