//! netvsp over a real TAP device (needs root and /dev/net/tun; reported and skipped
//! otherwise): a frame the guest sends reaches the host kernel on the interface, a frame the
//! host kernel sends out of the interface reaches the guest, and the interface goes away
//! with the NIC.
#![allow(unsafe_code)]

use guestmem::GuestMemory;
use hvdef::netvsp::{self as nv, version};
use hvdef::vmbus::Guid;
use netvsp::client::{Netvsc, Via};
use netvsp::tap::{Tap, TapConfig};
use netvsp::{NetvspDevice, NicConfig, PortPolicy};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vmbus::client::{Client, LINUX_VERSIONS};
use vmbus::testing::{GuestSynic, ThreadedTransport};
use vmbus::{HostConfig, VmbusHost};

const MEM: u64 = 32 << 20;
const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x0a, 0x0b, 0x0c];

fn sys(name: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sends `frame` out of interface `name` through an AF_PACKET socket.
fn send_from_host(name: &str, frame: &[u8]) {
    let index: i32 = sys(name, "ifindex").unwrap().parse().unwrap();
    // SAFETY: a plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: the buffer and address are valid for the call and sized as passed.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![tag; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    // A local experimental ethertype: the host stack ignores it.
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

#[test]
fn frames_cross_a_real_tap_device() {
    let name = format!("nvt{}", std::process::id() % 100_000);
    let tap = match Tap::open(&TapConfig {
        name: Some(name.clone()),
        queues: 2,
        offload: true,
        mtu: 1500,
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: cannot create a TAP device here: {e}");
            return;
        }
    };
    assert_eq!(tap.name(), name);
    let flags = u32::from_str_radix(sys(&name, "flags").unwrap().trim_start_matches("0x"), 16);
    assert_eq!(flags.unwrap() & 1, 1, "interface is up");
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let host = VmbusHost::start(HostConfig::default(), mem.clone(), synic.clone()).unwrap();
    let dev = NetvspDevice::new(
        NicConfig {
            instance_id: Guid::from_u128(0x7a9),
            mac: MAC,
            mtu: 1500,
            max_queues: 2,
            policy: PortPolicy::default(),
        },
        mem.clone(),
        tap,
    )
    .unwrap();
    let id = host.add_device(dev.clone()).unwrap();
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem,
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    let relid = client.find_offer(nv::INTERFACE).unwrap().relid;
    let mut g = Netvsc::open(&mut client, host.clone(), synic.event(relid), relid, 16);
    assert_eq!(g.negotiate(&[version::V61]), Some(version::V61));
    assert_eq!(g.give_buffers(&mut client, 128, 16), (1, 1));
    g.bring_up();
    // Guest to host: the kernel counts it as received on the TAP.
    let rx_before: u64 = sys(&name, "statistics/rx_packets")
        .unwrap()
        .parse()
        .unwrap();
    let out = frame([0xff; 6], MAC, 0x5a);
    assert_eq!(g.send_frame(&out, &[], Via::SendSection(1)), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: u64 = sys(&name, "statistics/rx_packets")
            .unwrap()
            .parse()
            .unwrap();
        if now > rx_before {
            break;
        }
        assert!(Instant::now() < deadline, "frame did not reach the TAP");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dev.stats().tx_packets, 1);
    // Host to guest: a frame sent out of the interface arrives (the kernel may also send
    // its own IPv6 frames; look for ours). With two queues the kernel picks one by flow;
    // only the primary is open, so the other is detached and everything comes here.
    let back = frame(MAC, [0x02, 1, 1, 1, 1, 1], 0xa5);
    send_from_host(&name, &back);
    let mut seen = false;
    g.wait_until(|s| {
        seen |= s.frames().iter().any(|f| f.data == back);
        seen
    });
    assert!(seen, "frame from the host did not reach the guest");
    // Removing the NIC closes the queues and the interface goes away.
    host.remove_device(id).unwrap();
    host.stop();
    drop(g);
    drop(client);
    drop(dev);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sys(&name, "ifindex").is_some() {
        assert!(Instant::now() < deadline, "interface {name} still there");
        std::thread::sleep(Duration::from_millis(10));
    }
}
