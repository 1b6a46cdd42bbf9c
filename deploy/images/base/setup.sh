#!/usr/bin/env bash
# Runs INSIDE the freshly debootstrapped rootfs (via chroot), called by
# ../build.sh with the package list as $1. apt sources are already in place.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive LC_ALL=C
pkg_list="$1"

# Never start services from maintainer scripts (there is no init here).
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d

# Keep the image small: no docs, man pages, translations or recommends.
cat > /etc/dpkg/dpkg.cfg.d/01-orkestr-slim <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
cat > /etc/apt/apt.conf.d/01-orkestr-slim <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF

# Same uid/gid as the official postgres image (999), created before the
# packages so postgresql-common reuses it. The redis image remaps redis to 999.
groupadd --system --gid 999 postgres
useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
	--shell /bin/bash --comment 'PostgreSQL administrator' postgres

# The images create their cluster with initdb at container start (like the
# official image), so postgresql-common must not create 15/main now.
mkdir -p /etc/postgresql-common/createcluster.d
echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/orkestr.conf

mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$pkg_list")
apt-get update -qq
apt-get dist-upgrade -y -qq
apt-get install -y -qq "${pkgs[@]}"

# The locale initdb uses in the postgres image (LANG=en_US.utf8).
localedef -i en_US -c -f UTF-8 -A /usr/share/locale/locale.alias en_US.UTF-8

# ssl-cert generated a snakeoil key pair at build time; nothing uses it and a
# private key baked into a shared image is a bad idea.
rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem

# Debian's packaged cluster layout is unused (PGDATA is the official path).
rm -rf /var/lib/postgresql/15 /etc/postgresql/15

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
	/var/lib/dpkg/*-old /tmp/* /var/tmp/*
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
find /usr/share/man /usr/share/info /usr/share/lintian -mindepth 1 -delete 2>/dev/null || true
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find /var/log -type f -delete
