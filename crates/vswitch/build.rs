//! Marks the VLAN tests ignored, with the reason, on a kernel whose bridge has no VLAN
//! filtering (cargo lists ignored tests with their reason). The probe reads /proc/kallsyms:
//! with the bridge code present (`br_dev_xmit`) but not its VLAN filtering
//! (`br_vlan_filter_toggle`), the kernel cannot filter. If the bridge is a module not yet
//! loaded, nothing is known and the tests run.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_bridge_vlan)");
    println!("cargo::rerun-if-changed=build.rs");
    let Ok(syms) = std::fs::read_to_string("/proc/kallsyms") else {
        return;
    };
    let has = |name: &str| syms.lines().any(|l| l.rsplit(' ').next() == Some(name));
    if has("br_dev_xmit") && !has("br_vlan_filter_toggle") {
        println!("cargo::rustc-cfg=no_bridge_vlan");
    }
}
