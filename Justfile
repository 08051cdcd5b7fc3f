# agentnode tasks. Run them through ./dev (installs `just` into .venv on a fresh machine).
set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

venv := justfile_directory() / ".venv"
py := venv / "bin/python"
apt_packages := "clang libbpf-dev libseccomp-dev bpftool iproute2 nftables bubblewrap firejail iperf3"

# List the recipes
default:
    @{{just_executable()}} --list

# Install what a fresh machine lacks (Debian packages, .venv, Python deps) and build the extension (release); quick when done
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=$(for p in {{apt_packages}}; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$missing" ]; then
        echo "setup: installing Debian packages: $missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
    command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust with rustup: https://rustup.rs)" >&2; exit 1; }
    [ -x {{py}} ] || python3 -m venv {{venv}}
    stamp={{venv}}/.deps-stamp
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        {{py}} -m pip install --quiet --disable-pip-version-check --upgrade pip
        # Runtime and dev dependencies from pyproject.toml, without building the package itself.
        {{py}} -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > {{venv}}/requirements.txt
        {{py}} -m pip install --quiet --disable-pip-version-check -r {{venv}}/requirements.txt
        echo "$want" > "$stamp"
    fi
    {{just_executable()}} build

# Build the extension in release mode into .venv (maturin develop)
build:
    VIRTUAL_ENV={{venv}} {{venv}}/bin/maturin develop --release
    {{py}} -c 'import agentnode._native'

# Start the node agent as root, in the foreground, on its embedded defaults (Ctrl-C stops it)
run *args: setup
    {{venv}}/bin/agentnode run "$@"

# Run every test: cargo tests, then pytest (privileged tests included; run as root)
test *args: setup
    cargo test --quiet -p agentnode-core
    {{py}} -m pytest -n 2 "$@"

# Run every benchmark (--quick: all of them in under 3 minutes); figures in bench/results/
bench *args: setup
    {{py}} bench/run.py "$@"

# Lint: ruff, mypy --strict (package, tests, bench) with stubtest, cargo fmt --check, cargo clippy -D warnings (also as .pre-commit-config.yaml hooks)
lint: setup
    {{venv}}/bin/ruff check python tests bench
    {{venv}}/bin/ruff format --check python tests bench
    {{venv}}/bin/mypy
    {{py}} -m mypy.stubtest agentnode._native --allowlist .mypy-stubtest-allowlist
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Rebuild the BPF objects in ebpf/ (build.rs compiles them with clang -target bpf)
ebpf:
    touch ebpf/*.bpf.c
    cargo build --quiet -p agentnode-core
