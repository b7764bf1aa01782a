#!/bin/sh
# Every Vagrant machine: install srmig with the repository's own `./run setup` (Debian packages, kernel
# headers for bcc, the virtualenv, the guest image), exactly as on a bare Debian 12 machine. Idempotent: a
# second run only checks stamps.
#
# Environment (defaults in brackets):
#   SRMIG_ROOT   the repository, synced by the Vagrantfile [/srmig]
#   SRMIG_VENV   the virtualenv [/opt/srmig/venv], outside the synced folder so `vagrant rsync` (which
#                deletes what the host does not have) leaves it alone
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
ROOT=${SRMIG_ROOT:-$(cd "$HERE/../.." && pwd)}
export SRMIG_VENV
[ -f "$ROOT/run" ] || die "$ROOT/run not found: is the repository synced to $ROOT?"
log "srmig setup from $ROOT (venv $SRMIG_VENV)"
bash "$ROOT/run" setup
log "srmig installed: $(command -v srmig)"
