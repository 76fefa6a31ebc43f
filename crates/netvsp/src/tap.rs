//! A Linux TAP device as a NIC backend: `/dev/net/tun` opened once per queue with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and IFF_MULTI_QUEUE for several), a 10-byte
//! virtio-net header (TUNSETVNETHDRSZ), checksum and TSO offloads (TUNSETOFFLOAD), the
//! interface set up with SIOCSIFFLAGS. The interface goes away when the last queue closes
//! (the NIC is dropped); another component attaches it to a bridge by name.
#![allow(unsafe_code)]

use crate::backend::{Backend, BackendQueue};
use crate::vnet::{VirtioNetHdr, VNET_HDR_LEN};
use guestmem::GuestMemory;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use zerocopy::IntoBytes;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// Largest frame a TAP with TSO hands over (a 64 KiB IP packet and its Ethernet header).
const MAX_GSO_FRAME: usize = 65535 + 14 + 4;

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> std::io::Result<Self> {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        let b = name.as_bytes();
        if b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: *mut T) -> std::io::Result<()> {
    // SAFETY: every caller passes a request whose argument is the pointed-to type (an ifreq,
    // or an int by value cast to a pointer for TUNSETOFFLOAD), valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How to create the TAP device.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// Interface name; `None` lets the kernel pick (tap0, tap1, ...).
    pub name: Option<String>,
    pub queues: u16,
    /// Checksum and TSO offloads (frames up to 64 KiB both ways).
    pub offload: bool,
    /// Largest frame without offloads (MTU + Ethernet header + VLAN tag).
    pub mtu: u32,
}

/// An open TAP device with its queues.
pub struct Tap {
    name: String,
    queues: Vec<TapQueue>,
}

/// One queue's descriptor.
pub struct TapQueue {
    fd: OwnedFd,
    max_frame: usize,
    scratch: Vec<u8>,
}

fn open_queue(name: &str, multi: bool, offload: bool) -> std::io::Result<(OwnedFd, String)> {
    let path = c"/dev/net/tun";
    // SAFETY: a plain open of a NUL-terminated path; the descriptor is owned at once.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name)?;
    req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | if multi { IFF_MULTI_QUEUE } else { 0 };
    ioctl(fd.as_fd(), TUNSETIFF, &mut req)?;
    let mut size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    ioctl(fd.as_fd(), TUNSETVNETHDRSZ, &mut size)?;
    let flags = if offload {
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    } else {
        0
    };
    // TUNSETOFFLOAD takes the flags by value.
    ioctl(
        fd.as_fd(),
        TUNSETOFFLOAD,
        flags as usize as *mut libc::c_void,
    )?;
    Ok((fd, req.name()))
}

/// Sets the interface up (IFF_UP) through an AF_INET socket.
fn set_up(name: &str) -> std::io::Result<()> {
    // SAFETY: a plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::new(name)?;
    ioctl(sock.as_fd(), libc::SIOCGIFFLAGS, &mut req)?;
    req.flags |= libc::IFF_UP as libc::c_short;
    ioctl(sock.as_fd(), libc::SIOCSIFFLAGS, &mut req)
}

impl Tap {
    /// Creates (or attaches to) the TAP device and sets it up.
    pub fn open(config: &TapConfig) -> std::io::Result<Self> {
        let queues = config.queues.max(1);
        let multi = queues > 1;
        let mut name = config.name.clone().unwrap_or_default();
        let max_frame = if config.offload {
            MAX_GSO_FRAME
        } else {
            config.mtu as usize + 18
        };
        let mut qs = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let (fd, n) = open_queue(&name, multi, config.offload)?;
            name = n;
            qs.push(TapQueue {
                fd,
                max_frame,
                scratch: vec![0; VNET_HDR_LEN + max_frame],
            });
        }
        set_up(&name)?;
        Ok(Self { name, queues: qs })
    }

    /// The interface name (for the bridge).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Backend for Tap {
    fn into_queues(self) -> Vec<Box<dyn BackendQueue>> {
        self.queues
            .into_iter()
            .map(|q| Box::new(q) as Box<dyn BackendQueue>)
            .collect()
    }
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

impl BackendQueue for TapQueue {
    fn rx_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn recv(
        &mut self,
        mem: &GuestMemory,
        hdr: &mut [u8; VNET_HDR_LEN],
        pieces: &[(u64, usize)],
    ) -> std::io::Result<Option<usize>> {
        match mem.read_fd_vectored(self.fd.as_fd(), hdr, pieces) {
            Ok(n) if n < VNET_HDR_LEN => Err(std::io::Error::other("short read from TAP")),
            Ok(n) => Ok(Some(n - VNET_HDR_LEN)),
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn discard(&mut self) -> std::io::Result<bool> {
        match rustix::io::read(&self.fd, &mut self.scratch) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::AGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn send(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> std::io::Result<()> {
        let iov = [
            std::io::IoSlice::new(hdr.as_bytes()),
            std::io::IoSlice::new(frame),
        ];
        rustix::io::writev(&self.fd, &iov)?;
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        let mut req = IfReq::new("")?;
        req.flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        match ioctl(self.fd.as_fd(), TUNSETQUEUE, &mut req) {
            // A single-queue TAP has no queues to attach or detach.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }
}
