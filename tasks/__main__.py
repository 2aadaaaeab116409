"""``python -m tasks [--data-dir DIR] [--dataset NAME ...] [--image-size S]``

Finds each dataset offline, loads every split and reports the source, the example counts and
the load time, e.g. to check a fresh machine or to measure cold (empty ``$LOZOO_CACHE``) versus
warm (second run) load times.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tasks.datasets import DATASET_NAMES, SPLITS, load_raw, load_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--data-dir", default=None, help="explicit data dir (else $LOZOO_DATA)")
    parser.add_argument("--dataset", nargs="+", choices=DATASET_NAMES, default=list(DATASET_NAMES))
    parser.add_argument("--image-size", type=int, default=28)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    status = 0
    for dataset in args.dataset:
        start = time.perf_counter()
        try:
            raw = load_raw(dataset, args.data_dir)
            for split in SPLITS:
                load_split(dataset, split, args.image_size, data_dir=args.data_dir)
        except (FileNotFoundError, ValueError) as exc:
            print(f"{dataset}: NOT AVAILABLE\n{exc}", file=sys.stderr)
            status = 1
            continue
        sizes = " ".join(f"{k}={v}" for k, v in raw.split_sizes().items())
        print(
            f"{dataset}: {raw.source.describe()}; {sizes}; all splits at "
            f"{args.image_size}x{args.image_size} in {time.perf_counter() - start:.2f} s"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
