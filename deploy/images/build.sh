#!/usr/bin/env bash
# Build local stand-ins for the official Docker Hub `postgres` and `redis`
# images, plus a toolbox image, without any container registry:
#
#   orkestr-local/base:bookworm    debootstrap'ed Debian 12 with the packages in base/packages
#   orkestr-local/postgres:15      official-postgres-compatible entrypoint (postgres/)
#   orkestr-local/redis:7          official-redis-compatible entrypoint (redis/)
#   orkestr-local/toolbox:bookworm psql, pgbench, redis-cli, redis-benchmark (toolbox/)
#
# Idempotent: every image carries the label orkestr.build-hash (sha256 over
# the files it is built from) and is only rebuilt when that hash changes. The
# base (debootstrap, needs root and the Debian mirror) is only rebuilt when
# base/ changes or the base image is missing.
#
# Usage: deploy/images/build.sh [--force]
#   --force            rebuild everything (e.g. to pick up Debian updates)
# Environment:
#   ORKESTR_IMAGE_PREFIX  repository prefix (default orkestr-local)
#   DEBIAN_MIRROR         mirror to debootstrap from (default: the first
#                         `bookworm main` source in the machine's apt config)
#   TMPDIR                where the rootfs is assembled (default /var/tmp)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITE=bookworm
PREFIX="${ORKESTR_IMAGE_PREFIX:-orkestr-local}"
BASE_IMAGE="$PREFIX/base:$SUITE"
HASH_LABEL=orkestr.build-hash
BASE_LABEL=orkestr.base-image-id
# image name -> build context directory (under $HERE)
IMAGES=("$PREFIX/postgres:15=postgres" "$PREFIX/redis:7=redis" "$PREFIX/toolbox:$SUITE=toolbox")
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

FORCE=0
case "${1:-}" in
	--force) FORCE=1 ;;
	'') ;;
	-h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
	*) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

START=$SECONDS
log() { printf '[images %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "cannot talk to the docker daemon"

# sha256 over path, mode and content of every file under the given
# directories (relative to $HERE), so a hash only depends on what it builds.
hash_dirs() {
	(
		cd "$HERE"
		find "$@" -type f -printf '%p %m\n' | LC_ALL=C sort
		find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
	) | sha256sum | cut -d' ' -f1
}

image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
image_label() {
	local v
	v="$(docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true)"
	[ "$v" = '<no value>' ] && v=
	printf '%s' "$v"
}

# Remove an image that lost its tag by being rebuilt (ignore if still in use).
drop_if_untagged() {
	local id="$1"
	[ -n "$id" ] || return 0
	if [ "$(docker image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null || echo 1)" = 0 ]; then
		docker rmi "$id" >/dev/null 2>&1 || true
	fi
}

# First URI of an enabled `deb` source for suite $1 with component main, read
# from the machine's apt configuration (one-line .list and deb822 .sources),
# in apt's order: sources.list, then sources.list.d/ sorted by name.
apt_source_uri() {
	local suite="$1" f uri
	local files=()
	[ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
	for f in /etc/apt/sources.list.d/*; do
		case "$f" in *.list|*.sources) [ -f "$f" ] && files+=("$f") ;; esac
	done
	for f in "${files[@]}"; do
		case "$f" in
		*.sources)
			uri="$(awk -v suite="$suite" '
				function flush(   n, i, m, S, C, U) {
					if ((" " types " ") ~ / deb / && enabled !~ /^(no|false|0)$/) {
						m = 0; n = split(comps, C); for (i = 1; i <= n; i++) if (C[i] == "main") m = 1
						if (m) {
							n = split(suites, S)
							for (i = 1; i <= n; i++) if (S[i] == suite) {
								split(uris, U)
								if (U[1] ~ /^(https?|ftp|file):/) { print U[1]; found = 1; exit }
							}
						}
					}
					types = uris = suites = comps = enabled = field = ""
				}
				/^#/ { next }
				/^[ \t]*$/ { flush(); next }
				/^[ \t]/ {
					v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
					if (field == "types") types = types " " v
					else if (field == "uris") uris = uris " " v
					else if (field == "suites") suites = suites " " v
					else if (field == "components") comps = comps " " v
					next
				}
				{
					i = index($0, ":"); if (!i) next
					field = tolower(substr($0, 1, i - 1)); v = substr($0, i + 1); gsub(/^[ \t]+|[ \t]+$/, "", v)
					if (field == "types") types = v
					else if (field == "uris") uris = v
					else if (field == "suites") suites = v
					else if (field == "components") comps = v
					else if (field == "enabled") enabled = tolower(v)
				}
				END { if (!found) flush() }
			' "$f")" ;;
		*)
			uri="$(awk -v suite="$suite" '
				{ sub(/#.*/, "") }
				$1 != "deb" { next }
				{
					l = $0; sub(/^[ \t]*deb[ \t]+/, "", l); sub(/^\[[^]]*\][ \t]*/, "", l)
					n = split(l, a); m = 0
					for (i = 3; i <= n; i++) if (a[i] == "main") m = 1
					if (a[2] == suite && m && a[1] ~ /^(https?|ftp|file):/) { print a[1]; exit }
				}
			' "$f")" ;;
		esac
		if [ -n "$uri" ]; then printf '%s\n' "$uri"; return 0; fi
	done
	return 1
}

