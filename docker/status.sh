#!/usr/bin/env bash
# The Docker counterpart of `quire status`: every container of the stack with its Raft role,
# leader, term, applied index and readiness, read from each server's /status.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export QUIRE_TOKEN=${QUIRE_TOKEN:-unused}
printf '%-26s %-17s %-16s %-9s %6s %5s %8s %s\n' CONTAINER TIER ADDRESS ROLE LEADER TERM APPLIED HEALTH
for id in $("$here/compose.sh" ps -q 2>/dev/null); do
  name=$(docker inspect -f '{{.Name}}' "$id" | tr -d /)
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")
  if status=$(curl -sf --max-time 1 "http://$ip:7000/status"); then
    jq -r --arg c "$name" --arg ip "$ip" \
      '[$c, .tier, $ip, .role, (.leader // "-" | tostring), .term, .applied_index, (if .ready then "ready" else "not ready" end)] | @tsv' \
      <<<"$status" | awk -F'\t' '{printf "%-26s %-17s %-16s %-9s %6s %5s %8s %s\n", $1, $2, $3, $4, $5, $6, $7, $8}'
  else
    printf '%-26s %-17s %-16s %-9s %6s %5s %8s %s\n' "$name" - "${ip:--}" - - - - DOWN
  fi
done
