//! Compiles every `ebpf/*.bpf.c` with clang (`-target bpf`) into `OUT_DIR`, where
//! `agentnode_core::bpf` embeds the objects.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ebpf = manifest.join("../../ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // asm/types.h lives in the multiarch include dir, which clang does not search for -target bpf.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets it");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let bpf_arch = match arch.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };

    println!("cargo:rerun-if-changed={}", ebpf.join("include").display());
    println!("cargo:rerun-if-env-changed=CLANG");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&ebpf)
        .expect("ebpf/ exists")
        .map(|e| e.expect("readable ebpf/").path())
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile(
            &clang,
            src,
            &out,
            &ebpf.join("include"),
            &multiarch,
            bpf_arch,
        );
    }
}

fn compile(clang: &str, src: &Path, out: &Path, include: &Path, multiarch: &str, arch: &str) {
    let name = src
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".bpf.c", ".bpf.o");
    let status = Command::new(clang)
        .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg("-I")
        .arg(include)
        .arg("-idirafter")
        .arg(multiarch)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out.join(&name))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to build {}: {e} (install clang and libbpf-dev: just setup)",
                src.display()
            )
        });
    assert!(status.success(), "clang failed on {}", src.display());
}