WORK=
cleanup() {
	local rc=$? m
	if [ -n "$WORK" ] && [ -d "$WORK" ]; then
		# anything still mounted inside the rootfs (proc, sys from debootstrap)
		while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
			awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
		rm -rf --one-file-system "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_base() {
	local hash="$1" mirror updates security root pkgs
	[ "$(id -u)" = 0 ] || die "building $BASE_IMAGE needs root (debootstrap, chroot)"
	if ! command -v debootstrap >/dev/null; then
		log "installing debootstrap"
		apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
			{ apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
	fi
	mirror="${DEBIAN_MIRROR:-}"
	[ -n "$mirror" ] || mirror="$(apt_source_uri "$SUITE")" ||
		die "no '$SUITE main' deb source in the apt configuration (set DEBIAN_MIRROR)"
	updates="$(apt_source_uri "$SUITE-updates" || true)"
	security="$(apt_source_uri "$SUITE-security" || true)"

	WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/orkestr-rootfs.XXXXXX")"
	root="$WORK/rootfs"
	log "base: debootstrap --variant=minbase $SUITE from $mirror"
	if ! debootstrap --variant=minbase --components=main "$SUITE" "$root" "$mirror" \
		>"$WORK/debootstrap.log" 2>&1; then
		tail -n 30 "$WORK/debootstrap.log" >&2
		[ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
		die "debootstrap failed"
	fi

	{
		echo "deb $mirror $SUITE main"
		[ -z "$updates" ] || echo "deb $updates $SUITE-updates main"
		[ -z "$security" ] || echo "deb $security $SUITE-security main"
	} >"$root/etc/apt/sources.list"
	cp -L /etc/resolv.conf "$root/etc/resolv.conf"
	mkdir -p "$root/tmp/orkestr-setup"
	cp "$HERE/base/setup.sh" "$HERE/base/packages" "$root/tmp/orkestr-setup/"
	pkgs="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/base/packages" | tr '\n' ' ')"
	log "base: installing ${pkgs% }${security:+ (with $SUITE-security updates)}"
	mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
	if ! chroot "$root" /usr/bin/env -i PATH="$DEFAULT_PATH" HOME=/root \
		bash /tmp/orkestr-setup/setup.sh /tmp/orkestr-setup/packages >"$WORK/setup.log" 2>&1; then
		tail -n 40 "$WORK/setup.log" >&2
		die "package installation in the rootfs failed"
	fi
	umount "$root/proc"

	# No traces of this machine in the image (docker provides these at run time).
	rm -rf "$root/tmp/orkestr-setup" "$root/debootstrap"
	: >"$root/etc/resolv.conf"
	: >"$root/etc/hostname"
	rm -rf "${root:?}"/dev/* "${root:?}"/proc/* "${root:?}"/sys/* "${root:?}"/run/*

	log "base: importing rootfs ($(du -sh --one-file-system "$root" | cut -f1)) as $BASE_IMAGE"
	local old
	old="$(image_id "$BASE_IMAGE")"
	tar --numeric-owner -C "$root" -c . | docker import \
		-c "LABEL $HASH_LABEL=$hash" \
		-c "ENV PATH=$DEFAULT_PATH" \
		-c 'CMD ["bash"]' \
		- "$BASE_IMAGE" >/dev/null
	drop_if_untagged "$old"
	rm -rf --one-file-system "$WORK"
	WORK=
}

build_image() {
	local name="$1" dir="$2" hash="$3" base_id="$4" old logf
	old="$(image_id "$name")"
	logf="$(mktemp "${TMPDIR:-/tmp}/orkestr-build.XXXXXX")"
	log "$name: docker build from $dir/"
	if ! docker build --pull=false \
		--build-arg "BASE_IMAGE=$BASE_IMAGE" \
		--label "$HASH_LABEL=$hash" \
		--label "$BASE_LABEL=$base_id" \
		-t "$name" "$HERE/$dir" >"$logf" 2>&1; then
		tail -n 40 "$logf" >&2
		rm -f "$logf"
		die "docker build of $name failed"
	fi
	rm -f "$logf"
	drop_if_untagged "$old"
}

# ---------------------------------------------------------------------------
base_hash="$(hash_dirs base)"
declare -A want=()
for entry in "${IMAGES[@]}"; do
	name="${entry%%=*}" dir="${entry#*=}"
	want[$name]="$(hash_dirs base "$dir")"
done

base_id="$(image_id "$BASE_IMAGE")"
if [ "$FORCE" = 1 ] || [ -z "$base_id" ] || [ "$(image_label "$BASE_IMAGE" "$HASH_LABEL")" != "$base_hash" ]; then
	build_base "$base_hash"
	base_id="$(image_id "$BASE_IMAGE")"
else
	log "$BASE_IMAGE: up to date"
fi

for entry in "${IMAGES[@]}"; do
	name="${entry%%=*}" dir="${entry#*=}"
	if [ "$FORCE" = 0 ] &&
		[ "$(image_label "$name" "$HASH_LABEL")" = "${want[$name]}" ] &&
		[ "$(image_label "$name" "$BASE_LABEL")" = "$base_id" ]; then
		log "$name: up to date"
	else
		build_image "$name" "$dir" "${want[$name]}" "$base_id"
	fi
done

for entry in "$BASE_IMAGE=" "${IMAGES[@]}"; do
	name="${entry%%=*}"
	log "$(docker image inspect -f "{{.Size}}" "$name" | awk -v n="$name" '{ printf "%-34s %4d MB", n, $1 / 1000000 }')"
done
log "done"
