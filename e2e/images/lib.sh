# Shared by e2e/images/*/build (sourced). Every image lives in its own cache directory
#   $RAY_OPERATOR_CACHE/images/<name>-<pinned versions>-<hash of inputs>/oci   (an OCI layout)
# that is complete once `.complete` exists beside it; a half-built one is <dir>.partial.
# shellcheck shell=bash
images_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$images_here/../.." && pwd)
# shellcheck source=versions.env
source "$images_here/versions.env"
RAY_VERSION=$(sed -n 's/^RAY_VERSION=//p' "$repo_root/e2e/ray-venv")
[[ -n $RAY_VERSION ]] || { echo "images: no RAY_VERSION= line in e2e/ray-venv" >&2; exit 1; }
images_cache=${RAY_OPERATOR_CACHE:-$HOME/.cache/ray-operator}/images

# hash_of FILE... : 12 hex digits over the files' contents (and lib.sh/versions.env, which every
# image depends on), so editing one image's inputs rebuilds that image only.
hash_of() {
  cat "$images_here/lib.sh" "$images_here/versions.env" "$@" | sha256sum | cut -c1-12
}

log() { echo "images: $*" >&2; }

# lock_image DIR : one build of an image at a time (the node harness and a developer may both run
# e2e/images/build); held until the script exits. Returns 1 if another build completed DIR while
# we waited, so the caller can print its line and stop.
lock_image() {
  mkdir -p "$images_cache"
  exec 9>"$1.lock"
  flock 9
  [[ ! -f $1/.complete ]]
}

# oci_from_tar LAYOUT TAG LAYER.tar [umoci config flags...] : a one-layer image tagged TAG in a new
# OCI layout. The tar must be uncompressed; umoci gzips it into a blob.
oci_from_tar() {
  local layout=$1 tag=$2 layer=$3
  shift 3
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci raw add-layer --image "$layout:$tag" --history.created_by "e2e/images/build" "$layer"
  umoci config --image "$layout:$tag" --os linux --architecture amd64 \
    --author "ray-operator e2e/images/build" --history.created_by "e2e/images/build" "$@"
}

# tar_dir DIR OUT.tar : the directory's content as a layer tar; owners kept as numbers (the
# rootfs' uids, not the host's names), entries sorted by name so the order does not depend on the
# file system.
tar_dir() {
  tar --numeric-owner --sort=name --xattrs --xattrs-include='security.capability' \
    -C "$1" -cf "$2" .
}

# finish DIR START LINE : marks DIR complete, prints the build time and the interface line.
finish() {
  local dir=$1 start=$2 line=$3
  rm -rf "$dir" && mv "$dir.partial" "$dir" && touch "$dir/.complete"
  log "$(basename "$dir"): built in $(( $(date +%s) - start )) s, $(du -sh "$dir/oci" | cut -f1) in the layout"
  echo "$line"
}
