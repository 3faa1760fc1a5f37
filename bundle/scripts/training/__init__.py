"""What the training configs plug into MONAI's engines."""
