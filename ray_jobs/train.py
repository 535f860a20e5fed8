"""`ray job submit -- python -m ray_jobs.train CONFIG [overrides] [--stage mntp]`: train on the cluster."""

import sys

from retriever.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
