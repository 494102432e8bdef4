#!/bin/sh -e
# The interpreter argument (-e) must reach sh: `false` ends the script
# with status 1 and the last line is never printed.
echo "before false"
n=0
while [ "$n" -lt 3 ]; do n=$((n + 1)); echo "step $n"; done
false
echo "not reached: -e was lost"
