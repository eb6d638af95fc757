#!/bin/sh
# The commits since a tag or commit ($1; default: the last tag, else the first commit), one per line:
#   - subject (short hash)
set -eu
since="${1:-$(git describe --tags --abbrev=0 2>/dev/null || true)}"
if [ -n "$since" ]; then
    range="$since..HEAD"
else
    range="HEAD"
fi
git log --no-merges --format='- %s (%h)' "$range"
