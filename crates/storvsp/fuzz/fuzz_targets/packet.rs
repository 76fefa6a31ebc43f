//! The storvsp packet parser and everything that follows it without a channel: a guest
//! payload parsed into a request, the handshake state machine driven by it, the SRB's
//! completion packet, and the GPA_DIRECT range list checked against a small guest RAM.
//! Panics, completions that are not 64-byte COMPLETE_IO packets, and data pieces outside
//! RAM or not adding up to the SRB's length are bugs.
#![no_main]

use hvdef::storvsp::{operation, PACKET_LEN};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use storvsp::protocol::{self, Handshake, Properties, Request, SrbResult};
use zerocopy::IntoBytes;

const RAM: u64 = 1 << 20;

fn mem() -> &'static guestmem::GuestMemory {
    static MEM: OnceLock<guestmem::GuestMemory> = OnceLock::new();
    // Two regions with a hole between them.
    MEM.get_or_init(|| guestmem::GuestMemory::new(&[(0, RAM / 2), (RAM, RAM / 2)]).unwrap())
}

fn check_completion(p: &hvdef::storvsp::VstorPacket) {
    assert_eq!(p.as_bytes().len(), PACKET_LEN);
    assert_eq!({ p.operation }, operation::COMPLETE_IO);
}

fuzz_target!(|data: &[u8]| {
    // [props: 3 bytes][range count: 1][ranges ... | packets of 64 bytes ...]
    if data.len() < 4 {
        return;
    }
    let props = Properties {
        max_transfer_bytes: storvsp::MAX_TRANSFER_BYTES,
        max_subchannels: u16::from(data[0] & 0x7f),
    };
    let primary = data[1] & 1 == 1;
    let ranges_len = usize::from(data[2]) * 8;
    let range_count = u32::from(data[3]);
    let rest = &data[4..];
    let (range_bytes, packets) = rest.split_at(ranges_len.min(rest.len()));
    let ranges = vmbus::PagedRange::parse_list(range_bytes, range_count);
    let mut h = Handshake::default();
    for payload in packets.chunks(PACKET_LEN) {
        let req = match protocol::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                assert!(payload.len() < PACKET_LEN || e.status() != 0);
                check_completion(&protocol::complete(e.status()));
                continue;
            }
        };
        match req {
            Request::ExecuteSrb(srb) => {
                if let Some(cdb) = srb.cdb() {
                    assert!(!cdb.is_empty() && cdb.len() <= 16);
                }
                if let Ok((r, _)) = &ranges {
                    if let Ok(pieces) = storvsp::data_pieces(mem(), r, srb.data_transfer_length) {
                        let total: usize = pieces.iter().map(|p| p.1).sum();
                        assert_eq!(total as u64, u64::from(srb.data_transfer_length));
                        for (gpa, n) in pieces {
                            assert!(mem().contains(gpa, n as u64));
                            assert!(n <= 4096);
                        }
                    }
                }
                for r in [SrbResult::invalid_request(), SrbResult::invalid_lun()] {
                    let p = r.packet(&srb);
                    check_completion(&p);
                    assert_eq!({ p.srb().lun }, srb.lun);
                }
            }
            other => {
                let before = h;
                let r = h.control(&other, &props, primary);
                check_completion(&r.packet);
                assert!(h.subchannels <= props.max_subchannels);
                assert!(h.subchannels >= before.subchannels);
                assert_eq!(h.subchannels - before.subchannels, r.add_subchannels);
                if h.ready() {
                    assert!(h.version.is_some());
                }
                if let Some(v) = h.version {
                    assert!(protocol::VERSIONS.contains(&v));
                }
            }
        }
    }
});
