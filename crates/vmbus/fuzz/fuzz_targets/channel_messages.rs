//! Feeds sequences of guest channel-management messages (and host events) to the server.
#![no_main]

use hvdef::vmbus::{guid, Guid, MAX_MESSAGE_SIZE};
use libfuzzer_sys::fuzz_target;
use vmbus::{Action, OfferParams, Server, ServerConfig};

fuzz_target!(|data: &[u8]| {
    let mut server = Server::new(ServerConfig {
        vp_count: 2,
        max_gpadls: 16,
        max_total_pfns: 4096,
        ..Default::default()
    });
    for (i, g) in [guid::SHUTDOWN_IC, guid::HEARTBEAT_IC, guid::SCSI]
        .iter()
        .enumerate()
    {
        server
            .add_offer(OfferParams::new(*g, Guid::from_u128(i as u128)))
            .unwrap();
    }
    let mut data = data;
    while data.len() >= 2 {
        let (op, len) = (data[0], data[1] as usize);
        data = &data[2..];
        let len = len.min(data.len());
        let (msg, rest) = data.split_at(len);
        data = rest;
        match op % 16 {
            // Host events now and then.
            12 => {
                let _ = server.rescind(1 + (len as u32 % 4));
            }
            13 => {
                let _ = server.add_offer(OfferParams::new(
                    guid::NETWORK,
                    Guid::from_u128(len as u128),
                ));
            }
            14 => {
                let _ = server.signal_event(0x2000 | (len as u32 % 5));
            }
            _ => {
                let conn = if op & 1 == 0 { 1 } else { 4 };
                let r = server.post_message(conn, (op >> 4) as u32 % 3, msg);
                assert_eq!(r.is_err(), msg.len() > MAX_MESSAGE_SIZE);
            }
        }
        while let Some(a) = server.poll_action() {
            match a {
                Action::SendMessage { vp, message, .. } => {
                    assert!(vp < 3);
                    assert!(message.as_bytes().len() <= MAX_MESSAGE_SIZE);
                }
                Action::OpenChannel(req) => {
                    assert!(req.ring_pfns.len() >= 4);
                    assert!(req.target.vp() < 2);
                    let status = if op & 0x20 != 0 { 0 } else { 0xC000_0001 };
                    server.open_complete(req.relid, status).unwrap();
                }
                _ => {}
            }
        }
    }
});
