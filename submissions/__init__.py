"""Kaggle ARC Prize submission files: build, validate, score."""
