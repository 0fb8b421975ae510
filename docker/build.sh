#!/usr/bin/env bash
# Builds the `quire:latest` image: the release binary and the libraries `ldd` says it needs,
# in an image made FROM scratch (nothing is pulled).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin quire
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
root="$context/rootfs"
mkdir -p "$root/bin" "$root/data"
install -d -m 1777 "$root/tmp"   # SQLite's temporary files
cp target/release/quire "$root/bin/quire"
command -v strip >/dev/null && strip "$root/bin/quire"
for lib in $(ldd target/release/quire | awk '/=>/ {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp docker/Dockerfile "$context/"
docker build -q -t quire:latest "$context" >/dev/null
docker image inspect quire:latest --format 'built quire:latest ({{.Size}} bytes)'
