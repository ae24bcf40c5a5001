"""Command line: flags and ``--set`` override a YAML config; user errors exit 2 with one line.

Exit codes: 0 done, 2 bad input (flag, config, file, data), 3 no candidate met the target
(the report is still written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

# Flag -> dotted config key. Flags left out keep the YAML/default value.
FLAG_KEYS: Dict[str, str] = {
    "learner": "learner",
    "net": "net",
    "model": "model",
    "trust_model": "trust_model",
    "output_dir": "output_dir",
    "seed": "seed",
    "dataset": "data.name",
    "data_dir": "data.dir",
    "validation_split": "data.validation_split",
    "epochs": "train.epochs",
    "finetune_epochs": "train.finetune_epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "target_speedup": "target.speedup",
    "target_compression": "target.compression",
    "target_latency_speedup": "target.latency_speedup",
    "target_latency_ms": "target.latency_ms",
    "target_sparsity": "target.sparsity",
    "target_bits": "target.bits",
    "trials": "hpo.trials",
    "timeout": "hpo.timeout",
    "sampler": "hpo.sampler",
    "storage": "hpo.storage",
    "study_name": "hpo.study_name",
    "objective": "hpo.objective",
    "pick_latency_ms": "pareto.pick_latency_ms",
    "pick_size_kb": "pareto.pick_size_kb",
    "distill": "distillation.enabled",
    "distill_temperature": "distillation.temperature",
    "distill_alpha": "distillation.alpha",
    "distill_features": "distillation.feature_weight",
    "teacher": "distillation.teacher",
    "sparsity_pattern": "{learner}.pattern",  # weight-sparse only: an error with any other learner
    "bits": "{learner}.bits",  # the selected learner's section (uniform, weight-sparse)
    "export": "export.tflite",
    "quantize_export": "export.quantize",
    "threads": "export.threads",
    "latency_runs": "export.latency_runs",
}


def _number_or_search(text: str):
    """A flag value that is a number or the word 'search' (the optimizer chooses)."""
    if text.strip().lower() == "search":
        return "search"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor 'search'") from None


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose bad-flag message is one line ``error: ...`` (exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}{self._suggestion(message)}; see python main.py --help\n")
        raise SystemExit(2)

    def _suggestion(self, message: str) -> str:
        """'; did you mean --target-speedup?' for a misspelt flag (abbreviations are not accepted,
        so that --target-speed cannot silently mean something)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        hints = []
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{word.split('=', 1)[0]} -> {close[0]}")
        return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="main.py",
        allow_abbrev=False,
        description="PocketFlow-TF2: compress a Keras model to a target, export it to TFLite, report what it "
                    "costs. With no flags: train the built-in digits CNN on scikit-learn's digits.",
        epilog="Exit status: 0 done; 2 bad input; 3 no candidate met the target (report still written); "
               "130 interrupted (partial report written; --resume continues). "
               "Values from --config are overridden by flags, then by --set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    general = parser.add_argument_group("run")
    general.add_argument("--config", metavar="FILE", help="YAML config file (see configs/)", default=None)
    general.add_argument("--set", metavar="KEY=VALUE", action="append", dest="overrides", default=[],
                         help="override any config key, value read as YAML, e.g. --set train.epochs=5 "
                              "--set 'data.mean=[0.485,0.456,0.406]' (repeatable)")
    general.add_argument("--learner", help="compression algorithm: full-prec (train/evaluate only), channel, "
                                           "weight-sparse, uniform, non-uniform (codebooks), product-quant, ... "
                                           "(default full-prec)")
    general.add_argument("--output-dir", metavar="DIR", help="run directory (default runs/<time>-<learner>-<net>)")
    general.add_argument("--resume", action="store_true", default=False,
                         help="continue the run in --output-dir (finished trials are not run again)")
    general.add_argument("--seed", type=int, help="random seed for splits, training and search (default 0)")
    general.add_argument("-q", "--quiet", action="store_true", default=False, help="only warnings and the summary")
    general.add_argument("--dry-run", action="store_true", default=False,
                         help="print what would run and the resolved configuration, then exit (nothing is written)")

    model = parser.add_argument_group("model and data")
    model.add_argument("--net", help="built-in net: digits_cnn, lenet, resnet20/32/44/56, mobilenet_v1/v2 "
                                     "(default: the dataset's default net)")
    model.add_argument("--model", metavar="PATH", help="your trained Keras model (.h5, .keras or SavedModel "
                                                       "dir) used as the baseline instead of a built-in net")
    model.add_argument("--trust-model", action="store_true",
                       help="allow a --model file whose Lambda layers hold Python code: loading runs that code, "
                            "so only for files from a source you trust")
    model.add_argument("--dataset", help="digits (built in), mnist, fashion-mnist, cifar10, npz, imagenet "
                                         "(default: the net's dataset, digits for the default net)")
    model.add_argument("--data-dir", metavar="DIR", help="folder holding the dataset's files")
    model.add_argument("--validation-split", type=float,
                       help="fraction of the training data held out for choosing (default 0.1)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, help="baseline training epochs; 0 = build or load, evaluate, "
                                                    "export, no training (default: the net's schedule)")
    train.add_argument("--finetune-epochs", type=float, help="fine-tuning epochs for the best compressed model "
                                                             "(default: 20%% of the net's schedule, at least 1)")
    train.add_argument("--batch-size", type=int, help="training batch size per worker")
    train.add_argument("--learning-rate", type=float, help="initial learning rate")

    target = parser.add_argument_group("target (what the compressed model must reach)")
    target.add_argument("--target-speedup", type=float, help="MACs(baseline) / MACs(compressed), e.g. 2.5")
    target.add_argument("--target-compression", type=float, help="float TFLite bytes / shipped bytes, e.g. 8")
    target.add_argument("--target-latency-speedup", type=float,
                        help="TFLite latency of the baseline / of the shipped file (batch 1, one thread), e.g. 2")
    target.add_argument("--target-latency-ms", type=float,
                        help="the shipped TFLite file's latency on this machine (batch 1, one thread), e.g. 0.8")
    target.add_argument("--target-sparsity", type=float, help="fraction of prunable weights that are zero")
    target.add_argument("--target-bits", type=float, help="parameter-weighted average weight bits")

    sparse = parser.add_argument_group("weight-sparse learner")
    sparse.add_argument("--sparsity-pattern", choices=["unstructured", "2:4"],
                        help="unstructured zeros, or 2:4 (two zeros in every 4 input-channel weights)")
    sparse.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}",
                        help="weight bits of the selected learner: uniform: 8 = int8 TFLite, 2-7 = packed low-bit "
                             "weights at that average; weight-sparse: 8 ships sparse int8")

    search = parser.add_argument_group("search (Optuna)")
    search.add_argument("--trials", type=int, help="trials in the study (total, shared by all searchers; "
                                                   "default 20)")
    search.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    search.add_argument("--sampler", choices=["tpe", "random", "gp", "cmaes", "nsga2"],
                        help="Optuna sampler (default tpe; with --objective pareto: tpe, random, gp or nsga2)")
    search.add_argument("--storage", metavar="URL", help="Optuna storage URL (default "
                                                         "sqlite:///<output-dir>/study.db)")
    search.add_argument("--study-name", help="Optuna study name (default: from the run)")
    search.add_argument("--objective", choices=["accuracy", "pareto"],
                        help="accuracy: the most accurate candidate meeting the target; pareto: accuracy vs MACs "
                             "(or size), ending with every non-dominated model fine-tuned, exported and listed in "
                             "pareto.csv (default accuracy)")
    search.add_argument("--pick-latency-ms", type=float, metavar="MS",
                        help="with --objective pareto: ship the most accurate front model whose TFLite latency "
                             "is at most MS")
    search.add_argument("--pick-size-kb", type=float, metavar="KB",
                        help="with --objective pareto: ship the most accurate front model whose file is at most "
                             "KB kibibytes")

    distill = parser.add_argument_group("distillation (any learner's fine-tuning)")
    distill.add_argument("--distill", action=argparse.BooleanOptionalAction,
                         help="fine-tune with knowledge distillation from the uncompressed baseline (default: "
                              "on for channel pruning, off for the other learners; --no-distill turns it off)")
    distill.add_argument("--distill-temperature", type=_number_or_search, metavar="T|search",
                         help="softening temperature T > 0, or 'search' to let the optimizer choose (default 4)")
    distill.add_argument("--distill-alpha", type=_number_or_search, metavar="A|search",
                         help="weight of the teacher term in [0, 1], or 'search' (default 0.9)")
    distill.add_argument("--distill-features", type=float, metavar="W",
                         help="weight of the feature term: the pruned model's residual joins reproduce the "
                              "teacher's on the channels kept (channel learner; 0 turns it off; default 0)")
    distill.add_argument("--teacher", metavar="PATH",
                         help="distil from this Keras model file instead of the baseline (a stronger net with the "
                              "same inputs, classes and input scaling; its validation accuracy is checked first)")

    export = parser.add_argument_group("export")
    export.add_argument("--export", choices=["tflite", "none"], help="write and measure TFLite files "
                                                                     "(default tflite)")
    export.add_argument("--quantize-export", choices=["none", "dynamic", "int8"],
                        help="also export dynamic-range or full-integer int8 TFLite (default none)")
    export.add_argument("--threads", type=int, help="TFLite interpreter threads for latency (default 1)")
    export.add_argument("--latency-runs", type=int, help="timed batch-1 runs after warm-up (default 50)")
    del add
    return parser


