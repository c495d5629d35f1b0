"""Dihedral and colour augmentations of ARC tasks, and the compact augmented dataset built from them."""
