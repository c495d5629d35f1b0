"""Foundations every stage stands on: the one error path, atomic file I/O, stop signals, reading settings from
outside, and experiment trackers. Nothing here knows about tasks, models or runs."""
