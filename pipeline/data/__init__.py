"""ARC tasks and how a grid becomes tokens: loading and validating tasks, the token encoding, the canvas and its
buckets, and which tasks are held out. The augmented dataset built from these lives in the top-level `augment`."""
