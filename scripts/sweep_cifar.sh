#!/usr/bin/env bash
# Run CIFAR cells, by default the paper's Table 1, with their presets: one run directory per cell and seed.
#
#   scripts/sweep_cifar.sh [options] [CELL ...] [-- TRAIN_CIFAR_ARGS ...]
#
# CELL (default: all nine Table 1 cells) is one of
#   dataset:mode:r        synthetic noise at rate r: mode sym, asym or idn, e.g. cifar10:sym:0.5, cifar100:idn:0.4
#   dataset:mode          CIFAR-N human labels, no r: cifar10 with aggre, worst, rand1, rand2 or rand3;
#                         cifar100 with noisy100, e.g. cifar10:worst (labels: CIFAR-10_human.pt in --cifar10_path,
#                         CIFAR-100_human.pt in --cifar100_path)
# either followed by :oodO for open-set noise, O in (0, 1) of the training images replaced by images from
# --ood_path, e.g. cifar10:sym:0.2:ood0.2 or cifar10:aggre:ood0.1.
# Options:
#   --seeds S ...         seeds to run for every cell (default: 123)
#   --cifar10_path DIR    CIFAR-10 python files (default: ./cifar-10)
#   --cifar100_path DIR   CIFAR-100 python files (default: ./cifar-100)
#   --out ROOT            parent of the run directories (default: ./runs)
#   --ood_path P          images of the open-set cells (passed on as --ood_path P --ood_ratio O): a folder with
#                         the other CIFAR's python files, or an .npz; needed when a cell has :oodO
#   --gpus G ...          one worker per GPU id (default: $CUDA_VISIBLE_DEVICES, else nvidia-smi's GPUs,
#                         else one slot that leaves the device choice to Train_cifar.py)
#   --dry-run             print the commands (with their GPU) and run nothing
#   --slurm               hand the runs to SLURM instead: write ROOT/slurm/sweep_<time>.sbatch, a job array of
#                         one task per run left to do, and submit it with sbatch (with --dry-run: print it only)
#   --partition P         (--slurm) the partition to submit to
#   --time HH:MM:SS       (--slurm) each task's time limit; a task warned before it (USR1, --warn_seconds)
#                         stops cleanly, requeues itself and resumes from its checkpoint
#   --gpus_per_task G     (--slurm) GPUs per task (default 1; 0 for CPU-only nodes)
#   --warn_seconds N      (--slurm) how long before the time limit the warning comes (default 300)
#   --sbatch_args "..."   (--slurm) further sbatch options, e.g. "--account=A --qos=Q"
# Everything after -- goes to every Train_cifar.py call. $PYTHON picks the interpreter (default: python3);
# $TRAIN_SCRIPT replaces Train_cifar.py as the script run (the tests use a fake one; presets still come from
# Train_cifar.py).
#
# Run directory: ROOT/<dataset>_<mode>_<r>_seed<S> (CIFAR-N: ROOT/<dataset>_<mode>_seed<S>; open-set cells add
# _ood<O> before _seed), holding the run's logs, checkpoint, its own noise file noise_<r>_<mode>.json (with
# _ood<O> before .json for open-set cells; none for CIFAR-N, whose labels are given) so seeds do not share one
# noise draw, the open-set cells' replacement file (beside the noise file, <mode>_ood<O>_replaced.json for
# CIFAR-N) and train.log (stdout and stderr, appended).
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
ood_path=
dry_run=0
gpus_given=0
slurm=0
partition=
time_limit=
gpus_per_task=1
warn_seconds=300
sbatch_args=

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
        --cifar10_path|--cifar100_path|--out|--ood_path|--partition|--time|--gpus_per_task|--warn_seconds|--sbatch_args)
            (($# >= 2)) || usage_error "$1 needs a value"
            case $1 in
                --cifar10_path) cifar10_path=$2 ;;
                --cifar100_path) cifar100_path=$2 ;;
                --out) root=$2 ;;
                --ood_path) ood_path=$2 ;;
                --partition) partition=$2 ;;
                --time) time_limit=$2 ;;
                --gpus_per_task) gpus_per_task=$2 ;;
                --warn_seconds) warn_seconds=$2 ;;
                --sbatch_args) sbatch_args=$2 ;;
            esac
            shift 2
            ;;
        --slurm) slurm=1; shift ;;
        --dry-run|--dry_run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; train_args=("$@"); break ;;
        -*) usage_error "unknown option $1 (Train_cifar.py options go after --)" ;;
        *) cells+=("$1"); shift ;;
    esac
