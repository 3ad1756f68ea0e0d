#!/bin/sh
# Makes deploy/compose/.env from .env.example: mode 0600, every empty secret of it (a variable
# ending in _PASSWORD or _TOKEN with no value: MinIO's and Grafana's passwords, Ray's cluster
# token) set to 32 random bytes in hex. Never overwrites an existing .env, never prints a secret.
#
#   sh gen-env.sh [OUT]      (default: .env beside this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/.env}
if [ -e "$out" ]; then
    echo "gen-env: $out exists; left as it is (delete it to make a new one)" >&2
    exit 1
fi
umask 077
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        \#*) printf '%s\n' "$line" ;;
        *_PASSWORD= | *_TOKEN=) printf '%s%s\n' "$line" "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" ;;
        *) printf '%s\n' "$line" ;;
    esac
done < "$here/.env.example" > "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "gen-env: wrote $out (mode 0600) with random passwords and Ray token; now set COMPOSE_PROFILES and GPUS_<CLASS> there"
