"""Horovod for real (``horovodrun -np 2 -H localhost:2 --gloo`` on the CPU) and several
searchers sharing one Optuna study (SQLite, and PostgreSQL when its server is installed).

What a rank did is recorded by small test-only drivers written into tmp_path (they wrap
``pocketflow.training.train`` and ``pocketflow.report.write_report`` before running
main.py), so production code carries no debug hooks and non-chief ranks write nothing into
the run directory.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _horovodrun() -> str:
    """The horovodrun beside this Python, or skip with the reason."""
    try:
        import horovod.tensorflow  # noqa: F401
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Horovod is not importable ({type(error).__name__}: {error}); "
                    f"scripts/install.sh builds horovod==0.28.1 with Gloo")
    found = shutil.which("horovodrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.skip("horovodrun is not on PATH (scripts/install.sh installs it with Horovod)")
    return found


def _environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), **extra)
    return env


# Test-only: main.py, plus a record per rank of the weights after every training and of each report write.
DRIVER = """
import hashlib, json, os, runpy, sys
import numpy as np
import pocketflow.report as report
import pocketflow.training as training

RECORD = os.path.join(os.environ["PF_TEST_RECORD_DIR"], "rank%s.jsonl" % os.environ.get("HOROVOD_RANK", "0"))

def note(**entry):
    with open(RECORD, "a") as stream:
        stream.write(json.dumps(entry) + "\\n")

def checksum(model):
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()

train, write_report = training.train, report.write_report

def recorded_train(model, *args, **kwargs):
    losses = train(model, *args, **kwargs)
    note(event="train", description=kwargs.get("description"), checksum=checksum(model), losses=losses)
    return losses

def recorded_write_report(*args, **kwargs):
    note(event="write_report")
    return write_report(*args, **kwargs)

