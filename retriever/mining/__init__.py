"""Training data at scale: first-stage candidates, hard negatives and cross-encoder teacher scores, mined into
training-example shards (`retriever mine`; README "Making training data")."""
