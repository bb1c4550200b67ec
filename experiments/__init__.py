"""Named ablations (python run.py -m +experiment=NAME), shipped with the package."""
