#!/usr/bin/env bash
# Install the launcher (.desktop file) and icon for the current user (XDG locations).
set -euo pipefail
repo="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
exec_path="$repo/.venv/bin/ryzanstein-desktop"
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
[ -x "$exec_path" ] || { echo "missing $exec_path: run 'make run' or 'make test' once first" >&2; exit 1; }
install -d "$data_home/applications" "$data_home/icons/hicolor/scalable/apps"
sed "s|@EXEC@|$exec_path|" "$repo/packaging/ryzanstein.desktop" > "$data_home/applications/ryzanstein.desktop"
install -m 0644 "$repo/packaging/ryzanstein.svg" "$data_home/icons/hicolor/scalable/apps/ryzanstein.svg"
command -v update-desktop-database >/dev/null && update-desktop-database "$data_home/applications" || true
echo "installed $data_home/applications/ryzanstein.desktop"
