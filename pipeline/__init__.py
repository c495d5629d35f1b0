"""TRM-Att ARC pipeline: data → augment → batches → model → train → predict → vote → submission → score."""
