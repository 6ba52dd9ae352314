"""The data stage: read, normalise, score, select, compress and rewrite the training rows."""
