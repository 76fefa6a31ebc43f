//! NVSP and RNDIS parsing on arbitrary bytes: the NVSP message parser and negotiation, the
//! RNDIS framing of a send section, data packets with their per-packet info (and the
//! virtio-net header built from them), and every control request against one device state.
//! None may panic; control requests must answer within their own bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netvsp::rndis::{self, NicInfo, RndisState};
use netvsp::{nvsp, policy, vnet};

fuzz_target!(|data: &[u8]| {
    if let Ok(nvsp::Request::Init { min, max }) = nvsp::parse(data) {
        if let Some(v) = nvsp::negotiate(min, max) {
            assert!(v >= min && v <= max);
        }
    }
    let nic = NicInfo {
        mac: [0, 0x15, 0x5d, 1, 2, 3],
        mtu: 1500,
        link_up: true,
        max_queues: 4,
        nvsp_version: data.first().map_or(0, |&b| u32::from(b) << 16),
    };
    let mut state = RndisState::default();
    for m in rndis::split(data) {
        let Ok((t, bytes)) = m else { break };
        if t == hvdef::rndis::msg::PACKET {
            if let Ok(p) = rndis::parse_packet(bytes) {
                let mut frame = bytes[p.data.clone()].to_vec();
                let _ = policy::check_tx(&frame, &nic.mac, &policy::PortPolicy::default());
                if let Some(v) = p.offload.vlan {
                    if let Ok(f) = vnet::insert_vlan(&frame, v) {
                        frame = f;
                    }
                }
                let _ = vnet::tx_header(&mut frame, &p.offload);
            }
        } else if let Ok(o) = rndis::control(&mut state, &nic, t, bytes) {
            if let Some(r) = o.response {
                assert!(r.len() < 4096);
            }
        }
    }
});
