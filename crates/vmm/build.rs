//! Marks the host-KVM tests ignored, with the reason, when this machine's /dev/kvm cannot be
//! opened (cargo prints ignored tests and their reason; a silent early return would not).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("cargo::rustc-cfg=no_kvm");
    }
}
