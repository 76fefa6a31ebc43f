//! Tiny hand-assembled guests on the host's /dev/kvm: real-mode and 64-bit entry, port I/O,
//! MMIO and HLT exits, and two vCPUs at once. Skipped, with the reason, where KVM is missing.

use guestmem::GuestMemory;
use kvm::kvm_ioctls::{VcpuExit, VcpuFd};
use kvm::Partition;
use vmm::boot::{self, BootEntry};
use vmm::cpu;

fn partition(mem_size: u64, irqchip: bool) -> Option<Partition> {
    let kvm = match kvm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return None;
        }
    };
    let mem = GuestMemory::new(&[(0, mem_size)]).unwrap();
    Some(if irqchip {
        Partition::new(kvm, mem).unwrap()
    } else {
        Partition::new_bare(kvm, mem).unwrap()
    })
}

/// Points a vCPU at `rip` in real mode with CS = 0.
fn real_mode(vcpu: &VcpuFd, rip: u64) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
}

#[derive(Debug, PartialEq)]
enum Seen {
    Out(u16, Vec<u8>),
    In(u16),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64),
    Hlt,
}

/// Runs until HLT (or `limit` exits), answering IN with `in_value` and MMIO reads with 0xab.
fn run(vcpu: &mut VcpuFd, in_value: u8, limit: usize) -> Vec<Seen> {
    let mut seen = vec![];
    while seen.len() < limit {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => seen.push(Seen::Out(port, data.to_vec())),
            VcpuExit::IoIn(port, data) => {
                data.fill(in_value);
                seen.push(Seen::In(port));
            }
            VcpuExit::MmioWrite(addr, data) => seen.push(Seen::MmioWrite(addr, data.to_vec())),
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0xab);
                seen.push(Seen::MmioRead(addr));
            }
            VcpuExit::Hlt => {
                seen.push(Seen::Hlt);
                break;
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn real_mode_port_io_and_hlt() {
    let Some(p) = partition(1 << 20, false) else {
        return;
    };
    // mov al,'A'; out 0x80,al; in al,0x71; out 0x81,al; hlt
    let code = [0xb0, 0x41, 0xe6, 0x80, 0xe4, 0x71, 0xe6, 0x81, 0xf4];
    p.memory().write(0x1000, &code).unwrap();
    let mut vcpu = p.vm().create_vcpu(0).unwrap();
    real_mode(&vcpu, 0x1000);
    let seen = run(&mut vcpu, 0x5a, 10);
    assert_eq!(
        seen,
        vec![
            Seen::Out(0x80, vec![0x41]),
            Seen::In(0x71),
            Seen::Out(0x81, vec![0x5a]),
            Seen::Hlt
        ]
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn long_mode_entry_with_mmio_and_port_io() {
    let Some(p) = partition(64 << 20, true) else {
        return;
    };
    let mut code = vec![];
    code.extend([0x48, 0xb8]); // mov rax, imm64
    code.extend(0x1122_3344_5566_7788u64.to_le_bytes());
    code.extend([0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    code.push(0xee); // out dx, al
    code.extend([0x48, 0xa3]); // mov [moffs64], rax
    code.extend(0xd000_0000u64.to_le_bytes());
    code.extend([0x48, 0xa1]); // mov rax, [moffs64]
    code.extend(0xd000_1000u64.to_le_bytes());
    code.extend([0xe6, 0x82]); // out 0x82, al
    code.extend([0xeb, 0xfe]); // jmp $ (HLT would wait in the in-kernel LAPIC)
    p.memory().write(0x10_0000, &code).unwrap();
    boot::write_boot_structures(p.memory()).unwrap();
    let mut vcpu = p.vm().create_vcpu(0).unwrap();
    let cpuid = cpu::supported_cpuid(p.kvm()).unwrap();
    cpu::configure_vcpu(&vcpu, &cpu::cpuid_for_vcpu(&cpuid, 0, 1)).unwrap();
    cpu::set_boot_state(
        &vcpu,
        BootEntry {
            rip: 0x10_0000,
            zero_page: 0,
        },
    )
    .unwrap();
    let seen = run(&mut vcpu, 0, 4);
    assert_eq!(
        seen,
        vec![
            Seen::Out(0x3f8, vec![0x88]),
            Seen::MmioWrite(0xd000_0000, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
            Seen::MmioRead(0xd000_1000),
            Seen::Out(0x82, vec![0xab]),
        ]
    );
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cs.l, 1, "not in 64-bit mode");
    assert_ne!(sregs.efer & (1 << 10), 0, "EFER.LMA clear");
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn two_vcpus_run_at_once() {
    let Some(p) = partition(1 << 20, false) else {
        return;
    };
    let p = std::sync::Arc::new(p);
    let handles: Vec<_> = (0..2u8)
        .map(|i| {
            let p = p.clone();
            // mov al, i; out 0x80, al; hlt
            let at = 0x1000 + u64::from(i) * 0x100;
            p.memory().write(at, &[0xb0, i, 0xe6, 0x80, 0xf4]).unwrap();
            let mut vcpu = p.vm().create_vcpu(u64::from(i)).unwrap();
            real_mode(&vcpu, at);
            std::thread::spawn(move || run(&mut vcpu, 0, 4))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            vec![Seen::Out(0x80, vec![i as u8]), Seen::Hlt],
            "vCPU {i}"
        );
    }
}
