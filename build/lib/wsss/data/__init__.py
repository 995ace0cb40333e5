"""Datasets in the VOC layout, the embedded synthetic dataset, joint augmentation."""
