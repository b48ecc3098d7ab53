#!/usr/bin/env bash
# Install the Debian packages fetchpool's integration tests and benchmarks run for real:
# nginx (HTTP/1.1 + TLS/HTTP/2 origin), tinyproxy and squid (forward proxies), microsocks (SOCKS5), wrk (load baseline),
# iptables/iproute2 (fault injection, network namespaces), prometheus (the real Prometheus server and
# promtool: the chart's alert rules are checked and unit-tested with promtool, and its dashboard's
# queries run against a Prometheus that scrapes the service) and python3.11-doc, whose HTML
# (/usr/share/doc/python3.11/html, ~500 pages from a few KB to ~1 MB) is the static "real site"
# the crawl tests and benchmarks fetch through nginx.
#
# Idempotent: when everything is present it only runs dpkg-query and exits 0 (no apt-get update).
# As root it installs directly; otherwise through sudo when available; otherwise it prints the
# command to run and exits 1. Exit status is non-zero on any failure.
set -euo pipefail

readonly PACKAGES=(nginx-light tinyproxy squid microsocks wrk iptables iproute2 prometheus python3.11-doc)
readonly DOC_ROOT=/usr/share/doc/python3.11/html
readonly MIN_DOC_PAGES=300
readonly POLICY_RC=/usr/sbin/policy-rc.d

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
    echo "install-system-deps: missing: ${missing[*]}"
    if [[ $EUID -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -- bash "$0" "$@"
        fi
        echo "install-system-deps: not root and no sudo; as root run:" >&2
        echo "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi

    # Debian's postinst scripts start nginx/squid/tinyproxy/prometheus as system services (binding
    # :80, :3128, :8888, :9090); tests run their own instances, so forbid service starts during the install.
    # An existing policy-rc.d belongs to the machine's admin: keep it as it is.
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        trap 'rm -f "$POLICY_RC"' EXIT
    fi

    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# nginx-light is a reduced build; the tests need its TLS and HTTP/2 modules.
nginx_v="$(/usr/sbin/nginx -V 2>&1)"
for module in http_ssl_module http_v2_module; do
    if ! grep -q -- "--with-${module}" <<<"$nginx_v"; then
        echo "install-system-deps: /usr/sbin/nginx lacks --with-${module}" >&2
        exit 1
    fi
done

pages="$(find "$DOC_ROOT" -name '*.html' | wc -l)"
if ((pages < MIN_DOC_PAGES)); then
    echo "install-system-deps: only ${pages} HTML pages under ${DOC_ROOT} (need ${MIN_DOC_PAGES})" >&2
    exit 1
fi

echo "install-system-deps: ok (nginx $(/usr/sbin/nginx -v 2>&1 | sed 's,.*/,,'), ${pages} doc pages)"
