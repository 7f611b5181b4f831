#!/usr/bin/env bash
# Installs what vizor's console page loads, for scripts/demo.sh and scripts/test.sh:
# spice-html5 (Debian's package, /usr/share/spice-html5) and noVNC 1.7 (npm
# @novnc/novnc, into web/node_modules, as web/package-lock.json pins it).
#
#   scripts/web-deps.sh             the clients only
#   scripts/web-deps.sh --browser   also Debian's Chromium and playwright-core, for the
#                                   browser tests (tests/browser.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
browser=0
case "${1:-}" in
    --browser) browser=1 ;;
    "") ;;
    *) echo "usage: scripts/web-deps.sh [--browser]" >&2; exit 2 ;;
esac

packages=(spice-html5)
[ "$browser" = 1 ] && packages+=(chromium)
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "web-deps: installing ${missing[*]}" >&2
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    }
    apt_install || { apt-get update >&2 && apt_install; }
fi

# playwright-core asks for Node.js 20 or later; Debian 12's own is 18.
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$browser" = 1 ] && [ "$major" -lt 20 ]; then
    echo "web-deps: the browser tests need Node.js 20 or later (found $(node --version))" >&2
    exit 1
fi

if [ "$browser" = 1 ]; then
    npm ci --prefix web --no-audit --no-fund --loglevel=error >&2
else
    npm ci --prefix web --omit=dev --no-audit --no-fund --loglevel=error >&2
fi
echo "web-deps: noVNC $(node -p 'require("./web/node_modules/@novnc/novnc/package.json").version') in web/node_modules" >&2
