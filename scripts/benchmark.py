"""Benchmarks on real data, ours and the peers side by side (logic in pocketflow.benchmarks).

    python scripts/benchmark.py --quick                 # built-in digits only, a few minutes
    python scripts/benchmark.py                         # everything (needs ../shared/data; hours)
    python scripts/benchmark.py --scenario resnet20-sparse-0.75 --scenario resnet20-tfmot-prune-0.75
    python scripts/benchmark.py --list
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pocketflow  # noqa: E402,F401  (picks the process's Keras first)
from pocketflow.benchmarks import harness  # noqa: E402
from pocketflow.benchmarks.scenarios import ORDER, SCENARIOS, published_figures, select  # noqa: E402
from pocketflow.errors import ConfigError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the quick scenarios (built-in data)")
    parser.add_argument("--scenario", action="append", default=[], help="run this scenario (repeatable)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks"), help="results directory")
    parser.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"),
                        help="the shared data folder (pretrained ResNets, CIFAR-10, MNIST)")
    parser.add_argument("--force", action="store_true", help="run again scenarios already in the results")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.list:
        for name in ORDER:
            scenario = SCENARIOS.get(name)
            print(f"{name:32s} {'quick ' if scenario.quick else '      '}{'peer ' if scenario.peer else '     '}"
                  f"about {scenario.minutes:g} min")
        return 0
    shared = Path(args.shared_data)
    try:
        scenarios = select(args.scenario, args.quick, shared.is_dir())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not scenarios:
        print(f"error: nothing to run: the named scenarios need {shared}, which is absent", file=sys.stderr)
        return 2
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = harness.run(scenarios, str(shared), Path(args.output), force=args.force, command=command.strip(),
                       published=published_figures())
    print((Path(args.output) / "results.md").read_text())
    return 0 if all(row.get("status") == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
