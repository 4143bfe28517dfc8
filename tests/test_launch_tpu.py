"""launch_tpu.sh against a fake `gcloud` that records its argv.

The remote commands the launcher sends with `tpu-vm ssh --command` are also
run here with bash, in a fake home directory, to check that they do what they
say (unpack, install once, start the trainer with its arguments intact).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"
# setup ships `git archive HEAD`, so its tests need this checkout's history.
needs_git = pytest.mark.skipif(not (REPO / ".git").exists(),
                               reason="not a git checkout")
ZONE = "us-central2-b"
BASE = ["--name=rn50", f"--zone={ZONE}"]
TRAIN_ARGS = ["--config=configs/imagenet_resnet50.py",
              "--workdir=gs://my-bucket/runs/rn50"]
# Overrides that break naive quoting: spaces, both quotes, $, backquotes.
TRICKY = ["--config.dataset.data_dir=gs://my-bucket/tfds dir",
          "--config.dataset.train_split=it's \"quoted\" $HOME `date` \\ *"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(args) + "\\n")
if "scp" in args:  # Keep what was sent, to look inside.
  shutil.copy(args[args.index("scp") + 1], os.environ["FAKE_GCLOUD_SCP_DIR"])
# FAKE_GCLOUD_RULES: [[words, [[exit, stdout], ...]], ...]; the first rule whose
# words all occur in argv answers; its responses are used in turn, the last
# one repeating. Without a rule, `describe` is "not found" (exit 1).
rules = json.loads(os.environ.get("FAKE_GCLOUD_RULES", "[]"))
for i, (words, responses) in enumerate(rules):
  if all(w in args for w in words):
    counter = f"{{log}}.rule{{i}}"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    code, out = responses[min(n, len(responses) - 1)]
    sys.stdout.write(out)
    sys.exit(code)
if "describe" in args:
  print("ERROR: (gcloud) NOT_FOUND", file=sys.stderr)
  sys.exit(1)
"""


class Fake:
  """A bin/ with the fake gcloud first on PATH, and what it recorded."""

  def __init__(self, tmp_path):
    self.dir = tmp_path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    self.log = tmp_path / "gcloud.log"
    self.scp_dir = tmp_path / "scp"
    self.scp_dir.mkdir()
    self.env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    FAKE_GCLOUD_LOG=str(self.log),
                    FAKE_GCLOUD_SCP_DIR=str(self.scp_dir))

  def run(self, *args, rules=None):
    env = dict(self.env, FAKE_GCLOUD_RULES=json.dumps(rules or []))
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=self.dir)

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def fake(tmp_path):
  return Fake(tmp_path)


def ok(result):
  assert result.returncode == 0, result.stderr
  return result


def tpus(*args):
  return ["compute", "tpus", *args]


def describe():
  return tpus("tpu-vm", "describe", "rn50", f"--zone={ZONE}",
              "--format=value(state,acceleratorType)")


def ssh(command, worker="all"):
  return tpus("tpu-vm", "ssh", "rn50", f"--zone={ZONE}", f"--worker={worker}",
              f"--command={command}")


def remote_command(call):
  """The --command string of a recorded `tpu-vm ssh` call."""
  assert call[:4] == tpus("tpu-vm", "ssh"), call
  (command,) = [a[len("--command="):] for a in call if a.startswith("--command=")]
  return command


def run_remote(command, home, path_dirs=(), **kwargs):
  """Runs a remote command as the worker's shell would, in a fake home."""
  env = dict(os.environ, HOME=str(home),
             PATH=os.pathsep.join([*map(str, path_dirs), os.environ["PATH"]]))
  return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                        env=env, cwd=home, timeout=60, **kwargs)


# --- create ----------------------------------------------------------------


def test_create_pod(fake):
  r = ok(fake.run("create", *BASE, "--accelerator=v4-256"))
  assert fake.calls() == [
      describe(),
      tpus("tpu-vm", "create", "rn50", f"--zone={ZONE}",
           "--accelerator-type=v4-256", "--version=tpu-ubuntu2204-base")]
  assert r.stdout == ""


