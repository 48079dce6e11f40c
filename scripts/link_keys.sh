#!/usr/bin/env bash
# CURVE keys for the compose stacks' controller link (docker/secrets/link/, git-ignored):
# the controller's pair, one pair per runtime (runtime-1..N), and clients/ holding the public
# keys the controller allows. Existing keys are kept. Usage: scripts/link_keys.sh [N] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=${1:-2}
dir=${2:-docker/secrets/link}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir/clients"
[ -f "$dir/controller.key_secret" ] || "$py" -m lynx_policy.cli keys generate --dir "$dir" --name controller
for i in $(seq 1 "$replicas"); do
  [ -f "$dir/runtime-$i.key_secret" ] || "$py" -m lynx_policy.cli keys generate --dir "$dir" --name "runtime-$i"
  cp "$dir/runtime-$i.key" "$dir/clients/"
done
echo "link keys in $dir (allowed runtimes: $(ls "$dir/clients" | tr '\n' ' '))"
