"""The Optuna optimizer: search spaces, target constraints, samplers, storage and resume."""
