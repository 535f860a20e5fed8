"""`ray job submit -- python -m ray_jobs.index ENCODER --dataset ID --out DIR --actors N [...]`: encode a corpus with
a Ray Data actor pool, then build its index shards (`retriever encode` + `retriever index`)."""

import argparse
import sys
from pathlib import Path

from retriever.cli import main


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ray_jobs.index")
    parser.add_argument("encoder")
    parser.add_argument("--out", type=Path, required=True, help="folder for encodings/ and index/")
    parser.add_argument("--shards", default="1")
    parser.add_argument("--kind", default=None)
    args, encode_args = parser.parse_known_args(argv)
    encodings, index = args.out / "encodings", args.out / "index"
    status = main(["encode", args.encoder, "--out", str(encodings), *encode_args])
    if status:
        return status
    extra = ["--kind", args.kind] if args.kind else []
    return main(["index", str(encodings), "--out", str(index), "--shards", args.shards, *extra])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
