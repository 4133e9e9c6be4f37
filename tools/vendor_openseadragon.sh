#!/usr/bin/env bash
# Vendor a pinned OpenSeadragon from its npm package into slidestream/viewer/static/openseadragon/.
# Usage: tools/vendor_openseadragon.sh 6.1.1
set -euo pipefail
version="${1:?usage: $0 VERSION}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/slidestream/viewer/static/openseadragon"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "openseadragon@$version" >/dev/null && tar xzf "openseadragon-$version.tgz")
sum="$(sha256sum "$work/openseadragon-$version.tgz" | cut -d' ' -f1)"
rm -rf "$dest/images" "$dest"/openseadragon.min.js*
mkdir -p "$dest"
cp "$work/package/build/openseadragon/openseadragon.min.js" "$work/package/build/openseadragon/openseadragon.min.js.map" "$dest/"
cp -r "$work/package/build/openseadragon/images" "$dest/"
cp "$work/package/LICENSE.txt" "$dest/LICENSE.txt"
sed -i -E "s/OpenSeadragon [0-9.]+ \(vendored\)/OpenSeadragon $version (vendored)/; s/openseadragon@[0-9.]+/openseadragon@$version/g; s/\`[0-9a-f]{64}\`/\`$sum\`/" "$dest/VENDORED.md"
echo "vendored openseadragon $version (sha256 $sum) into $dest"
