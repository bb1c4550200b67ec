"""`python -m ablate.tour`: see `ablate.tour`."""
import sys

from ablate.tour.cli import main

if __name__ == "__main__":
    sys.exit(main())
