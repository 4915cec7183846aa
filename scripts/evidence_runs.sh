# Sourced by the evidence scripts (successors_evidence.sh, pretraining_evidence.sh): one Train_cifar.py run of an
# evidence set, and a launcher that keeps at most $parallel of them running. Uses the sourcing script's $py, $repo,
# $out, $parallel and ${common[@]}.

run_one() {
    # each run keeps its own noise and replacement files, so parallel runs never race for one
    local name=$1
    shift
    mkdir -p "$out/$name"
    OMP_NUM_THREADS=1 "$py" "$repo/Train_cifar.py" "$@" "${common[@]}" --output_dir "$out/$name" \
        --noise_file "$out/$name/noise.json" > "$out/$name.log" 2>&1 || echo "$name failed: see $out/$name.log" >&2
}

launch() {
    while (($(jobs -rp | wc -l) >= parallel)); do wait -n; done
    run_one "$@" &
}
