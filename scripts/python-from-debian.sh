#!/usr/bin/env bash
# Usage: scripts/python-from-debian.sh VERSION          install CPython VERSION (3.14 or 3.15)
#        scripts/python-from-debian.sh --print-pins VERSION
#                                                       print sid's current versions as pins
#
# Install CPython 3.14 or 3.15 from Debian sid's binary packages, pinned below to exact package
# versions, into ${CTXKIT_PYTHONS:-$HOME/.cache/ctxkit-pythons}/VERSION, and print the
# interpreter's path (PREFIX/bin/pythonVERSION) on stdout; progress goes to stderr.
#
# How: a private apt configuration for sid (its own sources list, lists and cache under
# CTXKIT_PYTHONS/.apt, the machine's Debian keyring; the system's apt sources and state are
# never touched), `apt-get download` of the pinned packages (the interpreter, its standard
# library, the -dev packages, and sid's runtime libraries it links to, glibc included),
# `dpkg-deb -x` of each into the prefix, then Debian's patchelf points the interpreter at the
# prefix's own ld.so and library directory, so the machine's glibc is never mixed with sid's.
# The -dev headers get the symlink that C-extension builds need.
#
# Idempotent: when PREFIX already holds these exact pins and its interpreter runs, nothing is
# downloaded. When sid no longer has a pinned version, it fails naming the package, the pinned
# version and what sid has now: update the pins below (--print-pins VERSION prints them), or set
# CTXKIT_DEBIAN_MIRROR to a snapshot.debian.org URL that still serves them, e.g.
# http://snapshot.debian.org/archive/debian/20261207T000000Z
#
# Needs dpkg-deb, apt-get and patchelf (installed with apt-get from the machine's own suite when
# missing, which needs root). Debian leaves ensurepip out: make a venv with --without-pip and
# bootstrap pip from its wheel (scripts/venv.sh does).
set -euo pipefail

# --- pins (sid, 2026-12-07) ------------------------------------------------------------------
# The runtime libraries the interpreter and its lib-dynload modules link to, glibc first.
runtime_libs=(
    libc6=2.43-7
    libgcc-s1=16.2.0-4
    libssl3t64=3.6.5-1
    libexpat1=2.9.0-1
    zlib1g=1:1.3.dfsg+really1.3.2-4
    libzstd1=1.5.7+dfsg-4
    libbz2-1.0=1.0.8-6+b2
    libffi8=3.8.0-2
    liblzma5=5.8.4-1
    libncursesw6=6.6+20260608-2
    libreadline8t64=8.3-4
    libsqlite3-0=3.53.4-2
    libtinfo6=6.6+20260608-2
    libuuid1=2.42.4-1
)
pins_3_14=(
    python3.14=3.14.10-1
    python3.14-minimal=3.14.10-1
    libpython3.14=3.14.10-1
    libpython3.14-minimal=3.14.10-1
    libpython3.14-stdlib=3.14.10-1
    python3.14-dev=3.14.10-1
    libpython3.14-dev=3.14.10-1
    libdb5.3t64=5.3.28+dfsg2-11+b1
)
pins_3_15=(
    python3.15=3.15.2-1
    python3.15-minimal=3.15.2-1
    libpython3.15=3.15.2-1
    libpython3.15-minimal=3.15.2-1
    libpython3.15-stdlib=3.15.2-1
    python3.15-dev=3.15.2-1
    libpython3.15-dev=3.15.2-1
)
# ----------------------------------------------------------------------------------------------

mirror=${CTXKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${CTXKIT_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
multiarch=x86_64-linux-gnu

say() { echo "python-from-debian: $*" >&2; }
die() {
    say "$*"
    exit 1
}

print_pins=0
if [ "${1:-}" = "--print-pins" ]; then
    print_pins=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: scripts/python-from-debian.sh [--print-pins] VERSION   (VERSION: 3.14 or 3.15)" >&2
    exit 2
fi
version=$1
case "$version" in
    3.14) pins=("${pins_3_14[@]}" "${runtime_libs[@]}") ;;
    3.15) pins=("${pins_3_15[@]}" "${runtime_libs[@]}") ;;
    *) die "no pins for Python $version; this script installs 3.14 or 3.15" ;;
esac
[ "$(uname -m)" = x86_64 ] || die "the pins are for amd64 (x86_64); this machine is $(uname -m)"
for tool in apt-get apt-cache dpkg-deb flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH (this script needs a Debian-like system)"
done

root=${CTXKIT_PYTHONS:-$HOME/.cache/ctxkit-pythons}
mkdir -p "$root"
root=$(cd "$root" && pwd) # the interpreter's ld.so path is absolute
prefix=$root/$version
python=$prefix/bin/python$version
stamp=$prefix/.ctxkit-pins
wanted=$(printf '%s\n' "prefix=$prefix" "${pins[@]}")

# Installed with these pins and working: nothing to do (checked again under the lock below).
installed() {
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$python" -c pass >/dev/null 2>&1
}
if [ "$print_pins" -eq 0 ] && installed; then
    echo "$python"
    exit 0
fi

# One run at a time per machine user: the apt state under $root/.apt is shared.
exec 9>"$root/.lock"
flock 9
if [ "$print_pins" -eq 0 ] && installed; then
    echo "$python"
    exit 0
fi

