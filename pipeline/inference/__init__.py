"""From trained weights to ranked answers: prediction over every augmented view, the candidates' store, likelihood
re-scoring and voting. Writing and scoring a submission is the top-level `submissions` package."""
