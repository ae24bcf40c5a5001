"""Exceptions that the CLI turns into exit codes, so user mistakes never show a traceback."""


class UserError(Exception):
    """Bad input from the user (flag, config, file, data). The CLI prints one line and exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A dataset or model file is missing, unreadable or does not fit."""


class TargetNotMetError(Exception):
    """No candidate met the requested target. The report is still written; the CLI exits 3."""

    exit_code = 3


class SearchFailedError(UserError):
    """The search could not go on (its first trials all failed); the reason of the last one is named."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a search: the current trial is marked failed ('interrupted') and the
    study is saved. Carries the trial counts and the search summary so far for the partial report."""

    def __init__(self, trials: dict, details: dict) -> None:
        super().__init__("interrupted")
        self.trials = trials
        self.details = details
