#!/bin/sh
# Install or upgrade the understudy agent from this unpacked bundle.
#
#   <prefix>/understudy-<version>/      the program (this bundle's files)
#   <prefix>/understudy -> understudy-<version>
#   <etc>/understudy/agent.yaml         written only when there is none
#   <etc>/systemd/system/understudy-agent.service
#
# Safe to run again (nothing changes when this version is already installed)
# and for upgrades: the new version is copied next to the old one and tried
# (`understudy --version` with the bundled runtime) before the symlink is
# swapped in one rename, so <prefix>/understudy always names a complete
# version. The previous version stays for a rollback, and a running agent
# keeps using its own files until it is restarted.
set -eu

usage() {
  cat <<'EOF'
usage: install.sh [--prefix DIR] [--etc DIR] [--no-systemd]
  --prefix DIR   install into DIR/understudy-<version> and point DIR/understudy at it (default /opt)
  --etc DIR      configuration root: DIR/understudy/agent.yaml, DIR/systemd/system (default /etc)
  --no-systemd   do not install the systemd unit
EOF
}

die() {
  echo "install.sh: $*" >&2
  exit 1
}

prefix=/opt
etc=/etc
systemd=yes
while [ $# -gt 0 ]; do
  case $1 in
    --prefix | --etc)
      [ $# -ge 2 ] || { usage >&2; exit 2; }
      if [ "$1" = --prefix ]; then prefix=$2; else etc=$2; fi
      shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --etc=*) etc=${1#*=}; shift ;;
    --no-systemd) systemd=no; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

src=$(cd "$(dirname "$0")" && pwd -P)
[ -f "$src/VERSION" ] && [ -x "$src/bin/understudy" ] || die "run me from an unpacked understudy agent bundle ($src has no VERSION or bin/understudy)"
version=$(cat "$src/VERSION")
case $version in '' | *[!A-Za-z0-9.+_-]*) die "bad VERSION in $src: '$version'" ;; esac
name=understudy-$version

# Absolute paths; the unit file names the program by path, so keep them plain.
mkdir -p "$prefix" "$etc"
prefix=$(cd "$prefix" && pwd)
etc=$(cd "$etc" && pwd)
for p in "$prefix" "$etc"; do
  case $p in *[!A-Za-z0-9._/+-]*) die "use paths of letters, digits and . _ / + - for --prefix and --etc (they go into the unit file): $p" ;; esac
done
dest=$prefix/$name
link=$prefix/understudy
if [ -e "$link" ] && [ ! -L "$link" ]; then
  die "$link exists and is not a symlink (an install by other means?); move it away first"
fi
prev=$(readlink "$link" 2>/dev/null || true)

stage=
copy=
trash=
tmplink=
cleanup() { rm -rf ${stage:+"$stage"} ${copy:+"$copy"} ${trash:+"$trash"} ${tmplink:+"$tmplink"}; }
trap cleanup EXIT
trap 'exit 129' HUP PIPE
trap 'exit 130' INT TERM

# Try a copy of the program with its own runtime: a host it cannot run on
# (wrong architecture, glibc older than 2.28) fails here, before anything changes.
try_version() {
  got=$(unset NODE_OPTIONS && "$1/bin/understudy" --version 2>&1) || die "the bundled runtime does not run on this host: $got"
  [ "$got" = "$version" ] || die "$1/bin/understudy --version printed '$got', expected '$version'"
}

# Point $link at $1 (a name in $prefix) with one rename(2), done by the
# bundled node ($runtime): `mv new-link $link` would move the new link into
# the directory the old one points at.
point_link() {
  tmplink=$prefix/.understudy.link.$$
  rm -f "$tmplink"
  ln -s "$1" "$tmplink"
  "$runtime" -e 'process.getBuiltinModule("node:fs").renameSync(process.argv[1], process.argv[2])' "$tmplink" "$link"
  tmplink=
}

relink=no
[ "$prev" = "$name" ] || relink=yes
if [ -d "$dest" ] && command -v diff >/dev/null 2>&1 && diff -r "$src" "$dest" >/dev/null 2>&1; then
  runtime=$dest/node/bin/node
  echo "understudy $version: $dest is already installed"
