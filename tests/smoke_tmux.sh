#!/usr/bin/env bash
# Smoke test of the real app in a real terminal: sdterm runs in a detached tmux session (100x30);
# the script types a prompt, waits for the token line to count it, presses Enter, waits for "saved", sends "/cfg 4" Enter in one burst (the
# command must run, the prompt stay, nothing render), presses Tab and ] (seed + 1, a second
# render), waits for it, quits with Ctrl+Q, and checks that the process ended with status 0, that
# OUTDIR holds exactly two PNGs and that the screen never showed a traceback. The prompt has
# brackets (``[/snow]``, invalid as markup): the app is then started again on the same history,
# Ctrl+R finds the prompt, shown as written, Enter puts it back in the prompt box, Ctrl+Q quits.
#
#   tests/smoke_tmux.sh MODEL_DIR OUTDIR        (MODEL_DIR: e.g. written by `sdterm demo-model DIR`)
#
# PYTHON picks the interpreter (default: python). tmux runs on a private socket, so a tmux server
# the user already has is never touched; cache, data and config go to a temporary folder.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MODEL_DIR OUTDIR" >&2
    exit 2
fi
model=$(cd "$1" && pwd)
mkdir -p "$2"
outdir=$(cd "$2" && pwd)
python=${PYTHON:-python}
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v tmux >/dev/null || { echo "smoke: tmux is not installed" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/sdterm-smoke.XXXXXX")
socket="$work/tmux.sock"
session=smoke
screen="$work/screen.txt"   # the latest capture of the pane
seen="$work/seen.txt"       # every capture, one after the other

cleanup() {
    tmux -S "$socket" kill-server 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "smoke: FAIL: $*" >&2
    if [ -s "$screen" ]; then
        echo "---- last screen ----" >&2
        cat "$screen" >&2
        echo "---------------------" >&2
    fi
    exit 1
}

capture() {
    tmux -S "$socket" capture-pane -p -J -S - -t "$session" >"$screen" 2>/dev/null || true
    cat "$screen" >>"$seen"
    if grep -q "Traceback" "$screen"; then
        fail "the screen shows a traceback"
    fi
}

# wait_for WHAT SECONDS CONDITION...: poll (capturing the pane each time) until CONDITION holds.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    while :; do
        capture
        if "$@"; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "timed out after ${seconds}s waiting for $what"
        fi
        sleep 0.2
    done
}

on_screen() { grep -q -- "$1" "$screen"; }
pngs() { find "$outdir" -maxdepth 1 -name '*.png' | wc -l; }
pngs_are() { [ "$(pngs)" -eq "$1" ]; }
exited() { [ -s "$work/status" ]; }

cat >"$work/run.sh" <<EOF
cd "$repo"
export SDTERM_CACHE_DIR="$work/cache" SDTERM_DATA_DIR="$work/data" SDTERM_CONFIG_DIR="$work/config"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
"$python" -m sdterm --model "$model" --outdir "$outdir" --steps 3 --width 64 --height 64 \\
    --image-protocol halfcell --device cpu
echo \$? >"$work/status"
EOF

# remain-on-exit keeps the pane (and whatever was printed last) after the app ends.
tmux -S "$socket" -f /dev/null new-session -d -s "$session" -x 100 -y 30 "sleep 0.5; bash '$work/run.sh'"
tmux -S "$socket" set-option -t "$session" remain-on-exit on >/dev/null

wait_for "the app to start" 60 on_screen "no image yet"
tmux -S "$socket" send-keys -t "$session" -l "a red fox [/snow]"
# The token line under the prompt box counts the prompt as it is typed (the model is loaded).
wait_for "the token line" 60 on_screen "tokens · 1 chunk ("
tmux -S "$socket" send-keys -t "$session" Enter
wait_for "the first image" 60 on_screen "saved "
pngs_are 1 || fail "expected 1 PNG after the first render, found $(pngs)"

# A burst, as type-ahead over a slow link sends it (one write): a command right after the render.
# It must change the CFG without appending to the prompt or rendering.
tmux -S "$socket" send-keys -t "$session" "/cfg 4" Enter
wait_for "the /cfg command" 30 on_screen "CFG 4"
sleep 1
pngs_are 1 || fail "the command after the render started a render"
on_screen "a red fox \[/snow\]" || fail "the prompt did not come back after the command"

tmux -S "$socket" send-keys -t "$session" Tab
tmux -S "$socket" send-keys -t "$session" -l "]"
second() { pngs_are 2 && on_screen "cache hit"; }
wait_for "the second image (seed + 1)" 60 second

tmux -S "$socket" send-keys -t "$session" C-q
wait_for "the app to exit" 30 exited
status=$(cat "$work/status")
[ "$status" = 0 ] || fail "sdterm exited with status $status"
capture

pngs_are 2 || fail "expected 2 PNGs, found $(pngs)"

# A restart on the same history; Ctrl+R shows the bracketed prompt as written, Enter recalls it.
rm -f "$work/status"
tmux -S "$socket" clear-history -t "$session"
tmux -S "$socket" respawn-pane -k -t "$session" "sleep 0.5; bash '$work/run.sh'"
wait_for "the app to start again" 60 on_screen "no image yet"
tmux -S "$socket" send-keys -t "$session" C-r
wait_for "the history search" 30 on_screen "a red fox \[/snow\]"
tmux -S "$socket" send-keys -t "$session" -l "snow"
sleep 0.5
tmux -S "$socket" send-keys -t "$session" Enter
wait_for "the recalled prompt" 30 on_screen "(recalled) · 3 steps"
on_screen "a red fox \[/snow\]" || fail "the recalled prompt is not in the prompt box"
tmux -S "$socket" send-keys -t "$session" C-q
wait_for "the app to exit again" 30 exited
status=$(cat "$work/status")
[ "$status" = 0 ] || fail "sdterm exited with status $status after the restart"
capture
others=$(find "$outdir" -mindepth 1 ! -name '*.png' | wc -l)
[ "$others" -eq 0 ] || fail "unexpected files in $outdir: $(ls -A "$outdir")"
if grep -q "Traceback" "$seen"; then
    fail "a traceback was on the screen"
fi
echo "smoke: ok: two renders, quit cleanly, restarted and recalled a bracketed prompt ($(ls "$outdir" | tr '\n' ' '))"
