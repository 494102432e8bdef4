#!/bin/sh
# Runs on its #! line. Builtins only: the LWK has no fork/exec yet.
echo "script: $# args: $*"
for a in "$@"; do printf '[%s]\n' "$a"; done
i=0
total=0
while read -r line; do
    i=$((i + 1))
    total=$((total + ${#line}))
done
printf 'read %d lines, %d chars\n' "$i" "$total"
printf 'HOME is %s\n' "${HOME:-unset}" >&2
exit 7
