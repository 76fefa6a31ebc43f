//! Links `viridian` as a position-dependent executable. A PIE needs thousands of relative
//! relocations at start-up, and each page they touch is a page fault; on a nested host those
//! cost more than the rest of start-up together (measured: 16 ms of 25 ms).
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
