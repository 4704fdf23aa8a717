#!/usr/bin/env bash
# Builds tenement's packages from this checkout:
#   target/debian/tenement_VERSION-1_ARCH.deb     (cargo-deb, metadata in supervisor/Cargo.toml)
#   target/rpm/RPMS/ARCH/tenement-VERSION-1.ARCH.rpm  (rpmbuild, packaging/rpm/tenement.spec)
#
# Usage: packaging/build.sh [deb] [rpm]     (default: both)
# Needs: cargo, python3, protoc (Debian: apt-get install protobuf-compiler; the fleet agent
# compiles etcd's API definitions), cargo-deb (cargo install --locked cargo-deb) for the .deb, rpmbuild
# (Debian: apt-get install rpm) for the .rpm. Reuses target/release when it is up to date.
# Generated files (tenement.toml.5 from docs/CONFIG.md, completions) go to target/release/packaging.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
want=${*:-deb rpm}
version=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin_dir=$target_dir/release
generated=$bin_dir/packaging

step() { printf '== %s\n' "$*" >&2; }

step "release build"
cargo build --release --locked -p tenement-supervisor -p tenement-proxy -p tenctl -p tenement-fleet

step "man page and completions -> $generated"
mkdir -p "$generated"
python3 packaging/man/md2man.py docs/CONFIG.md "$version" >"$generated/tenement.toml.5"
# cargo-deb compresses man pages, but not files under target/release (it takes them for
# build products): gzip this one here, as Debian wants (gzip -9n).
gzip -9nc "$generated/tenement.toml.5" >"$generated/tenement.toml.5.gz"
"$bin_dir/tenctl" completions bash >"$generated/tenctl.bash"
"$bin_dir/tenctl" completions zsh >"$generated/_tenctl"
"$bin_dir/tenctl" completions fish >"$generated/tenctl.fish"
"$bin_dir/tenctl" validate packaging/tenement.toml >&2

if [[ " $want " == *" deb "* ]]; then
    step "deb"
    cargo deb --locked -p tenement-supervisor --no-build
fi

if [[ " $want " == *" rpm "* ]]; then
    step "rpm"
    top=$target_dir/rpm
    rm -rf "$top"
    mkdir -p "$top"/{BUILD,RPMS,SOURCES,SPECS,SRPMS,BUILDROOT}
    rpmbuild -bb --quiet \
        --define "_topdir $top" \
        --define "tenement_version $version" \
        --define "tenement_src $repo" \
        --define "tenement_bin $bin_dir" \
        --define "tenement_gen $generated" \
        packaging/rpm/tenement.spec
    find "$top/RPMS" -name '*.rpm' -print
fi
