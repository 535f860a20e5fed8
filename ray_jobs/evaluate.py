"""`ray job submit -- python -m ray_jobs.evaluate ENCODER --dataset ID [--dataset ID ...] [overrides]`: evaluate an
encoder on the cluster (encoding with Ray Data actors when `eval.encode_actors > 0`)."""

import sys

from retriever.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-checkpoint", *sys.argv[1:]]))
