# Sourced by the launch/train_*.sh recipes: `step NAME COMMAND...` runs COMMAND once (skipped when
# $out/.done.NAME exists), logs it to $out/NAME.log and records its seconds in $out/times.json.
# Needs $root and $out; sets $py (the venv's python, set up by setup_env.sh when missing) and the environment,
# creates $out and changes to $root. A step that is stopped part-way reruns on the next call (its log appended to); the trainer
# resumes from its checkpoints, so a recipe can be stopped and continued at any point. times.json holds the seconds
# of the call that finished the step. `step ... &` then `wait_steps` runs steps side by side (steps that do not depend on each other:
# small models leave part of a CPU idle, so two or three at once finish sooner than one after the other).
py="${UNCLIP_VENV:-$root/.venv}/bin/python"
[[ -x "$py" ]] || py="$(bash "$root/launch/setup_env.sh" | tail -n 1)/bin/python"
export PYTHONUNBUFFERED=1 UNCLIP_JAX_CACHE="${UNCLIP_JAX_CACHE:-$root/.jax_cache}"
mkdir -p "$out"
cd "$root"
times="$out/times.json"; [[ -f "$times" ]] || echo "{}" > "$times"
step() {   # step NAME COMMAND...: runs once (skipped when OUT/.done.NAME exists), logs to OUT/NAME.log, times it
  local name="$1"; shift
  if [[ -f "$out/.done.$name" ]]; then echo "[$name] done before, skipping"; return; fi
  echo "[$name] $*"
  local start; start=$(date +%s)
  "$@" >> "$out/$name.log" 2>&1 || { echo "[$name] failed; see $out/$name.log" >&2; tail -n 30 "$out/$name.log" >&2; exit 1; }
  local secs=$(( $(date +%s) - start ))
  flock "$times.lock" "$py" -c "import json,sys; p=sys.argv[1]; d=json.load(open(p)); d[sys.argv[2]]=int(sys.argv[3]); json.dump(d, open(p,'w'), indent=1)" "$times" "$name" "$secs"
  touch "$out/.done.$name"
  echo "[$name] ${secs}s"
}
wait_steps() {   # after `step A ... & step B ... &`: waits for every background step; fails when any of them failed
  local pid failed=0
  for pid in $(jobs -p); do wait "$pid" || failed=1; done
  [[ $failed == 0 ]] || exit 1
}
