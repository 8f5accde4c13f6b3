"""One run of a search in its own process: what `effnet search --launcher "torchrun ..."` starts.

    torchrun --nproc_per_node 4 -m effnet.search.worker SEARCH_DIR RUN_KEY SEED [--data-dir DIR]

It reads the search's plan.json, loads the same data subsets, and trains the run through
`effnet.fit`, which joins torchrun's process group and splits every batch over the processes
(DDP); the main process writes results/<run>.json, as a run trained in-process would.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from effnet.paths import cache_dir
from effnet.search.plan import RunSpec, SearchPlan
from effnet.search.runner import search_splits_from_plan, train_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnet.search.worker", description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="the search folder (holds plan.json)")
    parser.add_argument("run", help="run key, e.g. candidate_a1.20_b1.10_g1.15_phi1")
    parser.add_argument("seed", type=int)
    parser.add_argument("--data-dir", default=str(cache_dir("data")))
    parser.add_argument("--workers", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="effnet: %(message)s", stream=sys.stderr)
    plan = SearchPlan.read(args.output)
    data = search_splits_from_plan(plan, args.data_dir)
    workers = int(args.workers) if args.workers.isdigit() else args.workers
    train_run(RunSpec.from_key(args.run), args.seed, plan, data, args.output, workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
