"""`ray job submit -- python -m ray_jobs.serve CONFIG [--set KEY=VALUE]` (or `--sweep DIR`): deploy the service on
the cluster the job runs on; the Serve application outlives the job."""

import sys

from retriever.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