def merged_config_dict(args: argparse.Namespace) -> Tuple[Dict[str, Any], str]:
    """YAML file, then flags, then --set, as one nested dict; and a description of the sources."""
    from pocketflow.config import apply_override, load_yaml_file, parse_override

    data: Dict[str, Any] = load_yaml_file(args.config) if args.config else {}
    source = f"'{args.config}'" if args.config else "the command line"
    for flag, key in FLAG_KEYS.items():
        if hasattr(args, flag):
            value = getattr(args, flag)
            if flag == "export":
                value = value == "tflite"
            if "{learner}" in key:
                key = _learner_key(key, data.get("learner") or "full-prec", flag)
            apply_override(data, key, value)
    for text in args.overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
    if args.overrides:
        source += " and --set"
    return data, source


def _learner_key(key: str, learner: str, flag: str) -> str:
    """A flag that belongs to the selected learner's section, e.g. --bits -> uniform.bits."""
    import dataclasses

    from learners import LEARNERS
    from pocketflow.errors import ConfigError

    option = key.split(".", 1)[1]

    def has_option(name: str) -> bool:
        options = getattr(LEARNERS.get(name), "Config", None)
        return options is not None and option in {f.name for f in dataclasses.fields(options)}

    for section in (learner, *LEARNERS.get(learner).sections):  # a chain: the first stage that has it
        if has_option(section):
            return key.format(learner=section)
    able = ", ".join(name for name in LEARNERS.names() if has_option(name))
    raise ConfigError(f"--{flag.replace('_', '-')} sets an option of the learner; learner '{learner}' has no "
                      f"'{option}' (learners that have it: {able}); choose one with --learner")