# --- private apt configuration for sid -------------------------------------------------------
apt_dir=$root/.apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
[ -r "$keyring" ] || die "no Debian archive keyring at $keyring (install debian-archive-keyring, or set CTXKIT_DEBIAN_KEYRING)"
echo "deb [arch=amd64 signed-by=$keyring] $mirror sid main" >"$apt_dir/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferences=$apt_dir/preferences"
    -o "Dir::Etc::preferencesparts=$apt_dir/preferences.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures=amd64"
    -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none"
)
: >"$apt_dir/preferences"
mkdir -p "$apt_dir/preferences.d"
refreshed=0
refresh_lists() {
    say "reading sid's package lists from $mirror"
    apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update of sid from $mirror failed (network, or mirror)"
    refreshed=1
}
sid_versions="" # "PACKAGE VERSION" lines of every pinned package, read once per apt state
read_versions() {
    local names=("${pins[@]%%=*}")
    sid_versions=$(apt-cache "${apt_opts[@]}" madison "${names[@]}" 2>/dev/null | awk -F'|' '{
        gsub(/ /, "", $1); gsub(/ /, "", $2); print $1 " " $2 }')
}
available() { # PACKAGE -> sid's versions, one per line
    awk -v p="$1" '$1 == p {print $2}' <<<"$sid_versions"
}
missing_pins() { # -> the pins sid does not have, one per line
    read_versions
    for pin in "${pins[@]}"; do
        available "${pin%%=*}" | grep -qxF -- "${pin#*=}" || echo "$pin"
    done
}

if [ "$print_pins" -eq 1 ]; then
    refresh_lists
    read_versions
    for pin in "${pins[@]}"; do
        now=$(available "${pin%%=*}" | head -n 1)
        echo "    ${pin%%=*}=${now:-<not in sid>}"
    done
    exit 0
fi

if ! ls "$apt_dir/lists/"*_Packages* >/dev/null 2>&1; then
    refresh_lists
fi
mapfile -t missing < <(missing_pins)
if [ ${#missing[@]} -gt 0 ] && [ "$refreshed" -eq 0 ]; then
    refresh_lists # the lists may be older than the pins
    mapfile -t missing < <(missing_pins)
fi
if [ ${#missing[@]} -gt 0 ]; then
    read_versions
    for pin in "${missing[@]}"; do
        now=$(available "${pin%%=*}" | paste -sd, -)
        say "sid ($mirror) no longer has ${pin%%=*} version ${pin#*=} (it has: ${now:-nothing})"
    done
    die "update the pins for Python $version in scripts/python-from-debian.sh" \
        "(\`bash scripts/python-from-debian.sh --print-pins $version\` prints sid's current versions)," \
        "or set CTXKIT_DEBIAN_MIRROR to a snapshot.debian.org URL that still has them"
fi

# --- patchelf, from the machine's own suite --------------------------------------------------
if ! command -v patchelf >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "patchelf is not on PATH and installing it needs root: apt-get install patchelf"
    say "installing patchelf from this machine's own apt sources"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends patchelf >&2; then
        apt-get update -qq >&2 # a fresh CI machine may never have read its lists
        apt-get install -y -qq --no-install-recommends patchelf >&2
    fi
    command -v patchelf >/dev/null 2>&1 || die "installed patchelf but it is still not on PATH"
fi

# --- download, unpack, patch -----------------------------------------------------------------
build=$(mktemp -d "$root/.build-$version.XXXXXX")
trap 'rm -rf "$build"' EXIT
mkdir "$build/debs" "$build/root"
say "downloading ${#pins[@]} packages of Python $version from sid"
(cd "$build/debs" && apt-get "${apt_opts[@]}" -qq download "${pins[@]}" >&2) \
    || die "apt-get download of the pinned packages from $mirror failed"
for deb in "$build/debs"/*.deb; do
    dpkg-deb -x "$deb" "$build/root"
done

# Everything lives under usr/ in sid (merged /usr); the prefix is that usr/ directory.
stage=$build/root/usr
[ -x "$stage/bin/python$version" ] || die "the packages hold no usr/bin/python$version"
if [ -d "$build/root/etc" ]; then
    mv "$build/root/etc" "$stage/etc"
fi
# Absolute symlinks (e.g. into /etc/python3.x or /usr/lib/...) would reach the machine's own
# files: point them into the prefix instead, or drop them when the prefix has no such file.
while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    case "$target" in
        /usr/*) inside=$stage/${target#/usr/} ;;
        /*) inside=$stage${target} ;;
    esac
    if [ -e "$inside" ]; then
        ln -sfn "$(realpath --relative-to="$(dirname "$link")" "$inside")" "$link"
    else
        rm -f "$link"
    fi
done < <(find "$stage" -type l -lname '/*' -print0)
# pyconfig.h includes <x86_64-linux-gnu/python3.X/pyconfig.h>; C builds pass -Iinclude/python3.X.
ln -sfn "../$multiarch" "$stage/include/python$version/$multiarch"

libdir=$prefix/lib/$multiarch
patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$libdir" \
    "$stage/bin/python$version"
printf '%s\n' "$wanted" >"$stage/.ctxkit-pins.new"

rm -rf "$prefix"
mv "$stage" "$prefix"
# Every lib-dynload module must resolve its libraries inside the prefix (a missing runtime pin
# would otherwise load the machine's own copy, built for another glibc).
outside=$(
    for so in "$prefix/lib/python$version/lib-dynload/"*.so; do
        "$libdir/ld-linux-x86-64.so.2" --library-path "$libdir" --list "$so" 2>&1 \
            | awk -v so="${so##*/}" -v p="$prefix/" '/=>/ && index($3, p) != 1 {print so ": " $0}'
    done
)
[ -z "$outside" ] || die "lib-dynload modules link outside $prefix (add their packages to the pins):
$outside"
"$python" -c "import ssl, sqlite3, ctypes, lzma, bz2, readline, zlib, decimal, uuid" \
    || die "$python does not import its standard library modules"
mv "$prefix/.ctxkit-pins.new" "$stamp"
say "installed $("$python" --version) in $prefix"
echo "$python"
