//! Hostile ring contents: arbitrary control fields and data area, read by the host end.
#![no_main]

use guestmem::GuestMemory;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use vmbus::{Channel, Side};

// Ring GPADL: pages 0..3 guest->host (control + 2 data), 3..6 host->guest.
const PFNS: [u64; 6] = [1, 2, 3, 4, 5, 6];

fn mem() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| GuestMemory::new(&[(0, 8 * 4096)]).unwrap())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    let mem = mem();
    mem.zero(0, 8 * 4096).unwrap();
    let word = |i: usize| u32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    // Control fields of both rings.
    for (i, off) in [0u64, 4, 8, 12].iter().enumerate() {
        mem.store_u32(4096 + off, word(i), Ordering::SeqCst)
            .unwrap();
        mem.store_u32(4 * 4096 + off, word(4 + i), Ordering::SeqCst)
            .unwrap();
    }
    // Data area of the guest->host ring.
    let body = &data[32..];
    let n = body.len().min(2 * 4096);
    mem.write(2 * 4096, &body[..n]).unwrap();
    let Ok(mut ch) = Channel::new(mem, &PFNS, 3, Side::Host, None) else {
        return;
    };
    let mut buf = Vec::new();
    for _ in 0..64 {
        match ch.try_recv(&mut buf) {
            Ok(Some(p)) => {
                assert!(p.bytes().len() <= 2 * 4096);
                let _ = p.gpa_direct_ranges();
                let _ = p.xfer_page_ranges();
                let _ = p.payload();
            }
            Ok(None) => break,
            Err(_) => {
                assert!(ch.is_broken());
                break;
            }
        }
    }
    for i in 0..8u64 {
        if ch
            .send_inband(i, &body[..body.len().min(300)], true)
            .is_err()
        {
            break;
        }
    }
});
