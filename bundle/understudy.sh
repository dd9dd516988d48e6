#!/bin/sh
# bin/understudy in the agent bundle: runs the bundled Node.js runtime on the
# bundled code, so the host needs no Node of its own. Works when called
# through a symlink (e.g. /usr/local/bin/understudy -> /opt/understudy/bin/understudy)
# and needs nothing on PATH but `readlink` (only when $0 is a symlink).
self=$0
while [ -L "$self" ]; do
  link=$(readlink "$self") || break
  case $link in
    /*) self=$link ;;
    *) self=${self%/*}/$link ;;
  esac
done
case $self in
  */*) dir=${self%/*} ;;
  *) dir=. ;;
esac
# -P: the physical directory, so a running process keeps its own version's files
# when install.sh later points /opt/understudy at a newer version.
root=$(cd "$dir/.." && pwd -P) || exit 1
exec "$root/node/bin/node" "$root/bin/understudy.mjs" "$@"
