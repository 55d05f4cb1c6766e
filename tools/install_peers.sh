#!/usr/bin/env bash
# Install the Debian packages the Postfix peer (tools/peers/postfix_peer.py)
# needs: postfix, dovecot-core, swaks and ca-certificates; redis-server for
# the shaping tests' Redis peer (tools/peers/redis_peer.py); and OpenDKIM
# (opendkim, opendkim-tools), the second verifier of tests/test_dkim_opendkim.py.
#
# Idempotent: does nothing when everything is installed.  Needs root and
# apt-get; without them it says why and exits 0, so the tests that need
# Postfix or Redis skip with a reason (the peers' available()).
# With --strict (or PEERS_STRICT=1) a failed installation exits 1 instead.
#
# Postfix is preseeded as "No configuration", and no service is started: the
# peers run private instances (postfix -c DIR, dovecot -c FILE, redis-server
# --port N) on loopback high ports, and OpenDKIM runs only in test mode
# (opendkim -t).  If a system postfix, dovecot, redis-server or opendkim is
# running afterwards anyway, it is stopped.
set -u -o pipefail

# swaks needs the Perl TLS and SASL modules for STARTTLS, implicit TLS and AUTH.
PACKAGES=(postfix dovecot-core swaks ca-certificates libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl
    redis-server opendkim opendkim-tools)
strict="${PEERS_STRICT:-0}"
for arg in "$@"; do
    case "$arg" in
        --strict) strict=1 ;;
        -h | --help)
            sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install_peers: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

say() { echo "install_peers: $*"; }

give_up() {
    say "$*"
    say "tests that need Postfix/Dovecot/Redis will be skipped"
    if [ "$strict" = 1 ]; then
        exit 1
    fi
    exit 0
}

installed() {
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    give_up "apt-get/dpkg not found: not a Debian-like system, cannot install ${PACKAGES[*]}"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

stop_system_daemons() {
    # The packages' own instances (default configuration) must not run.
    local pidfile pid
    pidfile=/var/spool/postfix/pid/master.pid
    if [ -r "$pidfile" ] && pid=$(sed -n '1s/[^0-9]//gp' "$pidfile") && [ -n "$pid" ] &&
        kill -0 "$pid" 2>/dev/null; then
        say "stopping the system Postfix (pid $pid)"
        postfix stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    fi
    for pidfile in /run/dovecot/master.pid /var/run/dovecot/master.pid; do
        if [ -r "$pidfile" ] && pid=$(sed -n '1s/[^0-9]//gp' "$pidfile") && [ -n "$pid" ] &&
            kill -0 "$pid" 2>/dev/null; then
            say "stopping the system Dovecot (pid $pid)"
            doveadm stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
            break
        fi
    done
    pidfile=/run/redis/redis-server.pid
    if [ -r "$pidfile" ] && pid=$(sed -n '1s/[^0-9]//gp' "$pidfile") && [ -n "$pid" ] &&
        kill -0 "$pid" 2>/dev/null; then
        say "stopping the system Redis (pid $pid)"
        kill "$pid" 2>/dev/null || true
    fi
    pidfile=/run/opendkim/opendkim.pid
    if [ -r "$pidfile" ] && pid=$(sed -n '1s/[^0-9]//gp' "$pidfile") && [ -n "$pid" ] &&
        kill -0 "$pid" 2>/dev/null; then
        say "stopping the system OpenDKIM (pid $pid)"
        kill "$pid" 2>/dev/null || true
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now postfix.service dovecot.service redis-server.service \
            opendkim.service >/dev/null 2>&1 || true
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    say "already installed: ${PACKAGES[*]}"
    stop_system_daemons
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    give_up "not root: cannot install ${missing[*]} (run this script as root)"
fi

say "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

if command -v debconf-set-selections >/dev/null 2>&1; then
    say "preseeding postfix/main_mailer_type = No configuration"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string localhost" | debconf-set-selections
fi

# Keep maintainer scripts from starting services (unless a policy exists).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    say "temporarily forbidding service starts ($policy)"
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ "$own_policy" = 1 ]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

apt_install() {
    apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
}

if ! apt_install; then
    say "install failed; running apt-get update and retrying"
    if ! apt-get update -q -o DPkg::Lock::Timeout=300; then
        give_up "apt-get update failed: cannot install ${missing[*]}"
    fi
    if ! apt_install; then
        give_up "apt-get install ${missing[*]} failed"
    fi
fi

stop_system_daemons

for pkg in "${PACKAGES[@]}"; do
    if ! installed "$pkg"; then
        give_up "$pkg is still not installed"
    fi
done
say "installed: ${PACKAGES[*]}"
exit 0
