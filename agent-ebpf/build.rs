//! Rebuild when `bpf-linker` changes: building this crate depends on that binary, which cargo cannot
//! express as a dependency.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
