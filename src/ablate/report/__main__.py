"""python -m ablate.report [RUN_ID] [--experiment NAME] [--sweep ID|all] [--metric M] [--baseline k=v,...]"""
from ablate.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
