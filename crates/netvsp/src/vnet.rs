//! The virtio-net header a TAP device with IFF_VNET_HDR puts before every frame, and the
//! mapping between it and RNDIS per-packet information: checksum and LSO requests from the
//! guest become a header the host kernel acts on (with the fix-ups Windows-style LSO needs),
//! and what the kernel says about received frames becomes the guest's checksum info.

use hvdef::rndis::{lso, rx_csum, tx_csum};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct virtio_net_hdr` (little-endian, as TUNSETVNETHDRSZ 10 on x86).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Bytes of [`VirtioNetHdr`].
pub const VNET_HDR_LEN: usize = 10;
const _: () = assert!(size_of::<VirtioNetHdr>() == VNET_HDR_LEN);

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const ETHERTYPE_VLAN: u16 = 0x8100;
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// What the guest asked of one frame through its per-packet information.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffload {
    /// TCPIP_CHECKSUM value.
    pub csum: Option<u32>,
    /// TCP_LARGESEND value (LSO v2).
    pub lso: Option<u32>,
    /// IEEE_8021Q value.
    pub vlan: Option<u32>,
}

/// Why a frame's offload request cannot be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("headers do not fit the frame")]
    Truncated,
    #[error("LSO request with MSS 0 or a non-TCP packet")]
    BadLso,
    #[error("checksum request for an unknown layer")]
    BadChecksum,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Offset of the layer-3 header and the ethertype (skipping one VLAN tag).
pub fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let t = be16(frame, 12)?;
    if t == ETHERTYPE_VLAN {
        Some((ETH_HLEN + 4, be16(frame, 16)?))
    } else {
        Some((ETH_HLEN, t))
    }
}

/// Whether `frame` is a TCP segment over IPv4 or IPv6 (IPv6 extension headers are not
/// followed: such a segment counts as not TCP).
pub fn is_tcp(frame: &[u8]) -> bool {
    const IPPROTO_TCP: u8 = 6;
    match l3(frame) {
        Some((at, ETHERTYPE_IPV4)) => frame.get(at + 9) == Some(&IPPROTO_TCP),
        Some((at, 0x86dd)) => frame.get(at + 6) == Some(&IPPROTO_TCP),
        _ => false,
    }
}

/// One's-complement sum of `data` (big-endian words) added to `sum`.
fn sum16(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u64::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn set16(frame: &mut [u8], at: usize, v: u16) -> Result<(), OffloadError> {
    frame
        .get_mut(at..at + 2)
        .ok_or(OffloadError::Truncated)?
        .copy_from_slice(&v.to_be_bytes());
    Ok(())
}

/// Recomputes an IPv4 header's checksum in place.
fn ipv4_header_checksum(frame: &mut [u8], l3: usize) -> Result<(), OffloadError> {
    let ihl = usize::from(*frame.get(l3).ok_or(OffloadError::Truncated)? & 0xf) * 4;
    if ihl < 20 || l3 + ihl > frame.len() {
        return Err(OffloadError::Truncated);
    }
    set16(frame, l3 + 10, 0)?;
    let c = checksum(&frame[l3..l3 + ihl]);
    set16(frame, l3 + 10, c)
}

/// The frame with the 802.1Q tag from an IEEE_8021Q per-packet info inserted after the
/// MAC addresses.
pub fn insert_vlan(frame: &[u8], v: u32) -> Result<Vec<u8>, OffloadError> {
    if frame.len() < 12 {
        return Err(OffloadError::Truncated);
    }
    // pri:3, cfi:1, vlanid:12 in the low 16 bits (bit fields, LSB first).
    let pri = (v & 7) as u16;
    let cfi = ((v >> 3) & 1) as u16;
    let id = ((v >> 4) & 0xfff) as u16;
    let tci = (pri << 13) | (cfi << 12) | id;
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    out.extend_from_slice(&tci.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    Ok(out)
}

/// Builds the virtio-net header for a guest frame and applies the fix-ups the host kernel
/// needs: for LSO the IP length fields (Windows-style LSO leaves them 0), the IPv4 header
/// checksum and the TCP pseudo-header checksum for the whole segment. With a VLAN request
/// the frame must already carry the tag ([`insert_vlan`]); header offsets move by it.
pub fn tx_header(frame: &mut [u8], off: &TxOffload) -> Result<VirtioNetHdr, OffloadError> {
    let shift = if off.vlan.is_some() { 4u16 } else { 0 };
    let mut hdr = VirtioNetHdr::default();
    if let Some(l) = off.lso {
        let mss = (l & lso::MSS_MASK) as u16;
        let tcp = ((l >> lso::TCP_HEADER_OFFSET_SHIFT) & lso::TCP_HEADER_OFFSET_MASK) as usize
            + usize::from(shift);
        let v6 = l & lso::IPV6 != 0;
        if mss == 0 {
            return Err(OffloadError::BadLso);
        }
        let (l3, ethertype) = l3(frame).ok_or(OffloadError::Truncated)?;
        let doff = usize::from(*frame.get(tcp + 12).ok_or(OffloadError::Truncated)? >> 4) * 4;
        if doff < 20 || tcp + doff > frame.len() || tcp < l3 {
            return Err(OffloadError::Truncated);
        }
        let l4_len = frame.len() - tcp;
        let pseudo = if v6 {
            if ethertype != ETHERTYPE_IPV6 || l3 + 40 > tcp {
                return Err(OffloadError::BadLso);
            }
            let payload = u16::try_from(frame.len() - l3 - 40).unwrap_or(0);
            set16(frame, l3 + 4, payload)?;
            let s = sum16(&frame[l3 + 8..l3 + 40], 0);
            s + 6 + l4_len as u64
        } else {
            if ethertype != ETHERTYPE_IPV4 || l3 + 20 > tcp || frame[l3 + 9] != 6 {
                return Err(OffloadError::BadLso);
            }
            let total = u16::try_from(frame.len() - l3).unwrap_or(u16::MAX);
            set16(frame, l3 + 2, total)?;
            ipv4_header_checksum(frame, l3)?;
            let s = sum16(&frame[l3 + 12..l3 + 20], 0);
            s + 6 + l4_len as u64
        };
        set16(frame, tcp + 16, fold(pseudo))?;
        hdr.flags = F_NEEDS_CSUM;
        hdr.gso_type = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        hdr.gso_size = mss;
        hdr.hdr_len = (tcp + doff) as u16;
        hdr.csum_start = tcp as u16;
        hdr.csum_offset = TCP_CSUM_OFFSET;
        return Ok(hdr);
    }
    if let Some(c) = off.csum {
        let start = ((c >> tx_csum::TCP_HEADER_OFFSET_SHIFT) & tx_csum::TCP_HEADER_OFFSET_MASK)
            as usize
            + usize::from(shift);
        if c & tx_csum::IP_HEADER != 0 && c & tx_csum::IS_IPV4 != 0 {
            let (l3, _) = l3(frame).ok_or(OffloadError::Truncated)?;
            ipv4_header_checksum(frame, l3)?;
        }
        let offset = if c & tx_csum::TCP != 0 {
            TCP_CSUM_OFFSET
        } else if c & tx_csum::UDP != 0 {
            UDP_CSUM_OFFSET
        } else if c & tx_csum::IP_HEADER != 0 {
            return Ok(hdr);
        } else {
            return Err(OffloadError::BadChecksum);
        };
        if start < ETH_HLEN || start + usize::from(offset) + 2 > frame.len() {
            return Err(OffloadError::Truncated);
        }
        hdr.flags = F_NEEDS_CSUM;
        hdr.csum_start = start as u16;
        hdr.csum_offset = offset;
    }
    Ok(hdr)
}

/// Where a received UDP datagram's checksum still has to be filled in: the host kernel left
/// it partial (a local sender, F_NEEDS_CSUM, not GSO) and reports it as verified, but the
/// guest's raw-socket readers (DHCP clients: busybox udhcpc, dhclient) check the bytes
/// themselves and drop a datagram whose checksum is the pseudo-header's partial sum. Returns
/// the checksum's start, the field's offset in the frame, for [`fill_checksum`].
pub fn udp_checksum_to_fill(hdr: &VirtioNetHdr) -> Option<(usize, usize)> {
    let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
    (hdr.flags & F_NEEDS_CSUM != 0
        && hdr.gso_type == GSO_NONE
        && hdr.csum_offset == UDP_CSUM_OFFSET)
        .then_some((start, start + offset))
}

/// Completes a partial checksum: the one's-complement sum from `start` to the end of `frame`
/// (which covers the pseudo-header's sum already in the field at `field`), complemented; a UDP
/// result of 0 is sent as 0xffff. False when the offsets lie outside the frame.
pub fn fill_checksum(frame: &mut [u8], start: usize, field: usize) -> bool {
    if start >= frame.len() || field + 2 > frame.len() || field < start {
        return false;
    }
    let c = match checksum(&frame[start..]) {
        0 => 0xffff,
        c => c,
    };
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// The receive checksum info for the guest, from what the host kernel said of the frame:
/// a checksum still to be filled in (a local sender) or one already verified means the
/// guest need not check it.
pub fn rx_checksum_info(hdr: &VirtioNetHdr) -> Option<u32> {
    if hdr.flags & F_NEEDS_CSUM != 0 {
        Some(match hdr.csum_offset {
            TCP_CSUM_OFFSET => rx_csum::TCP_SUCCEEDED | rx_csum::IP_SUCCEEDED,
            UDP_CSUM_OFFSET => rx_csum::UDP_SUCCEEDED | rx_csum::IP_SUCCEEDED,
            _ => return None,
        })
    } else if hdr.flags & F_DATA_VALID != 0 {
        Some(rx_csum::TCP_SUCCEEDED | rx_csum::UDP_SUCCEEDED | rx_csum::IP_SUCCEEDED)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 + TCP with `payload` bytes, lengths zeroed as Windows-style LSO has
    /// them.
    pub fn tcp4(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 8] = 64;
        f[14 + 9] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 12] = 5 << 4;
        f
    }

    #[test]
    fn tcp_segments_are_told_apart() {
        let tcp = tcp4(10);
        assert!(is_tcp(&tcp));
        let mut udp = tcp.clone();
        udp[23] = 17;
        assert!(!is_tcp(&udp));
        let tagged = insert_vlan(&tcp, 10).unwrap();
        assert!(is_tcp(&tagged));
        let mut v6 = vec![0u8; 14 + 40];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[14 + 6] = 6;
        assert!(is_tcp(&v6));
        v6[14 + 6] = 17;
        assert!(!is_tcp(&v6));
        assert!(!is_tcp(&tcp[..20]));
        assert!(!is_tcp(&[]));
    }

    #[test]
    fn a_partial_udp_checksum_is_filled() {
        // IPv4 UDP 10.0.0.1:67 -> 10.0.0.2:68 with 5 bytes, as a local sender leaves it: the
        // pseudo-header's sum, folded and not complemented, in the checksum field.
        let mut f = vec![0u8; 14 + 20 + 8 + 5];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..38].copy_from_slice(&[0, 67, 0, 68]);
        f[38..40].copy_from_slice(&13u16.to_be_bytes());
        f[42..].copy_from_slice(b"hello");
        let pseudo = |f: &[u8]| sum16(&f[26..34], 0) + 17 + 13;
        let partial = fold(pseudo(&f));
        f[40..42].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        let (start, field) = udp_checksum_to_fill(&hdr).unwrap();
        assert_eq!((start, field), (34, 40));
        assert!(fill_checksum(&mut f, start, field));
        // A receiver's check: the pseudo-header and the datagram sum to all ones.
        assert_eq!(fold(pseudo(&f) + sum16(&f[34..], 0)), 0xffff);
        let mut zeroed = f.clone();
        zeroed[40..42].fill(0);
        let want = !fold(pseudo(&zeroed) + sum16(&zeroed[34..], 0));
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), want);
        // TCP, GSO and already verified frames are left as they are.
        for other in [
            VirtioNetHdr {
                csum_offset: 16,
                ..hdr
            },
            VirtioNetHdr {
                gso_type: GSO_UDP,
                ..hdr
            },
            VirtioNetHdr {
                flags: F_DATA_VALID,
                ..hdr
            },
        ] {
            assert_eq!(udp_checksum_to_fill(&other), None);
        }
        // Offsets outside the frame (a hostile or broken header): nothing is written.
        let before = f.clone();
        assert!(!fill_checksum(&mut f, 100, 106));
        let last = f.len() - 1;
        assert!(!fill_checksum(&mut f, 34, last));
        assert!(!fill_checksum(&mut f, 40, 34));
        assert_eq!(f, before);
    }

    #[test]
    fn lso_v4_fixes_lengths_and_checksums() {
        let mut f = tcp4(3000);
        let l = 1448 | (34 << lso::TCP_HEADER_OFFSET_SHIFT) | lso::TYPE_V2;
        let h = tx_header(
            &mut f,
            &TxOffload {
                lso: Some(l),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (h.flags, h.gso_type, { h.gso_size }, { h.hdr_len }),
            (F_NEEDS_CSUM, GSO_TCPV4, 1448, 54)
        );
        assert_eq!(({ h.csum_start }, { h.csum_offset }), (34, 16));
        assert_eq!(be16(&f, 16).unwrap() as usize, f.len() - 14);
        assert_eq!(checksum(&f[14..34]), 0, "IPv4 header checksum valid");
        // Pseudo header: addresses, protocol, TCP length.
        let mut p = Vec::new();
        p.extend_from_slice(&f[26..34]);
        p.extend_from_slice(&[0, 6]);
        p.extend_from_slice(&((f.len() - 34) as u16).to_be_bytes());
        assert_eq!(be16(&f, 34 + 16).unwrap(), !checksum(&p));
    }

    #[test]
    fn bad_offload_requests_are_refused() {
        let mut f = tcp4(10);
        let zero_mss = 34 << lso::TCP_HEADER_OFFSET_SHIFT;
        let r = tx_header(
            &mut f,
            &TxOffload {
                lso: Some(zero_mss),
                ..Default::default()
            },
        );
        assert_eq!(r, Err(OffloadError::BadLso));
        let past = 100 | (2000 << lso::TCP_HEADER_OFFSET_SHIFT);
        let r = tx_header(
            &mut f,
            &TxOffload {
                lso: Some(past & !(0x3ff << 20) | (1000 << 20)),
                ..Default::default()
            },
        );
        assert_eq!(r, Err(OffloadError::Truncated));
        let r = tx_header(
            &mut tcp4(0)[..20],
            &TxOffload {
                csum: Some(tx_csum::IS_IPV4 | tx_csum::TCP | (34 << 16)),
                ..Default::default()
            },
        );
        assert_eq!(r, Err(OffloadError::Truncated));
    }

    #[test]
    fn checksum_request_and_vlan_tag() {
        let f = tcp4(100);
        let len = f.len();
        let off = TxOffload {
            csum: Some(tx_csum::IS_IPV4 | tx_csum::TCP | (34 << 16)),
            vlan: Some(5 << 4 | 3),
            lso: None,
        };
        let mut f = insert_vlan(&f, off.vlan.unwrap()).unwrap();
        let h = tx_header(&mut f, &off).unwrap();
        assert_eq!(f.len(), len + 4);
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x60, 0x05]);
        assert_eq!(
            (h.flags, { h.csum_start }, { h.csum_offset }, h.gso_type),
            (F_NEEDS_CSUM, 38, 16, GSO_NONE)
        );
    }

    #[test]
    fn receive_checksum_info() {
        let mut h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_offset: 6,
            ..Default::default()
        };
        assert_eq!(
            rx_checksum_info(&h),
            Some(rx_csum::UDP_SUCCEEDED | rx_csum::IP_SUCCEEDED)
        );
        h.flags = 0;
        assert_eq!(rx_checksum_info(&h), None);
    }
}
