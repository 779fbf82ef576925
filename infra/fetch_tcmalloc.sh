#!/usr/bin/env bash
# Put libtcmalloc_minimal.so.4 into DEST (the virtual environment's lib/), where
# peftflow.training.allocator finds it: CPU training then keeps its RSS near the memory it uses
# (glibc malloc fragments: see src/peftflow/allocator.py for the measurements).
# Best effort: without apt (or offline) training runs with glibc malloc, as before.
set -uo pipefail
dest=${1:?usage: fetch_tcmalloc.sh DEST}
for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
  if [[ -f $dir/libtcmalloc_minimal.so.4 ]]; then
    echo "tcmalloc: using the system's $dir/libtcmalloc_minimal.so.4"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "tcmalloc: no apt here; CPU training uses glibc malloc (see docs/memory.md)"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download libtcmalloc-minimal4 >/dev/null 2>&1); then
  echo "tcmalloc: apt-get download libtcmalloc-minimal4 failed; CPU training uses glibc malloc"
  exit 0
fi
dpkg-deb -x "$work"/libtcmalloc-minimal4_*.deb "$work/root"
library=$(find "$work/root" -name 'libtcmalloc_minimal.so.4' | head -n 1)
if [[ -z $library ]]; then
  echo "tcmalloc: the package holds no libtcmalloc_minimal.so.4; CPU training uses glibc malloc"
  exit 0
fi
mkdir -p "$dest"
cp -L "$library" "$dest/libtcmalloc_minimal.so.4"
echo "tcmalloc: $dest/libtcmalloc_minimal.so.4"