done
((${#seeds[@]})) || seeds=(123)
[[ $gpus_per_task =~ ^[0-9]+$ ]] || usage_error "--gpus_per_task $gpus_per_task is not allowed: give an integer >= 0"
[[ $warn_seconds =~ ^[0-9]+$ ]] || usage_error "--warn_seconds $warn_seconds is not allowed: give an integer >= 0"
if ((slurm && !dry_run)) && ! command -v sbatch >/dev/null 2>&1; then
    usage_error "--slurm needs sbatch on the PATH (a SLURM login node); --dry-run --slurm prints the job script"
fi

# The sweep owns these flags: a pass-through copy would silently contradict the run directory's name.
for a in "${train_args[@]+"${train_args[@]}"}"; do
    case ${a%%=*} in
        --dataset|--r|--noise_ratio|--noise_mode|--seed|--data_path|--output_dir|--noise_file|--gpuid|--resume|\
        --ood_ratio)
            usage_error "${a%%=*} is set by the sweep per run; leave it out of the arguments after --" ;;
        --ood_path)
            usage_error "--ood_path is a sweep option: give it before the cells, not after --" ;;
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
plan=$("$PY" - "$REPO/Train_cifar.py" "$REPO/dataloader_cifar.py" "$root" "$ood_path" "${#seeds[@]}" "${seeds[@]}" "${#train_args[@]}" \
    "${train_args[@]+"${train_args[@]}"}" "${cells[@]+"${cells[@]}"}" <<'PYEOF'
import ast
import json
import os
import sys
from decimal import Decimal

SEED_MAX = 2 ** 32 - 1
SYNTHETIC_MODES = ("sym", "asym", "idn")  # noise drawn at the rate r; the CIFAR-N modes come from the repository
TABLE1 = ["cifar10:sym:0.2", "cifar10:sym:0.5", "cifar10:sym:0.8", "cifar10:sym:0.9", "cifar10:asym:0.4",
          "cifar100:sym:0.2", "cifar100:sym:0.5", "cifar100:sym:0.8", "cifar100:sym:0.9"]


def fail(message):
    """One line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_constants(paths, names):
    """Literal module-level assignments, read without importing the files; the first file defining a name wins."""
    found = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                if name in names and name not in found:
                    found[name] = ast.literal_eval(node.value)
    missing = set(names) - set(found)
    if missing:
        fail(f"{' and '.join(paths)} do not define {', '.join(sorted(missing))}")
    return found


def parse_cell(text, cifarn_modes):
    """'cifar10:sym:0.5' -> ('cifar10', 'sym', 0.5, 0.0); 'cifar10:worst:ood0.1' -> ('cifar10', 'worst', None, 0.1)."""
    form = ("is not dataset:mode:r or dataset:mode (CIFAR-N), optionally followed by :ood<ratio>, e.g. "
            "cifar10:sym:0.5, cifar10:worst or cifar10:sym:0.2:ood0.2")
    parts = text.split(":")
    ood = 0.0
    if len(parts) > 2 and parts[-1].startswith("ood"):
        try:
            ood = float(parts.pop()[3:])
        except ValueError:
            ood = -1.0
        if not 0.0 < ood < 1.0:
            fail(f"cell {text!r}: the open-set ratio must be a number strictly between 0 and 1, e.g. :ood0.2")
    if len(parts) not in (2, 3) or not all(parts):
        fail(f"cell {text!r} {form}")
    dataset, mode = parts[:2]
    if dataset not in ("cifar10", "cifar100"):
        fail(f"cell {text!r}: dataset must be cifar10 or cifar100")
    if mode in cifarn_modes:
        if cifarn_modes[mode] != dataset:
            fail(f"cell {text!r}: the CIFAR-N labels {mode} belong to {cifarn_modes[mode]}: "
                 f"write {cifarn_modes[mode]}:{mode}")
        if len(parts) == 3:
            fail(f"cell {text!r}: CIFAR-N labels bring their own noise, so the cell takes no r: write {dataset}:{mode}")
        return dataset, mode, None, ood
    if mode not in SYNTHETIC_MODES:
        fail(f"cell {text!r}: noise mode must be {', '.join(SYNTHETIC_MODES)} (with r) or one of the CIFAR-N label "
             f"sets {', '.join(cifarn_modes)} (without r)")
    if len(parts) == 2:
        fail(f"cell {text!r}: {mode} noise needs its rate r: write {dataset}:{mode}:r, e.g. {dataset}:{mode}:0.4")
    try:
        r = float(parts[2])
    except ValueError:
        fail(f"cell {text!r}: r must be a number in [0, 1]")
    if not 0.0 <= r <= 1.0:
        fail(f"cell {text!r}: r must be in [0, 1]")
    return dataset, mode, r, ood


def exact_text(r):
    """Every digit of r (repr, the shortest text that reads back as r) without an exponent."""
    return format(Decimal(repr(r)), "f")


def ratio_text(r):
    """r in Train_cifar.py's file prefix (dataloader_cifar.ratio_text): one decimal where exact, else every digit."""
    return "%.1f" % r if r == round(r, 1) else exact_text(r)


def short_text(r):
    """A ratio in run directory names and on the command line: %g where exact, as before, else every digit."""
    return f"{r:g}" if float(f"{r:g}") == r else exact_text(r)


def run_prefix(dataset, mode, r, ood):
    """Train_cifar.run_prefix: cifar10_0.5_sym, cifar10_worst (CIFAR-N), `_ood<O>` appended for open-set noise."""
    prefix = f"{dataset}_{mode}" if r is None else f"{dataset}_{ratio_text(r)}_{mode}"
    return prefix + (f"_ood{ratio_text(ood)}" if ood else "")


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
    """Print one tab-separated plan line per (cell, seed); '-' stands for an absent r or open-set ratio."""
    train_cifar, dataloader, root, ood_path = argv[:4]
    n_seeds = int(argv[4])
    seeds = [int(s) for s in argv[5:5 + n_seeds]]
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:  # Train_cifar.py's range: numpy is seeded from --seed
            fail(f"--seeds {seed} is outside 0..{SEED_MAX}: give integers in that range")
    rest = argv[5 + n_seeds:]
    n_train = int(rest[0])
    train_args, cell_args = rest[1:1 + n_train], rest[1 + n_train:]
    consts = read_constants([train_cifar, dataloader],
                            ("PAPER_PRESETS", "ORIGINAL_DEFAULTS", "CIFARN_PRESET", "CIFARN_MODES"))
    presets, defaults = consts["PAPER_PRESETS"], consts["ORIGINAL_DEFAULTS"]
    num_epochs_flag = flag_value(train_args, "--num_epochs")
    if num_epochs_flag is not None and not (num_epochs_flag.isdigit() and num_epochs_flag.isascii()):
        fail(f"--num_epochs {num_epochs_flag} is not allowed: give an integer >= 0 (the last epoch)")
    overridden = {n: flag_value(train_args, "--" + n) for n in ("lambda_u", "p_threshold")}
    cells = []
    for text in cell_args or TABLE1:
        cell = parse_cell(text, consts["CIFARN_MODES"])
        if cell[3] and not ood_path:
            fail(f"cell {text!r} asks for open-set noise: give --ood_path P (a folder with the other CIFAR's "
                 "python files, or an .npz)")
        if cell not in cells:
            cells.append(cell)
    for dataset, mode, r, ood in cells:
        if r is None:
            preset, source = consts["CIFARN_PRESET"], "CIFAR-N preset (noisypy reproduction)"
        else:
            preset = presets.get((dataset, mode, r))  # as Train_cifar.py: only the paper's own r has its cell
            source = "paper preset" if preset else "original-code default, no paper preset"
        values = dict(preset or defaults)
        for name, value in overridden.items():
            if value is not None:
                values[name] = value
                source = "set after --"
        r_text = "-" if r is None else short_text(r)
        ood_text = short_text(ood) if ood else "-"
        # The run directory and the cell handed to a SLURM task name the same fields in the same order.
        fields = [dataset, mode] + ([] if r is None else [r_text])
        cell_text = ":".join(fields) + (f":ood{ood_text}" if ood else "")
        stem = "_".join(fields) + (f"_ood{ood_text}" if ood else "")
        prefix = run_prefix(dataset, mode, r, ood)
        for seed in seeds:
            run_dir = os.path.join(root, f"{stem}_seed{seed}")
            state, note = run_state(run_dir, prefix, num_epochs_flag)
            print("\t".join([state, run_dir, cell_text, dataset, mode, r_text, ood_text, str(seed),
                             str(values["lambda_u"]), str(values["p_threshold"]), source, note]))


main(sys.argv[1:])
PYEOF
) || exit 2

# Build one command string per run to execute; %q quoting makes the printed line and the executed one the same.
commands=()
notes=()
run_dirs=()
run_cells=()
run_seeds=()
blocked=()
n_finished=0
while IFS=$'\t' read -r state run_dir cell dataset mode r ood seed lambda_u p_threshold source note; do
    [[ -n $state ]] || continue
    case $state in
        finished) echo "# skip $run_dir: finished ($note)"; n_finished=$((n_finished + 1)); continue ;;
        blocked) echo "# blocked: $note" >&2; blocked+=("$run_dir"); continue ;;
    esac
    if [[ $dataset == cifar10 ]]; then data_path=$cifar10_path; else data_path=$cifar100_path; fi
    # CIFAR-N cells (r '-') have no --r and no noise file: Train_cifar.py refuses both with human labels.
    ood_suffix=
    [[ $ood != - ]] && ood_suffix=_ood$ood
    cmd=(--dataset "$dataset" --noise_mode "$mode")
    [[ $r != - ]] && cmd+=(--r "$r")
    cmd+=(--seed "$seed" --data_path "$data_path" --output_dir "$run_dir")
    [[ $r != - ]] && cmd+=(--noise_file "$run_dir/noise_${r}_${mode}${ood_suffix}.json")
    [[ $ood != - ]] && cmd+=(--ood_path "$ood_path" --ood_ratio "$ood")
    # the replaced images are the run's own as well (beside its noise file; CIFAR-N has none, so name it)
    [[ $ood != - && $r == - ]] && cmd+=(--ood_file "$run_dir/${mode}_ood${ood}_replaced.json")
    cmd+=(--gpuid 0)
    [[ $state == resume ]] && cmd+=(--resume)
    cmd+=("${train_args[@]+"${train_args[@]}"}")
    line=$(printf '%q ' "$PY" "$TRAIN" "${cmd[@]}")
    line="${line% } >> $(printf '%q' "$run_dir/train.log") 2>&1"
    commands+=("$line")
    run_cells+=("$cell")
    run_seeds+=("$seed")
    notes+=("# lambda_u=$lambda_u p_threshold=$p_threshold ($source); $state ($note)")
    run_dirs+=("$run_dir")
