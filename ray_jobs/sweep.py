"""`ray job submit -- python -m ray_jobs.sweep CONFIG [overrides] [--resume]`: the grid on the cluster."""

import sys

from retriever.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
