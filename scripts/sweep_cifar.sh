#!/usr/bin/env bash
# Run the CIFAR cells of the paper's Table 1 with the paper presets, one run directory per cell and seed.
#
#   scripts/sweep_cifar.sh [options] [CELL ...] [-- TRAIN_CIFAR_ARGS ...]
#
# CELL is dataset:mode:r, e.g. cifar10:sym:0.5 (default: all nine Table 1 cells).
# Options:
#   --seeds S ...         seeds to run for every cell (default: 123)
#   --cifar10_path DIR    CIFAR-10 python files (default: ./cifar-10)
#   --cifar100_path DIR   CIFAR-100 python files (default: ./cifar-100)
#   --out ROOT            parent of the run directories (default: ./runs)
#   --gpus G ...          one worker per GPU id (default: $CUDA_VISIBLE_DEVICES, else nvidia-smi's GPUs,
#                         else one slot that leaves the device choice to Train_cifar.py)
#   --dry-run             print the commands (with their GPU) and run nothing
# Everything after -- goes to every Train_cifar.py call. $PYTHON picks the interpreter (default: python3);
# $TRAIN_SCRIPT replaces Train_cifar.py as the script run (the tests use a fake one; presets still come from
# Train_cifar.py).
#
# Run directory: ROOT/<dataset>_<mode>_<r>_seed<S>, holding the run's logs, checkpoint, its own noise file
# noise_<r>_<mode>.json (so seeds do not share one noise draw) and train.log (stdout and stderr, appended).
# A run whose log reaches its num_epochs is skipped; one with a checkpoint is resumed with --resume.
# Exit status: 0 when every run succeeded, 1 when one failed, 2 for a usage error.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TRAIN=${TRAIN_SCRIPT:-$REPO/Train_cifar.py}

usage_error() {
    echo "error: $1" >&2
    exit 2
}

seeds=()
gpus=()
cells=()
train_args=()
cifar10_path=./cifar-10
cifar100_path=./cifar-100
root=./runs
dry_run=0
gpus_given=0

