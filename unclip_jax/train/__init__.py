"""Training: optimiser, train state with EMA, the generic train step."""
