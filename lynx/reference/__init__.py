"""Training, evaluation and widening of the project's own reference MoE models."""