while (($#)); do
    case $1 in
        --seeds)
            shift
            while (($#)) && [[ $1 =~ ^-?[0-9]+$ ]]; do seeds+=("$1"); shift; done
            ((${#seeds[@]})) || usage_error "--seeds needs at least one integer, e.g. --seeds 1 2 3"
            ;;
        --gpus)
            shift
            gpus_given=1
            # GPU ids are numbers or UUIDs; cells are told apart by their colons.
            while (($#)) && [[ $1 != -* && $1 != *:* ]]; do gpus+=("$1"); shift; done
            ((${#gpus[@]})) || usage_error "--gpus needs at least one GPU id, e.g. --gpus 0 1"
            ;;
        --cifar10_path|--cifar100_path|--out)
            (($# >= 2)) || usage_error "$1 needs a value"
            case $1 in
                --cifar10_path) cifar10_path=$2 ;;
                --cifar100_path) cifar100_path=$2 ;;
                --out) root=$2 ;;
            esac
            shift 2
            ;;
        --dry-run|--dry_run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; train_args=("$@"); break ;;
        -*) usage_error "unknown option $1 (Train_cifar.py options go after --)" ;;
        *) cells+=("$1"); shift ;;
    esac
done
((${#seeds[@]})) || seeds=(123)

# The sweep owns these flags: a pass-through copy would silently contradict the run directory's name.
for a in "${train_args[@]+"${train_args[@]}"}"; do
    case ${a%%=*} in
        --dataset|--r|--noise_ratio|--noise_mode|--seed|--data_path|--output_dir|--noise_file|--gpuid|--resume)
            usage_error "${a%%=*} is set by the sweep per run; leave it out of the arguments after --" ;;
    esac
done

if ((!gpus_given)); then
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' \r' | grep -v '^$')
    fi
fi
# An empty list means one slot on whatever device Train_cifar.py picks (CPU when there is no GPU).
((${#gpus[@]})) || gpus=(default)

command -v "$PY" >/dev/null 2>&1 || usage_error "Python interpreter '$PY' not found: set PYTHON=/path/to/python"

# The plan (cells, presets, run states) is computed in Python: JSON logs and the preset table are read there.
# Train_cifar.py is parsed, not imported, so a dry run does not pay for importing torch.
plan=$("$PY" - "$REPO/Train_cifar.py" "$root" "${#seeds[@]}" "${seeds[@]}" "${#train_args[@]}" \
    "${train_args[@]+"${train_args[@]}"}" "${cells[@]+"${cells[@]}"}" <<'PYEOF'
import ast
import json
import os
import sys
from decimal import Decimal

SEED_MAX = 2 ** 32 - 1
TABLE1 = ["cifar10:sym:0.2", "cifar10:sym:0.5", "cifar10:sym:0.8", "cifar10:sym:0.9", "cifar10:asym:0.4",
          "cifar100:sym:0.2", "cifar100:sym:0.5", "cifar100:sym:0.8", "cifar100:sym:0.9"]


def fail(message):
    """One line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_constants(path, names):
    """Literal module-level assignments of Train_cifar.py, read without importing it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = set(names) - set(found)
    if missing:
        fail(f"{path} does not define {', '.join(sorted(missing))}")
    return found


def parse_cell(text):
    """'cifar10:sym:0.5' -> ('cifar10', 'sym', 0.5)."""
    parts = text.split(":")
    if len(parts) != 3:
        fail(f"cell {text!r} is not dataset:mode:r, e.g. cifar10:sym:0.5")
    dataset, mode, r = parts
    if dataset not in ("cifar10", "cifar100"):
        fail(f"cell {text!r}: dataset must be cifar10 or cifar100")
    if mode not in ("sym", "asym"):
        fail(f"cell {text!r}: noise mode must be sym or asym")
    try:
        r = float(r)
    except ValueError:
        fail(f"cell {text!r}: r must be a number in [0, 1]")
    if not 0.0 <= r <= 1.0:
        fail(f"cell {text!r}: r must be in [0, 1]")
    if dataset == "cifar100" and mode == "asym":
        fail(f"cell {text!r}: CIFAR-100 asymmetric noise is not defined yet: use sym for cifar100")
    return dataset, mode, r


def exact_text(r):
    """Every digit of r (repr, the shortest text that reads back as r) without an exponent."""
    return format(Decimal(repr(r)), "f")


def ratio_text(r):
    """r in Train_cifar.py's file prefix (dataloader_cifar.ratio_text): one decimal where exact, else every digit."""
    return "%.1f" % r if r == round(r, 1) else exact_text(r)


def flag_value(args, name):
    """Last value given to --name in a list of arguments (either --name V or --name=V), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def last_epoch(log_path):
    """Epoch of the last complete JSON line of a run log, or None."""
    try:
        with open(log_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the one before it is the last complete epoch
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            return record["epoch"]
    return None


def run_state(run_dir, prefix, num_epochs_flag):
    """(state, note): finished, resume, new or blocked, with a short explanation."""
    config_path = os.path.join(run_dir, prefix + "_config.json")
    log_path = os.path.join(run_dir, prefix + "_log.jsonl")
    ckpt_path = os.path.join(run_dir, prefix + "_checkpoint.pth.tar")
    target = None
    if num_epochs_flag is not None:
        target = int(num_epochs_flag)
    elif os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                target = json.load(f)["args"]["num_epochs"]
        except (OSError, ValueError, KeyError, TypeError):
            target = None
    done = last_epoch(log_path)
    if done is not None and target is not None and done >= target:
        return "finished", f"epoch {done}/{target}"
    if os.path.isfile(ckpt_path) or os.path.isfile(ckpt_path.replace("_checkpoint.", "_checkpoint_prev.")):
        return "resume", f"epoch {done}/{target}" if done is not None else "checkpoint"
    logged = [os.path.join(run_dir, prefix + suffix) for suffix in ("_log.jsonl", "_acc.txt", "_stats.txt")]
    if any(os.path.isfile(p) and os.path.getsize(p) > 0 for p in logged):
        # Train_cifar.py starts a run again that was killed before its first checkpoint landed (at most two
        # epochs logged); more logged epochs without a checkpoint are a finished run whose checkpoint is gone.
        if done is None or done < 2:
            return "new", "restart (stopped before its first checkpoint)"
        return "blocked", (f"{run_dir} holds {prefix} logs of epochs up to {done} but no checkpoint, so "
                           "Train_cifar.py would refuse it: remove that directory to start the run again")
    return "new", "no output yet"


def main(argv):
    """Print one tab-separated plan line per (cell, seed)."""
    train_cifar, root = argv[0], argv[1]
    n_seeds = int(argv[2])
    seeds = [int(s) for s in argv[3:3 + n_seeds]]
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:  # Train_cifar.py's range: numpy is seeded from --seed
            fail(f"--seeds {seed} is outside 0..{SEED_MAX}: give integers in that range")
    rest = argv[3 + n_seeds:]
    n_train = int(rest[0])
    train_args, cell_args = rest[1:1 + n_train], rest[1 + n_train:]
    consts = read_constants(train_cifar, ("PAPER_PRESETS", "ORIGINAL_DEFAULTS"))
    presets, defaults = consts["PAPER_PRESETS"], consts["ORIGINAL_DEFAULTS"]
    num_epochs_flag = flag_value(train_args, "--num_epochs")
    if num_epochs_flag is not None and not (num_epochs_flag.isdigit() and num_epochs_flag.isascii()):
        fail(f"--num_epochs {num_epochs_flag} is not allowed: give an integer >= 0 (the last epoch)")
    overridden = {n: flag_value(train_args, "--" + n) for n in ("lambda_u", "p_threshold")}
    cells = []
    for text in cell_args or TABLE1:
        cell = parse_cell(text)
        if cell not in cells:
            cells.append(cell)
    for dataset, mode, r in cells:
        preset = presets.get((dataset, mode, r))  # as Train_cifar.py: only the paper's own r has its cell
        source = "paper preset" if preset else "original-code default, no paper preset"
        values = dict(preset or defaults)
        for name, value in overridden.items():
            if value is not None:
                values[name] = value
                source = "set after --"
        # The run directory's r (and the --r passed on): short where %g is exact, as before, else every digit.
        r_text = f"{r:g}" if float(f"{r:g}") == r else exact_text(r)
        prefix = "%s_%s_%s" % (dataset, ratio_text(r), mode)
        for seed in seeds:
            run_dir = os.path.join(root, f"{dataset}_{mode}_{r_text}_seed{seed}")
            state, note = run_state(run_dir, prefix, num_epochs_flag)
            print("\t".join([state, run_dir, dataset, mode, r_text, str(seed), str(values["lambda_u"]),
                             str(values["p_threshold"]), source, note]))


main(sys.argv[1:])
PYEOF
) || exit 2

# Build one command string per run to execute; %q quoting makes the printed line and the executed one the same.
commands=()
notes=()
run_dirs=()
blocked=()
n_finished=0
while IFS=$'\t' read -r state run_dir dataset mode r seed lambda_u p_threshold source note; do
    [[ -n $state ]] || continue
    case $state in
        finished) echo "# skip $run_dir: finished ($note)"; n_finished=$((n_finished + 1)); continue ;;
        blocked) echo "# blocked: $note" >&2; blocked+=("$run_dir"); continue ;;
    esac
    if [[ $dataset == cifar10 ]]; then data_path=$cifar10_path; else data_path=$cifar100_path; fi
    cmd=(--dataset "$dataset" --noise_mode "$mode" --r "$r" --seed "$seed" --data_path "$data_path"
         --output_dir "$run_dir" --noise_file "$run_dir/noise_${r}_${mode}.json" --gpuid 0)
    [[ $state == resume ]] && cmd+=(--resume)
    cmd+=("${train_args[@]+"${train_args[@]}"}")
    line=$(printf '%q ' "$PY" "$TRAIN" "${cmd[@]}")
    line="${line% } >> $(printf '%q' "$run_dir/train.log") 2>&1"
    commands+=("$line")
    notes+=("# lambda_u=$lambda_u p_threshold=$p_threshold ($source); $state ($note)")
    run_dirs+=("$run_dir")
done <<<"$plan"

n=${#commands[@]}
slots=${#gpus[@]}
((slots > n)) && slots=$n
((slots >= 1)) || slots=1
echo "# sweep: $((n + n_finished + ${#blocked[@]})) run(s): $n to run, $n_finished finished, ${#blocked[@]} blocked;" \
     "$slots worker(s) on GPU(s): ${gpus[*]:0:$slots}"

# Round-robin over the runs left to do: CIFAR cells take about the same time per epoch, so this balances
# well, and the dry run can show exactly which GPU each run gets.
gpu_of() {
    local g=${gpus[$(($1 % slots))]}
    if [[ $g == default ]]; then echo ""; else echo "CUDA_VISIBLE_DEVICES=$(printf '%q' "$g") "; fi
}

for i in "${!commands[@]}"; do
    g=${gpus[$((i % slots))]}
    echo "$(gpu_of "$i")${commands[$i]}  ${notes[$i]}; gpu $g"
done

if ((dry_run)); then
    exit 0
fi

run_worker() {
    # Runs the runs i = slot, slot + slots, ... one after another; exit status = number of failed runs.
    local slot=$1 failed=0 child= i rc t0 log
    trap '[[ -n $child ]] && kill -TERM "$child" 2>/dev/null; exit 130' TERM INT
    for ((i = slot; i < n; i += slots)); do
        log="${run_dirs[$i]}/train.log"
        mkdir -p "${run_dirs[$i]}" || { failed=$((failed + 1)); continue; }
        printf '=== sweep %s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(gpu_of "$i")${commands[$i]}" >>"$log"
        t0=$SECONDS
        eval "$(gpu_of "$i")${commands[$i]} &"
        child=$!
        wait "$child"
        rc=$?
        child=
        if ((rc == 0)); then
            echo "sweep: done ${run_dirs[$i]} ($((SECONDS - t0)) s, gpu ${gpus[$slot]})"
        else
            echo "sweep: FAILED ${run_dirs[$i]} (exit $rc, gpu ${gpus[$slot]}): see $log" >&2
            failed=$((failed + 1))
        fi
    done
    exit $((failed > 255 ? 255 : failed))
}

pids=()
stop_workers() {
    echo "sweep: stopping the workers" >&2
    kill -TERM "${pids[@]}" 2>/dev/null
    wait
    exit 130
}
trap stop_workers TERM INT
for ((s = 0; s < slots && s < n; s++)); do
    run_worker "$s" &
    pids+=($!)
done
n_failed=0
for p in "${pids[@]+"${pids[@]}"}"; do
    wait "$p"
    n_failed=$((n_failed + $?))
done
n_failed=$((n_failed + ${#blocked[@]}))
echo "sweep: $n run(s) started, $n_finished already finished, $n_failed failed or blocked"
((n_failed == 0))