def test_create_spot_v5e_with_project(fake):
  ok(fake.run("create", *BASE, "--accelerator", "v5litepod-16", "--spot",
              "--project", "my-proj"))
  assert fake.calls() == [
      [*describe(), "--project=my-proj"],
      tpus("tpu-vm", "create", "rn50", f"--zone={ZONE}",
           "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
           "--spot", "--project=my-proj")]


def test_create_preemptible_with_explicit_runtime(fake):
  ok(fake.run("create", *BASE, "--accelerator=v4-8", "--preemptible",
              "--runtime_version=tpu-vm-base"))
  assert fake.calls()[1] == tpus(
      "tpu-vm", "create", "rn50", f"--zone={ZONE}", "--accelerator-type=v4-8",
      "--version=tpu-vm-base", "--preemptible")


def test_create_queued_waits_until_active(fake):
  states = [[1, ""], [0, "WAITING_FOR_RESOURCES\n"], [0, "PROVISIONING\n"],
            [0, "ACTIVE\n"]]
  r = ok(fake.run("create", *BASE, "--accelerator=v5p-128", "--queued",
                  "--spot", "--poll_seconds=0",
                  rules=[[["queued-resources", "describe"], states]]))
  qr_describe = tpus("queued-resources", "describe", "rn50", f"--zone={ZONE}",
                     "--format=value(state.state)")
  assert fake.calls() == [
      qr_describe,
      tpus("queued-resources", "create", "rn50", "--node-id=rn50",
           f"--zone={ZONE}", "--accelerator-type=v5p-128",
           "--runtime-version=v2-alpha-tpuv5", "--spot"),
      qr_describe, qr_describe, qr_describe]
  assert "WAITING_FOR_RESOURCES" in r.stderr and "is ACTIVE" in r.stderr


def test_create_queued_failed_stops(fake):
  r = fake.run("create", *BASE, "--accelerator=v4-32", "--queued",
               "--poll_seconds=0",
               rules=[[["queued-resources", "describe"], [[1, ""], [0, "FAILED\n"]]]])
  assert r.returncode == 1
  assert "queued resource rn50 is FAILED" in r.stderr
  assert "delete --queued" in r.stderr


def test_create_reuses_existing_tpu(fake):
  r = ok(fake.run("create", *BASE, "--accelerator=v4-256",
                  rules=[[["describe"], [[0, "READY\tv4-256\n"]]]]))
  assert fake.calls() == [describe()]  # No create call.
  assert "reusing TPU rn50 (READY, v4-256)" in r.stderr


def test_create_refuses_existing_tpu_of_another_type(fake):
  r = fake.run("create", *BASE, "--accelerator=v4-256",
               rules=[[["describe"], [[0, "READY\tv4-8\n"]]]])
  assert r.returncode == 1
  assert "exists with accelerator v4-8, not v4-256" in r.stderr
  assert fake.calls() == [describe()]


def test_create_refuses_preempted_tpu(fake):
  r = fake.run("create", *BASE, "--accelerator=v4-256",
               rules=[[["describe"], [[0, "PREEMPTED\tv4-256\n"]]]])
  assert r.returncode == 1
  assert "TPU rn50 is PREEMPTED; run ./launch_tpu.sh delete" in r.stderr
  assert fake.calls() == [describe()]


# --- setup -----------------------------------------------------------------


FAKE_PYTHON311 = """#!/bin/bash
# `python3.11 -m venv DIR` makes DIR/bin/python, which records its arguments.
echo "$*" >> "$HOME/python3.11.calls"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\\necho "$*" >> "$HOME/venv-python.calls"\\n' > "$3/bin/python"
  chmod +x "$3/bin/python"
fi
"""


