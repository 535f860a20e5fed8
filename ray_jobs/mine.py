"""`ray job submit -- python -m ray_jobs.mine CONFIG [KEY=VALUE ...] [--overwrite]`: mine training data on the
cluster the job runs on (`retriever mine`)."""

import sys

from retriever.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
