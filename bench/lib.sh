# Shared by the benchmark scripts (sourced): a scratch directory and a store in it, both
# gone when the script exits. Defines:
#   need TOOL...              exits unless every TOOL is installed
#   build_quire               builds the release binary; QUIRE is it unless already set
#   start_store BOOKS STOCK   a fresh store (`quire up`, restock off) of BOOKS books with STOCK
#                             copies each; returns once all 13 of its servers are ready
#   status                    the store's `quire status --json`
#   also_stop PID             a process to stop with the store when the script exits
TMP=$(mktemp -d)
BENCH_PIDS=()
also_stop() { BENCH_PIDS+=("$1"); }
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install $*)" >&2; exit 1; }
  done
}
build_quire() {
  cargo build --release --bin quire 2>&1 | tail -1
  QUIRE=${QUIRE:-$PWD/target/release/quire}
}
bench_cleanup() {
  for pid in "${BENCH_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${BENCH_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap bench_cleanup EXIT

status() { "$QUIRE" status --json --data-dir "$TMP/store" 2>/dev/null; }

start_store() {
  local books=$1 stock=$2
  { echo "id,title,topic,price,stock"; for i in $(seq 1 "$books"); do echo "$i,Benchmark book $i,bench,10.00,$stock"; done; } > "$TMP/books.csv"
  "$QUIRE" up --data-dir "$TMP/store" --port 0 --catalog "$TMP/books.csv" --restock-amount 0 >/dev/null 2>&1 &
  also_stop $!
  for _ in $(seq 1 120); do
    status | jq -e '.servers | length == 13 and all(.ready)' >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "the store did not come up" >&2
  return 1
}
