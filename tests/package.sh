#!/usr/bin/env bash
# The Debian package, built with cargo-deb and checked: its files, its
# maintainer scripts and lintian (no errors). Run by tests/run-all.sh after
# the tests; installs cargo-deb (pinned) and lintian when missing.
#
# CONCH_PACKAGE_PROFILE picks the cargo profile of the packaged binary:
# release by default, as shipped. The suite packages the dev build the tests
# already made (stripped, like the release one): what is checked here is the
# package's files, scripts and lintian's verdict, none of which depends on
# optimisation, and a release build would add six minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
if ! command -v lintian >/dev/null 2>&1; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo deb --locked --quiet --profile "${CONCH_PACKAGE_PROFILE:-release}" \
  --output "$out/conch.deb" >/dev/null
deb="$out/conch.deb"

fail() { echo "package: $*" >&2; exit 1; }

contents=$(dpkg-deb -c "$deb" | awk '{print $NF}')
for want in ./usr/bin/conch \
            ./usr/lib/systemd/system/conch-agent.service \
            ./usr/lib/systemd/system/conch-server.service \
            ./etc/conch/agent.env ./etc/conch/server.env \
            ./usr/share/doc/conch/README.md \
            ./usr/share/doc/conch/examples/nginx/conch-location.conf; do
  grep -qx -- "$want" <<<"$contents" || fail "missing $want; it has:
$contents"
done

dpkg-deb -e "$deb" "$out/control"
grep -q '^Package: conch$' "$out/control/control" || fail "control: $(cat "$out/control/control")"
grep -q 'adduser' "$out/control/control" || fail "no dependency on adduser"
grep -qx '/etc/conch/agent.env' "$out/control/conffiles" || fail "agent.env is not a conffile"
grep -q 'adduser --system' "$out/control/postinst" || fail "postinst makes no conch user"
grep -q 'conch keygen' "$out/control/postinst" || fail "postinst makes no agent key"
# The units are installed, neither enabled nor started (the key first).
if grep -q 'deb-systemd-invoke start' "$out/control/postinst"; then
  fail "postinst starts a service at install"
fi
sh -n "$out/control/postinst" && sh -n "$out/control/postrm"

# The packaged binary is the one built, and runs.
dpkg-deb -x "$deb" "$out/root"
"$out/root/usr/bin/conch" --version >/dev/null

# lintian: errors fail the build; warnings are shown.
lintian --fail-on error --suppress-tags-from-file /dev/null "$deb" || fail "lintian found errors"
echo "package: $(basename "$deb") OK ($(du -h "$deb" | cut -f1))"
