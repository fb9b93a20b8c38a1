#!/usr/bin/env bash
# Cuts the trace excerpts shipped in traces/ from the NASA-HTTP 1995
# per-second request counts (../shared/traces, or the file given), so that
# anyone can check them against the source. One count per line, after a
# `#` header that says where the excerpt comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
source="${1:-../shared/traces/nasa-http-1995-per-second.txt.xz}"
out=traces

# excerpt NAME FIRST_LINE SECONDS DESCRIPTION
excerpt() {
    local name=$1 first=$2 seconds=$3 description=$4
    {
        echo "# $description"
        echo "# NASA-HTTP 1995 per-second request counts (Internet Traffic Archive),"
        echo "# lines $first to $((first + seconds - 1)) of $(basename "$source"), one second a line."
        xz -dc "$source" | tr -s ' \n' '\n' | grep -v '^$' | sed -n "${first},$((first + seconds - 1))p"
    } >"$out/$name.txt"
    echo "$out/$name.txt: $seconds s"
}

# Day d (0 = 1 July) starts at line d * 86400 + 1 (00:00:01 local time).
excerpt nasa-daily-cycle $((5 * 86400 + 1)) 86400 \
    "A daily cycle: Thursday 6 July 1995, 00:00 to 24:00 (hourly means 0.4 to 2.0/s)."
excerpt nasa-spike $((12 * 86400 + 6 * 3600 + 1)) 21600 \
    "The spike of 13 July 1995, 06:00 to 12:00 (hourly means 0.7 to 4.1/s; the busiest minute, 09:49, is 6.8/s)."
excerpt nasa-night-rise $((9 * 86400 + 1)) 43200 \
    "A quiet night with a rise: Monday 10 July 1995, 00:00 to 12:00 (hourly means 0.2 to 1.4/s)."

# A synthetic step and spike, in the same units (requests a second before
# scaling) and on the same time scale as the excerpts (minutes, not
# seconds): 200 s at 0.5, a step to 2 for 300 s, a spike to 5 for 100 s,
# 200 s back at 2, then 400 s at 0.5 (20 minutes).
{
    echo "# Synthetic: a step from 0.5 to 2/s, a 100 s spike to 5/s, and back down (1,200 s)."
    for spec in 0.5:200 2:300 5:100 2:200 0.5:400; do
        for _ in $(seq "${spec#*:}"); do echo "${spec%:*}"; done
    done
} >"$out/step-and-spike.txt"
echo "$out/step-and-spike.txt: 1200 s"
