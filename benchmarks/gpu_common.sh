# Sourced by gpu_check.sh and gpu_check_triton.sh (never run alone): the prelude both share.
# In: $1 = OUTDIR, DEADLINE_DEFAULT_S, SCRATCH_PREFIX. Out: OUT (absolute, created), the repository root as the
# working directory (REPO), PY, DEV (GPU_CHECK_DEVICE, default cuda), DEADLINE_S, T0, SCRATCH, and the clock
# helpers now / left / clamp.
OUT=${1:?usage: $0 OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
DEADLINE_S=${DEADLINE_S:-$DEADLINE_DEFAULT_S}
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE_S - $(now) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/$SCRATCH_PREFIX.XXXXXX")
