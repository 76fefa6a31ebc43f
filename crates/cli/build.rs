//! Links `viridian` as a position-dependent executable. A PIE needs thousands of relative
//! relocations at start-up, and each page they touch is a page fault; on a nested host those
//! cost more than the rest of start-up together (measured: 16 ms of 25 ms).
//!
//! It also marks the host-KVM tests ignored, with the reason, when this machine's /dev/kvm
//! cannot be opened (cargo lists ignored tests with their reason; a silent return would not).
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("cargo::rustc-cfg=no_kvm");
    }
}
