#!/usr/bin/env bash
# The browser tests drive a real headless Chromium with Playwright. Playwright's own browser
# download needs its CDN, so we use the system's Chromium (Debian's `chromium` package):
# installed here when missing and we may (root with apt-get); otherwise explain.
set -euo pipefail
chromium="${SWITCHYARD_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
    echo "ensure-browser: using $chromium"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: installing Debian's chromium package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
    echo "ensure-browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
    exit 0
fi
echo "ensure-browser: no Chromium at $chromium and cannot install it here." >&2
echo "  Install your distribution's chromium package (Debian/Ubuntu: sudo apt-get install chromium)" >&2
echo "  or set SWITCHYARD_CHROMIUM to a Chromium binary; the browser tests fail without it." >&2
exit 0
