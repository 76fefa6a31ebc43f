//! Port policy applied by the VSP to every frame: what the guest may send (its own source
//! MAC only; optionally no DHCP server replies and no router advertisements or redirects)
//! and what it receives (the RNDIS packet filter).

use crate::vnet::l3;
use hvdef::rndis::filter;

/// What the switch port lets the guest do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortPolicy {
    /// Drop frames whose source MAC is not the NIC's (on by default, as on Hyper-V).
    pub mac_spoofing_protection: bool,
    /// Drop DHCP (v4 and v6) server messages the guest sends.
    pub dhcp_guard: bool,
    /// Drop router advertisements and redirects (ICMPv6 134 and 137, ICMP 5) the guest
    /// sends.
    pub router_guard: bool,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self {
            mac_spoofing_protection: true,
            dhcp_guard: false,
            router_guard: false,
        }
    }
}

/// Why a guest frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxVerdict {
    Pass,
    SpoofedMac,
    Guard,
    Malformed,
}

const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// The upper-layer protocol and its offset, skipping IPv6 extension headers (hop-by-hop,
/// routing, destination options); `None` for fragments after the first and for anything
/// not IP.
fn l4(frame: &[u8]) -> Option<(u8, usize)> {
    let (at, ethertype) = l3(frame)?;
    match ethertype {
        0x0800 => {
            let ihl = usize::from(*frame.get(at)? & 0xf) * 4;
            let frag = u16::from_be_bytes([*frame.get(at + 6)?, *frame.get(at + 7)?]);
            if frag & 0x1fff != 0 {
                return None;
            }
            Some((*frame.get(at + 9)?, at + ihl))
        }
        0x86DD => {
            let mut next = *frame.get(at + 6)?;
            let mut off = at + 40;
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        next = *frame.get(off)?;
                        off += (usize::from(*frame.get(off + 1)?) + 1) * 8;
                    }
                    _ => return Some((next, off)),
                }
            }
            None
        }
        _ => None,
    }
}

fn udp_src_port(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

/// Checks a frame the guest sends.
pub fn check_tx(frame: &[u8], mac: &[u8; 6], policy: &PortPolicy) -> TxVerdict {
    if frame.len() < 14 {
        return TxVerdict::Malformed;
    }
    if policy.mac_spoofing_protection && frame[6..12] != mac[..] {
        return TxVerdict::SpoofedMac;
    }
    if !(policy.dhcp_guard || policy.router_guard) {
        return TxVerdict::Pass;
    }
    let Some((proto, off)) = l4(frame) else {
        return TxVerdict::Pass;
    };
    let v4 = l3(frame).is_some_and(|(_, t)| t == 0x0800);
    if policy.dhcp_guard && proto == PROTO_UDP {
        // DHCPv4 servers send from port 67, DHCPv6 servers and relays from 547.
        match udp_src_port(frame, off) {
            Some(67) if v4 => return TxVerdict::Guard,
            Some(547) if !v4 => return TxVerdict::Guard,
            _ => {}
        }
    }
    if policy.router_guard {
        let icmp_type = frame.get(off).copied();
        if (proto == PROTO_ICMPV6 && matches!(icmp_type, Some(134 | 137)))
            || (proto == PROTO_ICMP && v4 && icmp_type == Some(5))
        {
            return TxVerdict::Guard;
        }
    }
    TxVerdict::Pass
}

/// Whether the packet filter lets a frame for `dst` reach the guest.
pub fn rx_accepts(dst: &[u8; 6], mac: &[u8; 6], packet_filter: u32) -> bool {
    if packet_filter & filter::PROMISCUOUS != 0 {
        return true;
    }
    if dst == &[0xff; 6] {
        return packet_filter & filter::BROADCAST != 0;
    }
    if dst[0] & 1 != 0 {
        return packet_filter & (filter::MULTICAST | filter::ALL_MULTICAST) != 0;
    }
    dst == mac && packet_filter & filter::DIRECTED != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 1, 2, 3];

    fn eth(src: [u8; 6], ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn udp4(src_port: u16) -> Vec<u8> {
        let mut ip = vec![0u8; 20 + 8];
        ip[0] = 0x45;
        ip[9] = PROTO_UDP;
        ip[20..22].copy_from_slice(&src_port.to_be_bytes());
        eth(MAC, 0x0800, &ip)
    }

    fn icmp6(ty: u8, with_hop_by_hop: bool) -> Vec<u8> {
        let mut ip = vec![0u8; 40];
        if with_hop_by_hop {
            ip[6] = 0;
            ip.extend_from_slice(&[PROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 0]);
        } else {
            ip[6] = PROTO_ICMPV6;
        }
        ip.extend_from_slice(&[ty, 0, 0, 0]);
        eth(MAC, 0x86DD, &ip)
    }

    #[test]
    fn spoofed_source_mac_is_dropped_unless_allowed() {
        let f = eth([2, 0, 0, 0, 0, 1], 0x0800, &[0; 20]);
        assert_eq!(
            check_tx(&f, &MAC, &PortPolicy::default()),
            TxVerdict::SpoofedMac
        );
        let open = PortPolicy {
            mac_spoofing_protection: false,
            ..Default::default()
        };
        assert_eq!(check_tx(&f, &MAC, &open), TxVerdict::Pass);
        assert_eq!(check_tx(&f[..10], &MAC, &open), TxVerdict::Malformed);
    }

    #[test]
    fn guards() {
        let all = PortPolicy {
            mac_spoofing_protection: true,
            dhcp_guard: true,
            router_guard: true,
        };
        assert_eq!(check_tx(&udp4(67), &MAC, &all), TxVerdict::Guard);
        assert_eq!(check_tx(&udp4(68), &MAC, &all), TxVerdict::Pass);
        assert_eq!(
            check_tx(&udp4(67), &MAC, &PortPolicy::default()),
            TxVerdict::Pass
        );
        assert_eq!(check_tx(&icmp6(134, false), &MAC, &all), TxVerdict::Guard);
        assert_eq!(check_tx(&icmp6(137, true), &MAC, &all), TxVerdict::Guard);
        assert_eq!(check_tx(&icmp6(135, true), &MAC, &all), TxVerdict::Pass);
    }

    #[test]
    fn packet_filter() {
        let other = [0x00, 0x15, 0x5d, 9, 9, 9];
        let mcast = [0x01, 0, 0x5e, 0, 0, 1];
        assert!(!rx_accepts(&MAC, &MAC, 0));
        assert!(rx_accepts(&MAC, &MAC, filter::DIRECTED));
        assert!(!rx_accepts(
            &other,
            &MAC,
            filter::DIRECTED | filter::BROADCAST
        ));
        assert!(rx_accepts(&other, &MAC, filter::PROMISCUOUS));
        assert!(rx_accepts(&[0xff; 6], &MAC, filter::BROADCAST));
        assert!(!rx_accepts(&[0xff; 6], &MAC, filter::DIRECTED));
        assert!(rx_accepts(&mcast, &MAC, filter::ALL_MULTICAST));
        assert!(!rx_accepts(&mcast, &MAC, filter::DIRECTED));
    }
}
