#!/usr/bin/env bash
# Entrypoint with the interface of the official redis image:
#   `redis-server [config file] [--options]`, config file or options alone
#   imply redis-server, /data owned by redis, server runs as redis.
# Like the official image (which compiles it in), protected mode is off unless
# the config file or the command line sets protected-mode explicitly.
set -eo pipefail

# first arg is `-f` or `--some-option`, or first arg is `something.conf`
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi

# running as root: own the data dir, then restart this script as redis
if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
	find . \! -user redis -exec chown redis '{}' + ||
		echo "warning: could not chown everything in $PWD to redis" >&2
	export HOME=/data
	exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

case "${2:-}" in
-v | --version | -h | --help | --test-memory | --check-system) skip=1 ;;
*) skip= ;;
esac
if [ "$1" = 'redis-server' ] && [ -z "$skip" ]; then
	shift
	conf=
	if [ $# -gt 0 ] && { [ "$1" = - ] || [ "${1#-}" = "$1" ]; }; then
		conf="$1" # redis-server takes the config file as its first argument
		shift
	fi
	protected=
	if [ -n "$conf" ] && [ -r "$conf" ] &&
		grep -qiE '^[[:space:]]*protected-mode[[:space:]]' "$conf"; then
		protected=1
	fi
	for arg; do
		case "$arg" in --protected-mode | --protected-mode=*) protected=1 ;; esac
	done
	if [ -z "$protected" ]; then
		set -- --protected-mode no "$@"
	fi
	set -- redis-server ${conf:+"$conf"} "$@"
fi

# set an appropriate umask (if one isn't set already), like the official image
um="$(umask)"
if [ "$um" = '0022' ]; then
	umask 0077
fi

exec "$@"