class _ConsoleFormatter(logging.Formatter):
    """One line per event on the console; tracebacks (e.g. of a failed trial) go to run.log only."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _on_console(record: logging.LogRecord) -> bool:
    """What the console shows of the log; run.log keeps everything.

    Not shown: records marked ``console=False`` (routine trial lines).
    """
    return getattr(record, "console", True)


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_ConsoleFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_on_console)
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _one_line(error: BaseException) -> str:
    """User errors are one line, whatever a library put into the message."""
    return " ".join(str(error).splitlines()) or type(error).__name__


def _learner_help(argv: List[str]) -> Optional[str]:
    """``--learner NAME --help``: the learner's own keys, with defaults and meanings, from its
    config class (the text of its section in configs/template.yaml); None without both flags."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return None
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--learner")
    learner = peek.parse_known_args(argv)[0].learner
    if not learner:
        return None
    import dataclasses

    from pocketflow import keras_setup

    keras_setup.start_quietly()
    from learners import LEARNERS
    from pocketflow.config_template import learner_section

    learner_class = LEARNERS.get(learner)
    stages = "".join(f"\n\nits stage {name} reads the '{name}' section:\n\n"
                     + "\n".join(learner_section(name, LEARNERS.get(name).Config)) for name in learner_class.sections)
    if learner_class.sections and not dataclasses.fields(learner_class.Config):  # weight-sparse+uniform: its stage holds them
        own = learner_class.Config.__doc__.strip()
        return f"\nOptions of --learner {learner}: {own[0].lower()}{own[1:]}{stages}"
    section = "\n".join(learner_section(learner, learner_class.Config))
    return (f"\nOptions of --learner {learner}: give them as --set {learner}.KEY=VALUE, or in a '{learner}:' "
            f"section of a --config file (configs/template.yaml lists every section):\n\n{section}{stages}")


