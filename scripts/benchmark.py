"""Benchmarks on real data, ours and the peers side by side (logic in pocketflow.benchmarks).

    python scripts/benchmark.py --quick                 # built-in digits only, a few minutes
    python scripts/benchmark.py                         # everything (needs ../shared/data; hours)
    python scripts/benchmark.py --scenario resnet20-sparse-0.75 --scenario resnet20-tfmot-prune-0.75
    python scripts/benchmark.py --list
    python scripts/benchmark.py --table                 # regenerate results.md and README's table from results.json

Run directories go to runs/benchmarks (ignored by git); the results file, docs/benchmarks/results.json,
is committed, and README's table is generated from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pocketflow import keras_setup  # noqa: E402  (picks the process's Keras first)

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr

from pocketflow.benchmarks import harness  # noqa: E402
from pocketflow.benchmarks.scenarios import ORDER, SCENARIOS, published_figures, select  # noqa: E402
from pocketflow.errors import ConfigError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the quick scenarios (built-in data)")
    parser.add_argument("--scenario", action="append", default=[], help="run this scenario (repeatable)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks"), help="where the runs go")
    parser.add_argument("--results", default=str(ROOT / "docs" / "benchmarks"),
                        help="where results.json and results.md go (committed)")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the README whose table is regenerated")
    parser.add_argument("--table", action="store_true",
                        help="run nothing: regenerate results.md and README's table from results.json")
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
    results_dir = Path(args.results)
    if args.table:
        return write_readme(results_dir, Path(args.readme))
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
                       published=published_figures(), results_dir=results_dir)
    write_readme(results_dir, Path(args.readme))
    print((results_dir / "results.md").read_text())
    return 0 if all(row.get("status") == "ok" for row in rows) else 1


def write_readme(results_dir: Path, readme: Path) -> int:
    """results.md and README's table, both rendered from results.json."""
    results_file = results_dir / "results.json"
    if not results_file.exists():
        print(f"error: {results_file} does not exist; run some scenarios first", file=sys.stderr)
        return 2
    table = harness.render_table(json.loads(results_file.read_text()), published_figures())
    harness.write_atomic(results_dir / "results.md", table.encode())
    harness.write_atomic(readme, harness.readme_block(readme.read_text(), table).encode())
    print(f"wrote {results_dir / 'results.md'} and the table in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
