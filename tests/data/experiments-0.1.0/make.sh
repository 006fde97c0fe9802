# How the experiments in storage/ were made, by raystudy 0.1.0 (commit 7b95841), on 2 CPU cores:
#   RAYSTUDY_CACHE=/tmp/legacy/cache
#   raystudy targets studies/legacy_targets.yaml --storage /tmp/legacy/store --num-cpus 2
#   bash make.sh search legacy_search studies/legacy_search.yaml
#   bash make.sh run legacy_grid studies/legacy_grid.yaml
# then /tmp/legacy/store/* copied to storage/. Each study is interrupted (SIGINT, as Ctrl-C) once
# its first trial has finished: its second trial exists but has not run, so `raystudy resume` of
# the copy must unpickle Ray's state and the search's Optuna history and finish it.
set -u
raystudy $1 $3 --storage /tmp/legacy/store --num-cpus 2 --max-concurrent 1 > /tmp/legacy/$2.log 2>&1 &
pid=$!
until ls /tmp/legacy/store/$2/trial_*/raystudy-final.json >/dev/null 2>&1; do sleep 0.5; done
sleep 1
kill -INT $pid
wait $pid; echo "exit $?"