training.train, report.write_report = recorded_train, recorded_write_report
sys.argv = [os.path.join(os.environ["PF_TEST_ROOT"], "main.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Test-only: the context's collectives, and a baseline cache that only rank 0 has.
PRIMITIVES = """
import hashlib, json, os, sys
import pocketflow  # first: it picks the process's Keras before tf.keras is touched
import numpy as np
import tensorflow as tf
from pocketflow.distributed import make_context

out = sys.argv[1]
context = make_context()
result = {"name": context.name, "rank": context.rank, "size": context.size, "shard": list(context.shard())}
result["none"] = context.broadcast_object(None)
result["dict"] = context.broadcast_object({"params": {"keep": 0.5}, "number": 3} if context.is_chief else None)
result["from_rank_1"] = context.broadcast_object("rank %d" % context.rank, root_rank=1)
result["average"] = context.average(float(context.rank))
floating, integer = tf.Variable([float(context.rank), 2.0]), tf.Variable(10 + context.rank)
context.average_variables([floating, integer])
result["averaged"] = [floating.numpy().tolist(), int(integer.numpy())]
context.barrier()

os.environ["POCKETFLOW_CACHE_DIR"] = os.path.join(out, "cache%d" % context.rank)  # rank 1 sees no cache
from nets import NETS
from pocketflow.baseline import train_baseline
from pocketflow.config import DataConfig, TrainConfig
from pocketflow.data import load_dataset
from pocketflow.training import resolve_schedule
data_config = DataConfig(name="digits")
net = NETS.get("digits_cnn")
schedule = resolve_schedule(net.schedule, TrainConfig(epochs=1), data_config)
model, source = train_baseline(net, data_config, load_dataset(data_config, 0), schedule, seed=0,
                               distributed=context, use_cache=True)
digest = hashlib.sha256()
for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
result["baseline"] = {"source": source, "checksum": digest.hexdigest()}
with open(os.path.join(out, "rank%d.json" % context.rank), "w") as stream:
    json.dump(result, stream)
"""


def _checksum(model) -> str:
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _records(directory: Path, rank: int) -> list:
    path = directory / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------- without Horovod


def test_the_launcher_builds_horovodrun_commands_for_cpu_and_many_hosts():
    script = str(ROOT / "scripts" / "launch_horovod.sh")

    def dry_run(*args: str) -> str:
        result = subprocess.run(["bash", script, "--dry-run", *args], capture_output=True, text=True, timeout=30,
                                env=_environment(PYTHON="python"))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    main = str(ROOT / "main.py")
    assert dry_run("-np", "2", "--", "--learner=channel") == \
        f"horovodrun -np 2 -H localhost:2 --gloo python {main} --learner=channel"
    assert dry_run("-np", "8", "-H", "host1:4,host2:4", "--network-interface", "eth0", "--", "--trials", "40") == \
        f"horovodrun -np 8 -H host1:4\\,host2:4 --network-interface eth0 --gloo python {main} --trials 40"
    assert dry_run("-np", "8", "--hostfile", "hosts.txt", "--mpi") == \
        f"horovodrun -np 8 --hostfile hosts.txt --mpi python {main}"


def test_started_by_a_launcher_without_horovod_the_cli_says_how_to_install_it(tmp_path):
    program = ("import sys; sys.modules['horovod'] = None; sys.modules['horovod.tensorflow'] = None\n"
               "from pocketflow.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", program, "--learner=channel", "--target-speedup=2",
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=_environment(HOROVOD_RANK="0", HOROVOD_SIZE="2"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this process was started by horovodrun/mpirun but Horovod is not importable")
    assert "scripts/install.sh" in last


# ---------------------------------------------------------------------------- horovodrun -np 2 --gloo


def test_collectives_and_a_baseline_cached_only_on_rank_0_on_two_processes(tmp_path):
    horovodrun = _horovodrun()
    import tensorflow as tf

    from nets import NETS
    from pocketflow.baseline import cache_key
    from pocketflow.config import DataConfig, TrainConfig
    from pocketflow.data import load_dataset
    from pocketflow.model_io import save_model
    from pocketflow.training import resolve_schedule

    data_config = DataConfig(name="digits")
    net = NETS.get("digits_cnn")
    schedule = resolve_schedule(net.schedule, TrainConfig(epochs=1), data_config)
    dataset = load_dataset(data_config, 0)
    tf.keras.utils.set_random_seed(99)  # not the seed train_baseline builds with: only a broadcast can match it
    cached = net.make(dataset.input_shape, dataset.num_classes)
    key = cache_key(net, data_config, schedule, 0, world_size=2)
    save_model(cached, tmp_path / "cache0" / f"{key}.keras")
    script = tmp_path / "primitives.py"
    script.write_text(PRIMITIVES)

    result = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script),
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert (seen["name"], seen["rank"], seen["size"], seen["shard"]) == ("horovod", rank, 2, [rank, 2])
        assert seen["none"] is None
        assert seen["dict"] == {"params": {"keep": 0.5}, "number": 3}
        assert seen["from_rank_1"] == "rank 1"
        assert seen["average"] == 0.5
        assert seen["averaged"] == [[0.5, 2.0], 10]  # floats averaged, integers from rank 0
        assert seen["baseline"]["source"].startswith("cache:")
        assert seen["baseline"]["checksum"] == _checksum(cached)
    assert not (tmp_path / "cache1").exists()  # rank 1 wrote nothing


def _run_two_ranks(tmp_path: Path, *args: str) -> Tuple[subprocess.CompletedProcess, Path, Path]:
    """main.py on two Horovod processes through the recording driver: (result, run directory, records)."""
    horovodrun = _horovodrun()
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    result = subprocess.run(
        [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(driver), *args,
         "--output-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=_environment(PF_TEST_RECORD_DIR=str(records), PF_TEST_ROOT=str(ROOT)))
    return result, out, records


def test_a_chain_on_two_horovod_processes_reports_once_and_trains_every_stage_with_identical_weights(tmp_path):
    """channel+uniform on two ranks: the channel search, the pruning's fine-tuning and the int8 stage's QAT
    run on both, in step (same weights, BatchNorm statistics too, averaged losses); an overall compression
    at fixed bits is split the same on both (the pruning's budget is sized on every rank); only rank 0
    speaks and writes. (One run covers the single learner's path too: the chain's first stage is it.) The
    baseline trains for 8 epochs, not the digits recipe's 30: the same checks of lockstep, on fewer steps."""
    begin = time.time()
    result, out, records = _run_two_ranks(tmp_path, "--learner=channel+uniform", "--target-speedup=2", "--trials",
                                          "3", "--epochs", "8", "--finetune-epochs", "1", "--target-bits=8",
                                          "--target-compression=8",
                                          "--set", "uniform.compare_dynamic=false",
                                          "--set", "uniform.representative_samples=32")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    print(f"horovodrun -np 2 channel+uniform job: {time.time() - begin:.0f}s")

    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["status"] == "completed"
    assert report["trials"]["completed"] == 3
    assert report["best"]["speedup"] >= 2.0  # more where the size split asks the pruning for more
    assert report["best"]["accuracy"] >= report["baseline"]["accuracy"] - 0.05
    assert report["best"]["shipped_format"] == "int8 TFLite" and len(report["best"]["stages"]) == 2
    assert report["best"]["compression_split"]["pruning_float_compression"] > 1
    assert report["best"]["target_check"]["compression"]["met"] is True

    chief, follower = _records(records, 0), _records(records, 1)
    assert [r["event"] for r in chief].count("write_report") == 1  # one report, written once, by rank 0
    assert not any(r["event"] == "write_report" for r in follower)
    chief_training = [(r["description"], r["checksum"], r["losses"]) for r in chief if r["event"] == "train"]
    follower_training = [(r["description"], r["checksum"], r["losses"]) for r in follower if r["event"] == "train"]
    assert [description for description, _, _ in chief_training] == ["baseline", "fine-tune", "QAT fine-tune"]
    assert follower_training == chief_training

    assert "Horovod: rank 0 of 2" in output
    follower_lines = [line for line in output.splitlines() if line.startswith("[1]")]
    assert not [line for line in follower_lines if "trial " in line or " epoch " in line or "baseline:" in line]
    assert output.count("run directory:") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("report")) == ["report.json", "report.md"]


# ---------------------------------------------------------------------------- many searchers, one study


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on loopback (Debian's postgresql package), or skip."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not binaries:
        pytest.skip("PostgreSQL server binaries are not installed (/usr/lib/postgresql/*/bin/pg_ctl; Debian "
                    "package 'postgresql')")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        pytest.skip("the PostgreSQL driver is not installed: pip install 'psycopg[binary]'")
    bin_dir = Path(binaries[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="pocketflow-postgres-"))
    base.chmod(0o755)
    as_server_user: list = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"

    def run(*command: str) -> None:
        subprocess.run([*as_server_user, *command], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "pocketflow", "--auth=trust", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="pocketflow", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE DATABASE studies")
        # The server trusts loopback, so any password works: it is there to check that none is shown.
        yield f"postgresql://pocketflow:secret@127.0.0.1:{port}/studies"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_server_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'study.db'}"
    return request.getfixturevalue("postgres_url")


def test_two_searchers_share_one_study_and_split_its_trials(tmp_path, shared_storage):
    """Two main.py processes, started together, one --storage/--study-name, --trials 6 each: 6 in all."""
    (tmp_path / "shared").mkdir()
    budget = 6
    common = ["--learner=channel", "--target-speedup=2.5", "--trials", str(budget), "--epochs", "2",
              "--finetune-epochs", "0", "--export", "none", "--storage", shared_storage, "--study-name", "shared"]
    searchers = [subprocess.Popen([sys.executable, str(ROOT / "main.py"), *common, "--output-dir",
                                   str(tmp_path / f"searcher{index}")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_environment())
                 for index in range(2)]
    outputs = [searcher.communicate(timeout=600) for searcher in searchers]
    for searcher, (_, stderr) in zip(searchers, outputs):
        assert searcher.returncode == 0, stderr[-3000:]

    study = optuna.load_study(study_name="shared", storage=shared_storage)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * budget  # the total, none over it, none lost
    assert sorted(t.number for t in trials) == list(range(budget))
    signatures = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(signatures)) == budget, "two searchers ran the same parameters"
    assert sum(bool(t.user_attrs.get("reference")) for t in trials) == 1  # the reference trial queued once
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert workers and workers <= {str(s.pid) for s in searchers}  # which one ran how many is timing
    reports = [json.loads((tmp_path / f"searcher{i}" / "report.json").read_text()) for i in range(2)]
    assert max(r["trials"]["completed"] for r in reports) == budget
    assert all(r["best"] is not None for r in reports)
    for index, report in enumerate(reports):  # the storage URL is shown without its password
        assert "secret" not in json.dumps(report)
        assert "secret" not in (tmp_path / f"searcher{index}" / "run.log").read_text()
    print(f"{shared_storage.split(':')[0]}: trials per searcher "
          f"{[sum(t.user_attrs['worker'].endswith(f':{s.pid}') for t in trials) for s in searchers]}")
