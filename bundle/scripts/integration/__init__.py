"""What ties the method to MONAI's bundle tools: running configs from Python and the Model Zoo's checks."""