done <<<"$plan"

n=${#commands[@]}

if ((slurm)); then
    # One array task per run left to do. A task runs this script for its one cell and seed, so a requeued task
    # plans again from the run folder: it resumes from the checkpoint, or skips a run that has finished.
    echo "# sweep: $((n + n_finished + ${#blocked[@]})) run(s): $n to submit, $n_finished finished, ${#blocked[@]} blocked"
    ((n)) || { echo "sweep: nothing left to submit"; exit $((${#blocked[@]} ? 1 : 0)); }
    abs() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
    root_abs=$(abs "$root")
    script="$root_abs/slurm/sweep_$(date '+%Y%m%d_%H%M%S').sbatch"
    text=$(
        echo "#!/usr/bin/env bash"
        echo "#SBATCH --job-name=dividemix-sweep"
        echo "#SBATCH --array=0-$((n - 1))"
        echo "#SBATCH --requeue"
        echo "#SBATCH --open-mode=append"
        echo "#SBATCH --signal=B:USR1@$warn_seconds"
        echo "#SBATCH --output=$root_abs/slurm/%x_%A_%a.out"
        [[ -n $partition ]] && echo "#SBATCH --partition=$partition"
        [[ -n $time_limit ]] && echo "#SBATCH --time=$time_limit"
        ((gpus_per_task > 0)) && echo "#SBATCH --gres=gpu:$gpus_per_task"
        echo "# Written by scripts/sweep_cifar.sh --slurm: task i trains run i below with the sweep's own rules"
        echo "# (skip finished, --resume from a checkpoint). USR1 (the warning before the time limit) stops the run"
        echo "# cleanly and requeues the task; SIGTERM (preemption, scancel, scontrol requeue) stops it cleanly."
        printf 'runs=('
        for i in "${!run_cells[@]}"; do printf ' %q' "${run_cells[$i]} ${run_seeds[$i]} ${run_dirs[$i]}"; done
        printf ' )\n'
        task_sweep=("$REPO/scripts/sweep_cifar.sh" --out "$root_abs" --cifar10_path "$(abs "$cifar10_path")"
                    --cifar100_path "$(abs "$cifar100_path")")
        [[ -n $ood_path ]] && task_sweep+=(--ood_path "$(abs "$ood_path")")
        printf 'sweep=('
        printf ' %q' "${task_sweep[@]}"
        printf ' )\n'
        printf 'train_args=('
        for a in "${train_args[@]+"${train_args[@]}"}"; do printf ' %q' "$a"; done
        printf ' )\n'
        printf 'export PYTHON=%q\n' "$PY"
        [[ -n ${TRAIN_SCRIPT:-} ]] && printf 'export TRAIN_SCRIPT=%q\n' "$TRAIN_SCRIPT"
        cat <<'TASK'
read -r cell seed run_dir <<<"${runs[$SLURM_ARRAY_TASK_ID]}"
echo "=== $(date '+%Y-%m-%d %H:%M:%S') task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}): run folder $run_dir"
child=
stop() {
    # Stop the run cleanly (its checkpoint and logs are kept), then requeue on the time-limit warning.
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    if [[ $1 == USR1 ]]; then
        echo "=== $(date '+%Y-%m-%d %H:%M:%S') time limit near: requeued, the run resumes from its checkpoint"
        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    exit 0
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
"${sweep[@]}" --seeds "$seed" "$cell" -- "${train_args[@]}" &
child=$!
wait "$child"
TASK
    )
    if ((dry_run)); then
        echo "$text"
        exit 0
    fi
    mkdir -p "$root_abs/slurm" && echo "$text" >"$script" || usage_error "cannot write $script"
    # sbatch options given here override the script's #SBATCH lines
    read -r -a extra <<<"$sbatch_args"
    job=$(sbatch --parsable "${extra[@]+"${extra[@]}"}" "$script") || { echo "error: sbatch refused $script" >&2; exit 1; }
    job=${job%%;*}
    echo "sweep: submitted job array $job ($n task(s)): $script"
    echo "sweep: follow it with: squeue -j $job; task logs: $root_abs/slurm/dividemix-sweep_${job}_<task>.out;" \
         "each run's own log: <run folder>/train.log; report: python report.py $root"
    exit 0
fi

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
    # the run gets the signal and finishes the checkpoint it is writing before the worker leaves
    trap '[[ -n $child ]] && kill -TERM "$child" 2>/dev/null && wait "$child"; exit 130' TERM INT
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