@needs_git
def test_setup_copies_the_tree_and_installs_idempotently(fake, tmp_path):
  ok(fake.run("setup", *BASE))
  calls = fake.calls()
  assert len(calls) == 2
  scp, install = calls
  tarball = scp[4]
  assert scp == tpus("tpu-vm", "scp", tarball, "rn50:grow-batch.tar.gz",
                     f"--zone={ZONE}", "--worker=all")
  assert Path(tarball).name == "grow-batch.tar.gz"
  assert not Path(tarball).exists()  # The local temporary is cleaned up.
  with tarfile.open(fake.scp_dir / "grow-batch.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"setup.py", "trainer/main.py", "configs/imagenet_resnet50.py"} <= names
  command = remote_command(install)
  assert install == ssh(command)

  home = tmp_path / "home"
  home.mkdir()
  fake_bin = tmp_path / "worker-bin"
  fake_bin.mkdir()
  (fake_bin / "python3.11").write_text(FAKE_PYTHON311)
  (fake_bin / "python3.11").chmod(0o755)
  pip = ("-m pip install --quiet -e ./grow-batch[gcs] jax[tpu] "
         "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
  for attempt in (1, 2):  # A second setup reuses the virtual environment.
    shutil.copy(fake.scp_dir / "grow-batch.tar.gz", home)
    r = run_remote(command, home, [fake_bin])
    assert r.returncode == 0, r.stderr
    assert "grow-batch installed on" in r.stdout
    assert (home / "grow-batch" / "trainer" / "main.py").is_file()
    assert not (home / "grow-batch.tar.gz").exists()
    assert not (home / "grow-batch.new").exists()
    assert (home / "python3.11.calls").read_text().splitlines() == [
        "-m venv grow-batch-venv"]
    assert (home / "venv-python.calls").read_text().splitlines() == [
        "-m pip install --quiet --upgrade pip", pip] * attempt


@needs_git
def test_setup_refuses_while_training_runs(fake, tmp_path):
  ok(fake.run("setup", *BASE))
  command = remote_command(fake.calls()[1])
  home = tmp_path / "home"
  (home / "grow-batch").mkdir(parents=True)
  shutil.copy(fake.scp_dir / "grow-batch.tar.gz", home)
  trainer = subprocess.Popen(["sleep", "30"])
  try:
    (home / "grow-batch-train.pid").write_text(f"{trainer.pid}\n")
    r = run_remote(command, home)
  finally:
    trainer.kill()
    trainer.wait()
  assert r.returncode == 1
  assert "training is running on" in r.stderr and "stop it first" in r.stderr
  assert list((home / "grow-batch").iterdir()) == []  # Left untouched.


@needs_git
def test_setup_options_reach_the_install_command(fake):
  commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  options = ["--python=python3.12", "--jax_package=jax[tpu]==0.10.2",
             "--libtpu_url=https://example.com/libtpu.html", f"--ref={commit}"]
  dry = ok(fake.run("setup", *BASE, *options, "--dry_run"))
  git = shlex.split(dry.stdout.splitlines()[0])
  assert git[:3] == ["git", "-C", str(REPO)] and git[-1] == commit
  ok(fake.run("setup", *BASE, *options))
  command = remote_command(fake.calls()[1])
  words = shlex.split(command.replace(";", " ; "))
  assert words.count("python3.12") >= 2 and "python3.12-venv" in words
  i = words.index("./grow-batch[gcs]")
  assert words[i + 1:i + 4] == ["jax[tpu]==0.10.2", "-f",
                                "https://example.com/libtpu.html"]


# --- train -----------------------------------------------------------------


FAKE_TRAINER = """#!{python}
import json, os, sys, time
home = os.environ["HOME"]
with open(os.path.join(home, "argv.json.tmp"), "w") as f:
  json.dump(sys.argv[1:], f)
os.replace(os.path.join(home, "argv.json.tmp"), os.path.join(home, "argv.json"))
print("fake trainer running in", os.getcwd())
deadline = time.time() + 30
while os.path.exists(os.path.join(home, "hold")) and time.time() < deadline:
  time.sleep(0.05)
"""


def fake_worker_home(tmp_path):
  home = tmp_path / "home"
  (home / "grow-batch").mkdir(parents=True)
  (home / "grow-batch-venv" / "bin").mkdir(parents=True)
  trainer = home / "grow-batch-venv" / "bin" / "python"
  trainer.write_text(FAKE_TRAINER.format(python=sys.executable))
  trainer.chmod(0o755)
  return home


def wait_for(path, seconds=20):
  deadline = time.time() + seconds
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_train_passes_overrides_intact(fake, tmp_path):
  ok(fake.run("train", *BASE, *TRAIN_ARGS, *TRICKY, "--",
              "--allow_config_change", "it's after --"))
  (call,) = fake.calls()
  command = remote_command(call)
  assert call == ssh(command)

  home = fake_worker_home(tmp_path)
  (home / "hold").touch()  # Keeps the fake trainer alive.
  try:
    r = run_remote(command, home)
    assert r.returncode == 0, r.stderr
    assert "training started on" in r.stdout
    wait_for(home / "argv.json")
    argv = json.loads((home / "argv.json").read_text())
    assert argv == ["-m", "trainer.main", "--multihost", *TRAIN_ARGS, *TRICKY,
                    "--allow_config_change", "it's after --"]
    pid = int((home / "grow-batch-train.pid").read_text())
    os.kill(pid, 0)  # The pid file names the running trainer.
    # A second start on a busy worker is refused.
    again = run_remote(command, home)
    assert again.returncode == 1
    assert "error: training is running on" in again.stderr
  finally:
    (home / "hold").unlink()
  deadline = time.time() + 20
  while "fake trainer running" not in (home / "grow-batch-train.log").read_text():
    assert time.time() < deadline
    time.sleep(0.05)
  log = (home / "grow-batch-train.log").read_text().splitlines()
  assert log[0].startswith("== ") and "trainer.main" in log[0]
  assert f"fake trainer running in {home / 'grow-batch'}" in log


def test_train_without_setup_says_so(fake, tmp_path):
  ok(fake.run("train", *BASE, *TRAIN_ARGS))
  home = tmp_path / "home"
  home.mkdir()
  r = run_remote(remote_command(fake.calls()[0]), home)
  assert r.returncode == 1
  assert "no ~/grow-batch-venv" in r.stderr and "run setup first" in r.stderr


# --- logs, stop, delete ----------------------------------------------------


def test_logs_of_worker_0(fake, tmp_path):
  ok(fake.run("logs", *BASE, "--lines=3"))
  (call,) = fake.calls()
  command = remote_command(call)
  assert call == ssh(command, worker="0")
  home = tmp_path / "home"
  home.mkdir()
  (home / "grow-batch-train.log").write_text(
      "".join(f"line {i}\n" for i in range(10)))
  r = run_remote(command, home)
  assert r.stdout.splitlines() == ["line 7", "line 8", "line 9"]


def test_logs_of_all_workers_name_the_host(fake, tmp_path):
  ok(fake.run("logs", *BASE, "--worker=all", "--lines", "2"))
  command = remote_command(fake.calls()[0])
  assert fake.calls()[0] == ssh(command, worker="all")
  home = tmp_path / "home"
  home.mkdir()
  (home / "grow-batch-train.log").write_text("a\nb\nc\n")
  r = run_remote(command, home)
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  assert r.stdout.splitlines() == [f"{host}: b", f"{host}: c"]


def test_logs_follow_streams(fake):
  ok(fake.run("logs", *BASE, "--follow", "--worker=1"))
  command = remote_command(fake.calls()[0])
  assert fake.calls()[0] == ssh(command, worker="1")
  assert shlex.split(command) == ["tail", "-n", "50", "-F",
                                  "$HOME/grow-batch-train.log"]


def test_stop_terminates_the_trainer(fake, tmp_path):
  ok(fake.run("stop", *BASE))
  command = remote_command(fake.calls()[0])
  assert fake.calls()[0] == ssh(command)
  home = tmp_path / "home"
  home.mkdir()
  trainer = subprocess.Popen(["sleep", "30"])
  try:
    (home / "grow-batch-train.pid").write_text(f"{trainer.pid}\n")
    r = run_remote(command, home)
    assert "stopped training on" in r.stdout
    assert trainer.wait(timeout=10) == -15
  finally:
    if trainer.poll() is None:
      trainer.kill()
  r = run_remote(command, home)
  assert "no training running on" in r.stdout


def test_delete(fake):
  ok(fake.run("delete", *BASE))
  assert fake.calls() == [tpus("tpu-vm", "delete", "rn50", f"--zone={ZONE}",
                               "--quiet")]


def test_delete_queued(fake):
  ok(fake.run("delete", *BASE, "--queued"))
  assert fake.calls() == [tpus("queued-resources", "delete", "rn50",
                               f"--zone={ZONE}", "--force", "--quiet")]


# --- all and --dry_run -----------------------------------------------------


def normalise(argv):
  """Replaces the temporary tarball's path, which differs between runs."""
  return ["TARBALL" if a.endswith("/grow-batch.tar.gz") else a for a in argv]


@needs_git
def test_dry_run_prints_what_all_runs_and_calls_nothing(fake):
  args = ["all", *BASE, "--accelerator=v4-256", *TRAIN_ARGS, *TRICKY]
  dry = ok(fake.run(*args, "--dry_run"))
  assert fake.calls() == []
  printed = [shlex.split(line) for line in dry.stdout.splitlines()]
  git = [p for p in printed if p[0] == "git"]
  assert len(git) == 1 and git[0][:3] == ["git", "-C", str(REPO)]
  assert git[0][-1] == "HEAD"
  printed = [p for p in printed if p[0] != "git"]
  assert all(p[0] == "gcloud" for p in printed)

  ok(fake.run(*args))
  ran = fake.calls()
  assert [c[:4] for c in ran] == [
      tpus("tpu-vm", "describe"), tpus("tpu-vm", "create"),
      tpus("tpu-vm", "scp"), tpus("tpu-vm", "ssh"), tpus("tpu-vm", "ssh")]
  assert [normalise(p[1:]) for p in printed] == [normalise(c) for c in ran]


def test_dry_run_of_queued_create(fake):
  r = ok(fake.run("create", *BASE, "--accelerator=v4-32", "--queued",
                  "--dry_run"))
  assert fake.calls() == []
  assert [shlex.split(line)[1:5] for line in r.stdout.splitlines()] == [
      tpus("queued-resources", "describe"), tpus("queued-resources", "create"),
      tpus("queued-resources", "describe")]


# --- bad arguments ---------------------------------------------------------


BAD = [
    (["create", *BASE, "--accelerator=v4-8", "--bogus"], "unknown option --bogus"),
    (["create", *BASE, "--accelerator=v4-8", "--bogus=1"], "unknown option --bogus"),
    (["create", "--zone=z", "--accelerator=v4-8"], "--name is required by create"),
    (["create", "--name=a", "--accelerator=v4-8"], "--zone is required by create"),
    (["create", *BASE], "--accelerator is required by create"),
    (["all", *BASE, *TRAIN_ARGS], "--accelerator is required by all"),
    (["frobnicate", *BASE], "unknown subcommand 'frobnicate'"),
    ([*BASE], "a subcommand is required"),
    (["train", *BASE, "--config=configs/imagenet_resnet50.py"],
     "--workdir is required by train"),
    (["train", *BASE, "--workdir=gs://b/w"], "--config is required by train"),
    (["train", *BASE, "--config=configs/nope.py", "--workdir=gs://b/w"],
     "--config=configs/nope.py: no such file"),
    (["create", *BASE, "--accelerator"], "--accelerator needs a value"),
    (["create", *BASE, "--accelerator="], "--accelerator is empty"),
    (["create", "--name", "--zone", ZONE, "--accelerator=v4-8"],
     "--name needs a value"),
    (["create", *BASE, "--accelerator=v4-8", "--spot=yes"], "--spot takes no value"),
    (["create", *BASE, "--accelerator=v4-8", "--spot", "--preemptible"],
     "--spot and --preemptible exclude each other"),
    (["create", *BASE, "--accelerator=v4-8", "--queued", "--preemptible"],
     "--preemptible does not apply to --queued"),
    (["create", *BASE, "--accelerator=x9-8"],
     "no default runtime version for --accelerator=x9-8"),
    (["create", "--name=My_TPU", f"--zone={ZONE}", "--accelerator=v4-8"],
     "--name=My_TPU must be lowercase letters"),
    (["logs", *BASE, "--worker=first"], "--worker=first must be a worker index"),
    (["logs", *BASE, "--lines=0"], "--lines=0 must be a positive integer"),
    (["logs", *BASE, "extra"], "unexpected argument 'extra' after subcommand logs"),
    (["create", *BASE, "--accelerator=v4-8", "--queued", "--poll_seconds=soon"],
     "--poll_seconds=soon must be a whole number"),
    (["train", *BASE, *TRAIN_ARGS, "--", "--dry_run"],
     "--dry_run after -- would go to trainer.main, and the commands would "
     "run; put it before --"),
]


if (REPO / ".git").exists():
  BAD.append((["setup", *BASE, "--ref=no-such-branch"],
              "--ref=no-such-branch is not a commit of the git repository"))


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_argument_is_one_line_and_exit_2(fake, args, message):
  r = fake.run(*args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("launch_tpu.sh: error: ") and message in lines[0]
  assert lines[0].endswith("(see ./launch_tpu.sh --help)")
  assert r.stdout == "" and fake.calls() == []


# A config the trainer would refuse on every worker is refused here, by the
# planner, before anything is created.
CONFIG_BAD = [
    (["all", *BASE, "--accelerator=v4-256", *TRAIN_ARGS,
      "--config.schedule.kindd=x"],
     "--config.schedule.kindd: 'kindd' is not a config field (did you mean 'kind'?)"),
    (["all", *BASE, "--accelerator=v4-8", *TRAIN_ARGS],  # 4 devices.
     "max_device_batch=320 does not divide the per-device batch 2048 "
     "(B=8192 over 4 devices)"),
    (["train", *BASE, "--config=configs/fashion_mnist.py:smok",
      "--workdir=gs://b/w"], "unknown config variant 'smok'; known: smoke"),
]


@pytest.mark.parametrize("args,message", CONFIG_BAD, ids=[m for _, m in CONFIG_BAD])
def test_config_the_planner_refuses_stops_before_create(fake, args, message):
  r = fake.run(*args)
  assert r.returncode == 2, r.stderr
  assert r.stderr == (
      f"launch_tpu.sh: error: trainer.plan refused the config: {message}\n")
  assert r.stdout == "" and fake.calls() == []


def test_config_check_is_skipped_with_a_note_without_the_project(fake):
  fake.env["LOCAL_PYTHON"] = "false"
  r = ok(fake.run("create", *BASE, "--accelerator=v4-8"))  # No config: none.
  assert "not checking" not in r.stderr
  r = ok(fake.run("train", *BASE, *TRAIN_ARGS, "--config.schedule.kindd=x"))
  assert ("launch_tpu.sh: not checking --config here: false cannot import "
          "trainer.plan") in r.stderr


def test_a_local_workdir_on_several_hosts_is_warned_about(fake):
  args = ["--config=configs/fashion_mnist.py", "--workdir=/tmp/run", "--dry_run"]
  r = ok(fake.run("all", *BASE, "--accelerator=v4-16", *args))  # 2 hosts.
  assert ("launch_tpu.sh: warning: --workdir=/tmp/run is on each worker's own "
          "disk; the 2 hosts of v4-16 need one they share") in r.stderr
  r = ok(fake.run("all", *BASE, "--accelerator=v4-8", *args))  # 1 host.
  assert "warning: --workdir" not in r.stderr


def test_help_documents_every_option_and_subcommand(fake):
  r = ok(fake.run("--help"))
  text = r.stdout
  options = ["--name", "--zone", "--project", "--accelerator",
             "--runtime_version", "--spot", "--preemptible", "--queued",
             "--poll_seconds", "--ref", "--python", "--jax_package",
             "--libtpu_url", "--config", "--workdir", "--config.FIELD=VALUE",
             "--worker", "--lines", "--follow", "--dry_run", "--help"]
  for option in options:
    assert f"\n  {option}" in text or f", {option}" in text, option
  for sub in ["create", "setup", "train", "logs", "stop", "delete", "all"]:
    assert f"\n  {sub} " in text, sub
  assert "jax.distributed" in text and "no extra flag" in text
  assert "git archive" in text and "-- TRAINER_FLAGS" in text
  # Every value option the parser knows is documented.
  source = SCRIPT.read_text()
  parser = source[source.index("option_variable() {"):]
  parser = parser[:parser.index("esac")]
  for word in parser.replace("\\", " ").replace("|", " ").replace(")", " ").split():
    if word.startswith("--"):
      assert f"  {word}=" in text, word
  assert fake.calls() == []


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
