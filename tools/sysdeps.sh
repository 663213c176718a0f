#!/usr/bin/env bash
# Install the Debian packages behind the optional parts of the test suite, when we can.
set -u
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver fonts-dejavu-core)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "sysdeps: not root or no apt-get; tests that need ${need[*]} will be skipped"
    exit 0
fi
echo "sysdeps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null || echo "sysdeps: apt-get failed; dependent tests will skip"
exit 0
