"""Config groups of ablate, shipped with the package."""