else
  stage=$prefix/.$name.new.$$
  mkdir "$stage"
  cp -pR "$src/." "$stage/"
  if [ "$(id -u)" = 0 ]; then chown -R 0:0 "$stage"; fi
  chmod -R go-w "$stage"
  try_version "$stage"
  runtime=$stage/node/bin/node
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    # Another build of the same version: the old copy goes, after the link
    # (if it names this version) is pointed at the staged copy, and the new
    # one goes in as a second copy, so the link never dangles.
    trash=$prefix/.$name.old.$$
    if [ "$prev" = "$name" ]; then
      point_link "${stage##*/}"
      copy=$prefix/.$name.copy.$$
      mkdir "$copy"
      cp -pR "$stage/." "$copy/"
      mv "$dest" "$trash"
      mv "$copy" "$dest"
      copy=
      relink=yes
    else
      mv "$dest" "$trash"
      mv "$stage" "$dest"
      stage=
      runtime=$dest/node/bin/node
    fi
  else
    mv "$stage" "$dest"
    stage=
    runtime=$dest/node/bin/node
  fi
  echo "understudy $version: installed $dest"
fi
[ $relink = no ] || point_link "$name"
if [ -n "$prev" ] && [ "$prev" != "$name" ]; then echo "$link -> $name (was $prev)"; else echo "$link -> $name"; fi

confdir=$etc/understudy
mkdir -p "$confdir"
if [ -e "$confdir/agent.yaml" ] || [ -L "$confdir/agent.yaml" ]; then
  newconf=no
  echo "kept $confdir/agent.yaml"
else
  tmpconf=$confdir/.agent.yaml.$$
  (umask 077 && cp "$src/agent.yaml.example" "$tmpconf")
  # ln, not mv: it refuses to replace a config that appeared meanwhile
  ln "$tmpconf" "$confdir/agent.yaml" 2>/dev/null && newconf=yes || newconf=no
  rm -f "$tmpconf"
  [ $newconf = yes ] && echo "wrote $confdir/agent.yaml (from agent.yaml.example)" || echo "kept $confdir/agent.yaml"
fi

unit=
if [ $systemd = yes ]; then
  unitdir=$etc/systemd/system
  mkdir -p "$unitdir"
  unit=$unitdir/understudy-agent.service
  sed -e "s#/opt/understudy/#$link/#g" -e "s#/etc/understudy/#$confdir/#g" "$dest/understudy-agent.service" >"$unit.tmp.$$"
  chmod 0644 "$unit.tmp.$$"
  mv -f "$unit.tmp.$$" "$unit"
  echo "installed $unit"
  if [ "$etc" = /etc ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
  fi
fi

if [ -n "$prev" ] && [ "$prev" != "$name" ] && [ -d "$prefix/$prev" ]; then
  echo "the previous version stays in $prefix/$prev (roll back: run its install.sh; remove it when no longer needed)"
fi

bin=$link/bin/understudy
echo
echo "next steps:"
if [ $newconf = yes ]; then
  echo "  - certificates (mTLS): on the machine that keeps the CA"
  echo "      $bin certs init --dir ./pki        # once"
  echo "      $bin certs issue --dir ./pki --name <name> --host <this host's address> --out ./<name>"
  echo "    then copy <name>/ca.crt, <name>.crt and <name>.key into $confdir/"
  echo "  - edit $confdir/agent.yaml (every CHANGE-ME)"
fi
if [ -n "$unit" ]; then
  if [ -n "$prev" ] && [ "$prev" != "$name" ]; then
    echo "  - systemctl restart understudy-agent     # a running agent keeps its old version until restarted"
  else
    echo "  - systemctl enable --now understudy-agent"
  fi
  echo "  - journalctl -u understudy-agent -f"
else
  echo "  - run: $bin agent --config $confdir/agent.yaml   (with MALLOC_MMAP_THRESHOLD_=131072 in its environment)"
fi
echo "  - $bin status --agent <listen address> --config $confdir/agent.yaml"