def _run_command(argv: List[str]) -> int:
    """``show RUN`` and ``compare RUN...``: a finished run's figures from its report.json."""
    from pocketflow import runs
    from pocketflow.errors import UserError

    parser = argparse.ArgumentParser(prog="pocketflow", allow_abbrev=False,
                                     description="Read finished runs (their report.json); nothing is measured again.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="one run's figures and what it ships").add_argument("run_dir")
    commands.add_parser("compare", help="several runs side by side, one row each").add_argument("run_dirs", nargs="+")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    try:
        lines = runs.show(args.run_dir) if args.command == "show" else runs.compare(args.run_dirs)
    except UserError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    print("\n".join(lines))
    return 0


RUN_COMMANDS = ("show", "compare")


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pocketflow.errors import UserError  # no TensorFlow behind it

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in RUN_COMMANDS:
        return _run_command(argv)
    try:
        learner_help = _learner_help(argv)
    except UserError as error:  # an unknown learner: the same one line as without --help
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a bad flag (2; its one line is printed)
        if stop.code == 0 and learner_help:
            print(learner_help)
        return stop.code if isinstance(stop.code, int) else 2
    _configure_logging(args.quiet)
    from pocketflow import keras_setup

    keras_setup.start_quietly()  # before the first module that imports TensorFlow
    from pocketflow.errors import TargetNotMetError
    from pocketflow.training import DivergenceError

    try:
        from learners import LEARNERS
        from pocketflow.config import build_run_config
        from pocketflow.runner import Runner

        data, source = merged_config_dict(args)
        config = build_run_config(data, LEARNERS.names(), source)
        for name, section in config.learners.items():  # learner sections, with errors that name the file
            LEARNERS.get(name).parse_options(section, source)
        runner = Runner(config, resume=args.resume)
        if args.dry_run:
            print("\n".join(runner.plan()))
            return 0
        report = runner.run()
    except UserError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    except TargetNotMetError as error:
        print(f"target not met: {error}", file=sys.stderr)
        return error.exit_code
    except DivergenceError as error:
        print(f"error: training diverged: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # The runner has saved the study and written a partial report (status "interrupted").
        note = getattr(interrupt, "note", "")
        print("interrupted" + (f": {note}" if note else ""), file=sys.stderr)
        return 130
    if report.get("best") is not None or report.get("baseline") is not None:
        from pocketflow.runs import summary_lines

        for line in summary_lines(report):
            print(line)
    return 0
