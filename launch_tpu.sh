#!/usr/bin/env bash
# Cloud TPU launcher: create a TPU VM or pod slice, install this project on
# every worker, train on all workers at once, read the logs, delete it.
# Run `./launch_tpu.sh --help` for the subcommands and options.
set -euo pipefail

readonly PROG="launch_tpu.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_ROOT
# Paths on every worker, relative to the remote home directory.
readonly REMOTE_DIR="grow-batch"
readonly REMOTE_VENV="grow-batch-venv"
readonly REMOTE_TARBALL="grow-batch.tar.gz"
readonly REMOTE_LOG="grow-batch-train.log"
readonly REMOTE_PID="grow-batch-train.pid"
readonly DEFAULT_LIBTPU_URL="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

usage() {
  cat <<EOF
Usage: ./$PROG SUBCOMMAND --name=NAME --zone=ZONE [OPTIONS]
                     [--config.FIELD=VALUE ...] [-- TRAINER_FLAGS ...]

Runs this project on a Cloud TPU VM or pod slice with gcloud (installed and
logged in locally, with a default project or --project).

Subcommands:
  create   Create the TPU (tpu-vm create, or a queued resource with --queued)
           unless one of that name exists already (tpu-vm describe succeeds;
           with --queued: queued-resources describe), then wait until a queued
           resource is ACTIVE. Needs --accelerator.
  setup    Copy the code to every worker and install it. The code is a
           tarball of the committed tree (\`git archive REF\`: uncommitted
           changes are NOT copied), sent with \`tpu-vm scp --worker=all\` and
           unpacked into ~/$REMOTE_DIR, replacing it. Then, idempotently:
           a virtual environment ~/$REMOTE_VENV made with --python
           (PYTHON-venv is apt-installed if venv fails), and
           \`pip install -e ~/${REMOTE_DIR}[gcs] JAX_PACKAGE -f LIBTPU_URL\`
           (JAX's version range comes from setup.py).
  train    First, on this machine, plan the config with its overrides
           (\`python -m trainer.plan --num_devices=\` the slice's devices,
           with \$LOCAL_PYTHON, default python3; skipped with a note if it
           cannot import the project): a config that cannot run stops here,
           before create. Then start \`python -m trainer.main --multihost
           --config=CONFIG --workdir=WORKDIR [--config.FIELD=VALUE ...]\`
           under nohup on all workers at once
           (tpu-vm ssh --worker=all). Each worker appends the output to
           ~/$REMOTE_LOG and keeps the trainer's pid in
           ~/$REMOTE_PID; a worker where training still runs refuses
           to start another. On a pod slice no extra flag is needed: every
           worker runs the same command and JAX finds the other hosts
           through the TPU runtime (no coordinator address, process count
           or id; on Cloud TPU jax.distributed needs none). Rerunning train
           with the same --workdir resumes from its latest checkpoint.
  logs     Print the last --lines of the training log of --worker (default 0;
           'all' prefixes each line with the worker's hostname); --follow
           keeps streaming.
  stop     Send SIGTERM to the trainer on every worker (pid file); train
           again to resume from the workdir's latest checkpoint.
  delete   Delete the TPU (with --queued: the queued resource and its node).
  all      create, setup, then train.

Options (--opt=VALUE and --opt VALUE both work):
  --name=NAME              TPU name (lowercase letters, digits, '-'). Required.
  --zone=ZONE              Zone, e.g. us-central2-b. Required.
  --project=PROJECT        gcloud project (default: gcloud's configured one).
  --accelerator=TYPE       Accelerator type, e.g. v4-8, v4-256, v5litepod-256,
                           v5p-128, v6e-64. Required by create and all.
  --runtime_version=V      TPU software version. Default by generation:
                           v2/v3/v4: tpu-ubuntu2204-base, v5litepod:
                           v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                           v6e: v2-alpha-tpuv6e.
  --spot                   Create a Spot TPU (preemptible at any time).
  --preemptible            Create a preemptible TPU (tpu-vm only).
  --queued                 Use a queued resource (queued-resources create
                           with --node-id=NAME; create waits until ACTIVE).
                           Pass it to delete too.
  --poll_seconds=S         Seconds between queued-resource state checks (60).
  --ref=REF                Git commit or branch that setup copies (HEAD).
  --python=PY              Remote interpreter for the venv (python3.11;
                           JAX needs Python >= 3.11).
  --jax_package=SPEC       JAX requirement with the TPU extra (jax[tpu]).
  --libtpu_url=URL         pip --find-links for libtpu; default:
      $DEFAULT_LIBTPU_URL
  --config=PATH[:VARIANT]  Experiment config, relative to the repository,
                           e.g. configs/imagenet_resnet50.py. Required by
                           train and all.
  --workdir=DIR            Trainer workdir (checkpoints, metrics). On a pod
                           every worker must see the same directory, e.g.
                           gs://BUCKET/runs/NAME. Required by train and all.
  --config.FIELD=VALUE     Config override, passed to the trainer unchanged
                           (values with spaces or quotes arrive intact).
  -- TRAINER_FLAGS         Everything after -- goes to trainer.main unchanged,
                           e.g. -- --allow_config_change.
  --worker=W               Worker(s) for logs: 0-based index, list (1,4),
                           range (1-3) or all. Default 0.
  --lines=N                Log lines to show (50).
  --follow                 logs: keep streaming (tail -F) until interrupted.
  --dry_run                Print the commands (one per line, shell-quoted)
                           instead of running them, assuming that the TPU does
                           not exist yet and that a queued resource becomes
                           ACTIVE. Runs no gcloud.
  -h, --help               Show this help.

Example (ImageNet ResNet-50 on a v4-256 pod slice):
  ./$PROG all --name=rn50 --zone=us-central2-b --accelerator=v4-256 \\
      --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/runs/rn50 \\
      --config.dataset.data_dir=gs://BUCKET/tfds --config.eval_batch_size=1024
  ./$PROG logs --name=rn50 --zone=us-central2-b --follow
  ./$PROG delete --name=rn50 --zone=us-central2-b
Bad arguments print one line and exit with status 2.
EOF
}

usage_error() {
  echo "$PROG: error: $1 (see ./$PROG --help)" >&2
  exit 2
}

fail() {
  echo "$PROG: error: $1" >&2
  exit 1
}

note() {
  echo "$PROG: $1" >&2
}

# --- Arguments --------------------------------------------------------------

subcommand=""
name=""
zone=""
project=""
accelerator=""
runtime_version=""
spot=0
preemptible=0
queued=0
poll_seconds=60
ref="HEAD"
python="python3.11"
# This machine's Python, for checking the config before anything is created.
local_python="${LOCAL_PYTHON:-python3}"
jax_package="jax[tpu]"
libtpu_url="$DEFAULT_LIBTPU_URL"
config=""
workdir=""
worker="0"
lines=50
follow=0
dry_run=0
overrides=()
trainer_flags=()

# The variable that holds a value option; fails for anything else. (No
# associative array: macOS still ships bash 3.2.)
option_variable() {
  case "$1" in
    --name | --zone | --project | --accelerator | --runtime_version | \
      --poll_seconds | --ref | --python | --jax_package | --libtpu_url | \
      --config | --workdir | --worker | --lines) echo "${1#--}" ;;
    *) return 1 ;;
  esac
}

parse_args() {
  local option value variable
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --spot) spot=1 ;;
      --preemptible) preemptible=1 ;;
      --queued) queued=1 ;;
      --follow) follow=1 ;;
      --dry_run) dry_run=1 ;;
      --config.*) overrides+=("$1") ;;
      --)
        shift
        trainer_flags=("$@")
        break
        ;;
      --spot=* | --preemptible=* | --queued=* | --follow=* | --dry_run=* | --help=*)
        usage_error "${1%%=*} takes no value"
        ;;
      --*=*)
        option="${1%%=*}"
        value="${1#*=}"
        variable="$(option_variable "$option")" || usage_error "unknown option $option"
        [[ -n "$value" ]] || usage_error "$option is empty"
        printf -v "$variable" '%s' "$value"
        ;;
      --*)
        option="$1"
        variable="$(option_variable "$option")" || usage_error "unknown option $option"
        if (($# < 2)) || [[ "$2" == --* ]]; then usage_error "$option needs a value"; fi
        [[ -n "$2" ]] || usage_error "$option is empty"
        printf -v "$variable" '%s' "$2"
        shift
        ;;
      -*) usage_error "unknown option $1" ;;
      *)
        [[ -z "$subcommand" ]] || usage_error "unexpected argument '$1' after subcommand $subcommand"
        subcommand="$1"
        ;;
    esac
    shift
  done
}

default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# slice_shape ACCELERATOR: "DEVICES HOSTS", the devices JAX sees on the
# slice (TensorCores on v2/v3; chips elsewhere, a v4 or v5p chip being one
# megacore device) and its hosts; fails for a name it does not know.
slice_shape() {
  local kind="${1%-*}" n="${1##*-}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || return 1
  case "$kind" in
    v2 | v3) echo "$n $(((n + 7) / 8))" ;;
    v4 | v5p) echo "$((n / 2)) $(((n / 2 + 3) / 4))" ;;
    v5litepod | v6e) echo "$n $(((n + 7) / 8))" ;;
    *) return 1 ;;
  esac
}

# The planner, run here: a config or override that cannot run fails in
# seconds, not on every worker after the slice is paid for. It needs this
# project's dependencies on this machine; without them the workers check.
check_config() {
  local shape devices=() error
  if shape="$(slice_shape "$accelerator")"; then
    devices=("--num_devices=${shape%% *}")
  fi
  if ! (cd "$REPO_ROOT" && "$local_python" -c "import trainer.plan" 2>/dev/null); then
    note "not checking --config here: $local_python cannot import trainer.plan (pip install -e $REPO_ROOT)"
    return 0
  fi
  if ! error="$(cd "$REPO_ROOT" && "$local_python" -m trainer.plan "--config=$config" \
    ${overrides[@]+"${overrides[@]}"} ${devices[@]+"${devices[@]}"} 2>&1 >/dev/null)"; then
    error="${error##*$'\n'}"
    echo "$PROG: error: trainer.plan refused the config: ${error#error: }" >&2
    exit 2
  fi
  if [[ -n "$shape" && "${shape##* }" -gt 1 && "$workdir" != *://* ]]; then
    note "warning: --workdir=$workdir is on each worker's own disk; the ${shape##* } hosts of $accelerator need one they share (gs://BUCKET/...) unless that path is a shared mount"
  fi
}

require() {  # require VALUE OPTION: OPTION is needed by the subcommand.
  [[ -n "$1" ]] || usage_error "$2 is required by $subcommand"
}

validate() {
  case "$subcommand" in
    create | setup | train | logs | stop | delete | all) ;;
    "") usage_error "a subcommand is required: create, setup, train, logs, stop, delete or all" ;;
    *) usage_error "unknown subcommand '$subcommand'; use create, setup, train, logs, stop, delete or all" ;;
  esac
  require "$name" --name
  require "$zone" --zone
  [[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name=$name must be lowercase letters, digits and '-', starting with a letter"
  ((spot + preemptible < 2)) || usage_error "--spot and --preemptible exclude each other"
  ((queued + preemptible < 2)) || usage_error "--preemptible does not apply to --queued; use --spot"
  [[ "$worker" =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] ||
    usage_error "--worker=$worker must be a worker index, list (1,4), range (1-3) or all"
  [[ "$lines" =~ ^[1-9][0-9]*$ ]] || usage_error "--lines=$lines must be a positive integer"
  [[ "$poll_seconds" =~ ^[0-9]+$ ]] || usage_error "--poll_seconds=$poll_seconds must be a whole number"
  if [[ "$subcommand" == create || "$subcommand" == all ]]; then
    require "$accelerator" --accelerator
    if [[ -z "$runtime_version" ]]; then
      runtime_version="$(default_runtime_version "$accelerator")" ||
        usage_error "no default runtime version for --accelerator=$accelerator; pass --runtime_version"
    fi
  fi
  if [[ "$subcommand" == setup || "$subcommand" == all ]]; then
    git -C "$REPO_ROOT" rev-parse --verify --quiet "$ref^{commit}" >/dev/null 2>&1 ||
      usage_error "--ref=$ref is not a commit of the git repository $REPO_ROOT"
  fi
  if [[ "$subcommand" == train || "$subcommand" == all ]]; then
    require "$config" --config
    require "$workdir" --workdir
    [[ -f "$REPO_ROOT/${config%%:*}" ]] ||
      usage_error "--config=$config: no such file in $REPO_ROOT"
    local flag
    for flag in ${trainer_flags[@]+"${trainer_flags[@]}"}; do
      [[ "$flag" != --dry_run* ]] ||
        usage_error "--dry_run after -- would go to trainer.main, and the commands would run; put it before --"
    done
    check_config
  fi
}

# --- Running commands -------------------------------------------------------

# The arguments as one line that a POSIX shell splits back into exactly
# them: plain words bare, anything else in single quotes (' becomes '\'').
quoted() {
  local arg rest word line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="$arg"
    else
      word="'"
      rest="$arg"
      while [[ "$rest" == *"'"* ]]; do
        word+="${rest%%"'"*}'\\''"
        rest="${rest#*"'"}"
      done
      word+="$rest'"
    fi
    line+="${line:+ }$word"
  done
  printf '%s\n' "$line"
}

run() {  # Runs a command, or prints it under --dry_run.
  if ((dry_run)); then
    quoted "$@"
  else
    "$@"
  fi
}

tpus() {  # gcloud compute tpus ARGS [--project=PROJECT]
  run gcloud compute tpus "$@" ${project:+"--project=$project"}
}

# An existence check: prints gcloud's output. Under --dry_run it prints the
# command on fd 3 (stdout, even inside $(...)) and reports "not found".
tpus_query() {
  if ((dry_run)); then
    quoted gcloud compute tpus "$@" ${project:+"--project=$project"} >&3
    return 1
  fi
  gcloud compute tpus "$@" ${project:+"--project=$project"} 2>/dev/null
}

on_workers() {  # on_workers WORKERS COMMAND: runs COMMAND in a shell on them.
  tpus tpu-vm ssh "$name" "--zone=$zone" "--worker=$1" "--command=$2"
}

# --- Subcommands ------------------------------------------------------------

create() {
  if ((queued)); then
    create_queued
    return
  fi
  local found state type
  if found="$(tpus_query tpu-vm describe "$name" "--zone=$zone" \
      "--format=value(state,acceleratorType)")"; then
    read -r state type <<<"$found" || true
    if [[ -n "$type" && "$type" != "$accelerator" ]]; then
      fail "TPU $name exists with accelerator $type, not $accelerator; delete it or use another --name"
    fi
    case "$state" in
      PREEMPTED | TERMINATED | STOPPED)
        fail "TPU $name is $state; run ./$PROG delete --name=$name --zone=$zone, then create it again" ;;
    esac
    note "reusing TPU $name (${state:-state unknown}, ${type:-$accelerator})"
    return
  fi
  local mode=()
  if ((spot)); then mode=(--spot); fi
  if ((preemptible)); then mode=(--preemptible); fi
  tpus tpu-vm create "$name" "--zone=$zone" "--accelerator-type=$accelerator" \
    "--version=$runtime_version" ${mode[@]+"${mode[@]}"}
}

create_queued() {
  local state
  if state="$(tpus_query queued-resources describe "$name" "--zone=$zone" \
      "--format=value(state.state)")"; then
    note "reusing queued resource $name ($state)"
  else
    local mode=()
    if ((spot)); then mode=(--spot); fi
    tpus queued-resources create "$name" "--node-id=$name" "--zone=$zone" \
      "--accelerator-type=$accelerator" "--runtime-version=$runtime_version" \
      ${mode[@]+"${mode[@]}"}
  fi
  if ((dry_run)); then
    quoted gcloud compute tpus queued-resources describe "$name" "--zone=$zone" \
      "--format=value(state.state)" ${project:+"--project=$project"}
    return
  fi
  local last=""
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$name" "--zone=$zone" \
      "--format=value(state.state)" ${project:+"--project=$project"})" ||
      fail "cannot read the state of queued resource $name"
    case "$state" in
      ACTIVE) note "queued resource $name is ACTIVE"; return ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        fail "queued resource $name is $state; run ./$PROG delete --queued --name=$name --zone=$zone, then create it again" ;;
    esac
    [[ "$state" == "$last" ]] || note "queued resource $name is ${state:-in an unknown state}; waiting"
    last="$state"
    sleep "$poll_seconds"
  done
}

# Remote shell code that stops with an error where the trainer still runs.
refuse_if_training() {
  echo "if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then" \
    "echo \"error: training is running on \$(hostname) (pid \$(cat $REMOTE_PID));" \
    "stop it first\" >&2; exit 1; fi"
}

setup() {
  local tmp tarball
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064  # Expand $tmp now: it is local to this function.
  trap "rm -rf -- '$tmp'" EXIT
  tarball="$tmp/$REMOTE_TARBALL"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    note "warning: uncommitted changes are not copied (setup ships git archive $ref)"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$ref"
  tpus tpu-vm scp "$tarball" "$name:$REMOTE_TARBALL" "--zone=$zone" --worker=all
  local py pip install
  py="$(quoted "$python")"
  pip="$REMOTE_VENV/bin/python -m pip install --quiet"
  install="set -e; cd \"\$HOME\"; $(refuse_if_training)"
  install+="; rm -rf $REMOTE_DIR.new; mkdir $REMOTE_DIR.new"
  install+="; tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR.new"
  install+="; rm -rf $REMOTE_DIR; mv $REMOTE_DIR.new $REMOTE_DIR; rm -f $REMOTE_TARBALL"
  install+="; if [ ! -x $REMOTE_VENV/bin/python ]; then"
  install+=" if ! $py -m venv $REMOTE_VENV; then rm -rf $REMOTE_VENV"
  install+="; sudo apt-get update -qq"
  install+="; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv"
  install+="; $py -m venv $REMOTE_VENV; fi; fi"
  install+="; $pip --upgrade pip"
  # The gcs extra lets the trainer read and write gs:// paths.
  install+="; $pip -e \"./${REMOTE_DIR}[gcs]\" $(quoted "$jax_package" -f "$libtpu_url")"
  install+="; echo \"grow-batch installed on \$(hostname)\""
  on_workers all "$install"
}

train() {
  local args command
  # --multihost: every worker joins JAX's distributed runtime (peers are
  # found from the TPU metadata), which also enables preemption sync.
  args="$(quoted -m trainer.main --multihost "--config=$config" "--workdir=$workdir" \
    ${overrides[@]+"${overrides[@]}"} ${trainer_flags[@]+"${trainer_flags[@]}"})"
  command="set -e; cd \"\$HOME\"; $(refuse_if_training)"
  command+="; if [ ! -x $REMOTE_VENV/bin/python ]; then"
  command+=" echo \"error: no ~/$REMOTE_VENV on \$(hostname); run setup first\" >&2; exit 1; fi"
  command+="; cd $REMOTE_DIR"
  command+="; echo \"== \$(date -u +%Y-%m-%dT%H:%M:%SZ) python\" $args >>../$REMOTE_LOG"
  command+="; nohup ../$REMOTE_VENV/bin/python $args >>../$REMOTE_LOG 2>&1 </dev/null &"
  command+=" echo \$! >../$REMOTE_PID"
  command+="; echo \"training started on \$(hostname); log: ~/$REMOTE_LOG\""
  on_workers all "$command"
}

logs() {
  local command
  command="tail -n $lines"
  if ((follow)); then command+=" -F"; fi
  command+=" \"\$HOME/$REMOTE_LOG\""
  if [[ ! "$worker" =~ ^[0-9]+$ ]]; then
    # Several workers print at once: say which line comes from which.
    command+=" | sed -u \"s/^/\$(hostname): /\""
  fi
  on_workers "$worker" "$command"
}

stop() {
  local command
  command="cd \"\$HOME\"; if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then"
  command+=" kill -TERM \"\$(cat $REMOTE_PID)\"; echo \"stopped training on \$(hostname)\";"
  command+=" else echo \"no training running on \$(hostname)\"; fi"
  on_workers all "$command"
}

delete() {
  if ((queued)); then
    tpus queued-resources delete "$name" "--zone=$zone" --force --quiet
  else
    tpus tpu-vm delete "$name" "--zone=$zone" --quiet
  fi
}

main() {
  exec 3>&1
  parse_args "$@"
  validate
  case "$subcommand" in
    create) create ;;
    setup) setup ;;
    train) train ;;
    logs) logs ;;
    stop) stop ;;
    delete) delete ;;
    all) create; setup; train ;;
  esac
}

main "$@"
