//! The sans-I/O RNDIS half: splitting what the guest sent into RNDIS messages, the control
//! requests (initialize, query, set, reset, keepalive, halt) with every OID Linux's netvsc
//! needs, data packets with their per-packet information, and the messages the host puts in
//! receive sections (data packets, completions, status indications).

use crate::vnet::TxOffload;
use hvdef::rndis::{
    self as r, msg, oid, status, Header, IndicateStatus, InitComplete, ObjectHeader, Offload,
    OffloadParameters, OidRequest, Packet, PerPacketInfo, PktInfoId, QueryComplete,
    RequestComplete, ResetComplete, RssCapabilities, RssParameters,
};
use std::ops::Range;
use zerocopy::{FromBytes, IntoBytes};

/// Host-side facts the OIDs report.
#[derive(Debug, Clone, Copy)]
pub struct NicInfo {
    pub mac: [u8; 6],
    pub mtu: u32,
    pub link_up: bool,
    /// Receive queues the NIC can give (the RSS capability).
    pub max_queues: u16,
    /// Negotiated NVSP version (offload object revisions and RSS depend on it).
    pub nvsp_version: u32,
}

/// Link speed reported, in units of 100 bit/s (10 Gbit/s).
pub const LINK_SPEED: u32 = 100_000_000;
/// RNDIS packets the guest may batch into one send section.
pub const MAX_PACKETS_PER_MESSAGE: u32 = 8;
/// log2 of the alignment of batched packets (8 bytes).
pub const PACKET_ALIGNMENT_FACTOR: u32 = 3;
/// Entries of the RSS indirection table the host offers.
pub const RSS_TABLE_ENTRIES: u16 = 128;
/// Multicast addresses the guest may list.
pub const MULTICAST_LIST_SIZE: u32 = 32;

/// Offloads as the guest last set them (OID_TCP_OFFLOAD_PARAMETERS values, 0 = never set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffloadConfig {
    pub ip4_csum: u8,
    pub tcp4_csum: u8,
    pub udp4_csum: u8,
    pub tcp6_csum: u8,
    pub udp6_csum: u8,
    pub lsov2_ip4: u8,
    pub lsov2_ip6: u8,
}

/// RSS as the guest set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RssConfig {
    pub enabled: bool,
    pub hash_info: u32,
    pub table: Vec<u32>,
    pub key: Vec<u8>,
}

/// The RNDIS device state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RndisState {
    pub initialized: bool,
    pub packet_filter: u32,
    pub offload: OffloadConfig,
    pub rss: RssConfig,
    pub multicast_addresses: u32,
    pub resets: u64,
}

/// A message the guest sent that breaks the RNDIS framing or layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RndisError {
    #[error("message of {0} bytes is too short")]
    Short(usize),
    #[error("msg_len {len} does not fit the {left} bytes left")]
    BadLength { len: u32, left: usize },
    #[error("data at {offset}+{len} lies outside the message")]
    BadData { offset: u32, len: u32 },
    #[error("per-packet information is malformed")]
    BadPpi,
    #[error("message type {0:#x} is not a request")]
    NotARequest(u32),
}

/// Splits a guest buffer into RNDIS messages (`msg_len` includes the padding Linux adds
/// between batched packets). Stops at trailing zero padding.
pub fn split(buf: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), RndisError>> {
    let mut at = 0usize;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let left = buf.len() - at;
        if left == 0 {
            return None;
        }
        let Ok((h, _)) = Header::read_from_prefix(&buf[at..]) else {
            done = true;
            // Padding to the section's alignment.
            return buf[at..]
                .iter()
                .any(|&b| b != 0)
                .then_some(Err(RndisError::Short(left)));
        };
        if h.msg_type == 0 && h.msg_len == 0 {
            done = true;
            return None;
        }
        let len = h.msg_len as usize;
        if len < 8 || len > left {
            done = true;
            return Some(Err(RndisError::BadLength {
                len: h.msg_len,
                left,
            }));
        }
        let m = &buf[at..at + len];
        at += len;
        Some(Ok((h.msg_type, m)))
    })
}

/// A data packet from the guest: where its frame lies in the message, and its offloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub data: Range<usize>,
    pub offload: TxOffload,
}

/// Parses a PACKET message (with its 8-byte header).
pub fn parse_packet(m: &[u8]) -> Result<TxPacket, RndisError> {
    let body = m.get(8..).ok_or(RndisError::Short(m.len()))?;
    let (p, _) = Packet::read_from_prefix(body).map_err(|_| RndisError::Short(m.len()))?;
    let range = |offset: u32, len: u32| -> Result<Range<usize>, RndisError> {
        let start = offset as usize;
        let end = start
            .checked_add(len as usize)
            .ok_or(RndisError::BadData { offset, len })?;
        if end > body.len() || (len > 0 && start < size_of::<Packet>()) {
            return Err(RndisError::BadData { offset, len });
        }
        Ok(8 + start..8 + end)
    };
    let data = range(p.data_offset, p.data_len)?;
    let mut offload = TxOffload::default();
    if p.ppi_len > 0 {
        let ppis = &m[range(p.ppi_offset, p.ppi_len)?];
        let mut at = 0usize;
        while at < ppis.len() {
            let (e, _) =
                PerPacketInfo::read_from_prefix(&ppis[at..]).map_err(|_| RndisError::BadPpi)?;
            let size = e.size as usize;
            let off = e.offset as usize;
            if size < size_of::<PerPacketInfo>() || size > ppis.len() - at || off + 4 > size {
                return Err(RndisError::BadPpi);
            }
            if off < size_of::<PerPacketInfo>() {
                return Err(RndisError::BadPpi);
            }
            let v = u32::from_le_bytes(
                ppis[at + off..at + off + 4]
                    .try_into()
                    .map_err(|_| RndisError::BadPpi)?,
            );
            match e.ppi_type {
                r::ppi::TCPIP_CHECKSUM => offload.csum = Some(v),
                r::ppi::TCP_LARGESEND => offload.lso = Some(v),
                r::ppi::IEEE_8021Q => offload.vlan = Some(v),
                _ => {}
            }
            at += size;
        }
    }
    Ok(TxPacket { data, offload })
}

fn message(msg_type: u32, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 8 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(
        Header {
            msg_type,
            msg_len: len as u32,
        }
        .as_bytes(),
    );
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// An INDICATE_STATUS message without a status buffer (media connect / disconnect).
pub fn indicate_status(code: u32) -> Vec<u8> {
    message(
        msg::INDICATE_STATUS,
        &[IndicateStatus {
            status: code,
            status_len: 0,
            status_offset: 0,
        }
        .as_bytes()],
    )
}

/// Bytes each receive section reserves before the frame data: the RNDIS header, the packet
/// header and up to three per-packet infos (checksum, fragment id, spare).
pub const RX_HEADER_RESERVE: usize = 96;
/// `data_offset` of every data packet the host sends (counted from the packet header).
const RX_DATA_OFFSET: u32 = (RX_HEADER_RESERVE - 8) as u32;

/// How a received frame is split over sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub packet_id: u16,
    pub first: bool,
    pub last: bool,
}

/// Writes the header of a data packet carrying `data_len` frame bytes that follow at
/// [`RX_HEADER_RESERVE`]; returns the message length.
pub fn rx_packet_header(
    out: &mut [u8; RX_HEADER_RESERVE],
    data_len: u32,
    csum: Option<u32>,
    fragment: Option<Fragment>,
) -> u32 {
    out.fill(0);
    let mut ppi_at = 8 + size_of::<Packet>();
    let ppi_start = ppi_at;
    let mut put = |ppi_type: u32, value: &[u8]| {
        let e = PerPacketInfo {
            size: (12 + value.len()) as u32,
            ppi_type,
            offset: 12,
        };
        out[ppi_at..ppi_at + 12].copy_from_slice(e.as_bytes());
        out[ppi_at + 12..ppi_at + 12 + value.len()].copy_from_slice(value);
        ppi_at += 12 + value.len();
    };
    if let Some(c) = csum {
        put(r::ppi::TCPIP_CHECKSUM, &c.to_le_bytes());
    }
    if let Some(f) = fragment {
        let mut flag = r::pktinfo::SUBALLOC;
        if f.first {
            flag |= r::pktinfo::FIRST_FRAGMENT;
        }
        if f.last {
            flag |= r::pktinfo::LAST_FRAGMENT;
        }
        let id = PktInfoId {
            version: r::pktinfo::VERSION_1,
            flag,
            packet_id: f.packet_id,
        };
        put(r::ppi::PKTINFO_ID | r::ppi::INTERNAL, id.as_bytes());
    }
    let ppi_len = (ppi_at - ppi_start) as u32;
    let msg_len = RX_HEADER_RESERVE as u32 + data_len;
    out[..8].copy_from_slice(
        Header {
            msg_type: msg::PACKET,
            msg_len,
        }
        .as_bytes(),
    );
    let p = Packet {
        data_offset: RX_DATA_OFFSET,
        data_len,
        ppi_offset: if ppi_len > 0 {
            size_of::<Packet>() as u32
        } else {
            0
        },
        ppi_len,
        ..Default::default()
    };
    out[8..8 + size_of::<Packet>()].copy_from_slice(p.as_bytes());
    msg_len
}

/// What a control request did besides its answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlOutcome {
    /// The message to put in a receive section (none for HALT).
    pub response: Option<Vec<u8>>,
}

fn complete(t: u32, request_id: u32, st: u32) -> Vec<u8> {
    message(
        t,
        &[RequestComplete {
            request_id,
            status: st,
        }
        .as_bytes()],
    )
}

fn query_complete(request_id: u32, st: u32, info: &[u8]) -> Vec<u8> {
    let c = QueryComplete {
        request_id,
        status: st,
        info_len: info.len() as u32,
        info_offset: if info.is_empty() {
            0
        } else {
            size_of::<QueryComplete>() as u32
        },
    };
    message(msg::QUERY_COMPLETE, &[c.as_bytes(), info])
}

/// The offload capabilities: TCP/UDP checksums for IPv4 and IPv6 both ways, LSO v2 for
/// both, in the revision the negotiated NVSP version implies.
pub fn offload_capabilities(nvsp_version: u32) -> Vec<u8> {
    use hvdef::netvsp::version;
    use r::caps::*;
    let (revision, size) = if nvsp_version >= version::V5 {
        (3, r::OFFLOAD_SIZE_6_30)
    } else if nvsp_version >= version::V4 {
        (2, r::OFFLOAD_SIZE_6_1)
    } else {
        (1, r::OFFLOAD_SIZE_6_0)
    };
    let tx4 = TXCSUM_IP4OPT | TXCSUM_TCP4OPT | TXCSUM_TCP4 | TXCSUM_UDP4 | TXCSUM_IP4;
    let tx6 = TXCSUM_IP6EXT | TXCSUM_TCP6OPT | TXCSUM_TCP6 | TXCSUM_UDP6;
    let o = Offload {
        header: ObjectHeader {
            object_type: r::object::OFFLOAD,
            revision,
            size,
        },
        ip4_tx_encap: ENCAP_8023,
        ip4_tx_csum: tx4,
        ip4_rx_encap: ENCAP_8023,
        ip4_rx_csum: tx4,
        ip6_tx_encap: ENCAP_8023,
        ip6_tx_csum: tx6,
        ip6_rx_encap: ENCAP_8023,
        ip6_rx_csum: tx6,
        lsov2_ip4_encap: ENCAP_8023,
        lsov2_ip4_max_size: 62780,
        lsov2_ip4_min_segments: 2,
        lsov2_ip6_encap: ENCAP_8023,
        lsov2_ip6_max_size: 62780,
        lsov2_ip6_min_segments: 2,
        lsov2_ip6_options: LSOV2_IP6EXT | LSOV2_TCP6OPT,
        ..Default::default()
    };
    o.as_bytes()[..usize::from(size)].to_vec()
}

fn u32_info(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn query(state: &RndisState, nic: &NicInfo, which: u32) -> Option<Vec<u8>> {
    Some(match which {
        oid::GEN_MAXIMUM_FRAME_SIZE | oid::GEN_MAXIMUM_LOOKAHEAD | oid::GEN_CURRENT_LOOKAHEAD => {
            u32_info(nic.mtu)
        }
        oid::GEN_MAXIMUM_TOTAL_SIZE
        | oid::GEN_TRANSMIT_BLOCK_SIZE
        | oid::GEN_RECEIVE_BLOCK_SIZE => u32_info(nic.mtu + 14),
        oid::ETH_PERMANENT_ADDRESS | oid::ETH_CURRENT_ADDRESS => nic.mac.to_vec(),
        oid::GEN_MEDIA_CONNECT_STATUS => u32_info(if nic.link_up {
            r::MEDIA_STATE_CONNECTED
        } else {
            r::MEDIA_STATE_DISCONNECTED
        }),
        oid::GEN_LINK_SPEED => u32_info(LINK_SPEED),
        oid::GEN_MEDIA_SUPPORTED | oid::GEN_MEDIA_IN_USE => u32_info(r::MEDIUM_802_3),
        oid::GEN_HARDWARE_STATUS => u32_info(0),
        oid::GEN_CURRENT_PACKET_FILTER => u32_info(state.packet_filter),
        oid::GEN_MAXIMUM_SEND_PACKETS => u32_info(MAX_PACKETS_PER_MESSAGE),
        oid::GEN_MAC_OPTIONS => u32_info(0),
        oid::GEN_VENDOR_ID => u32_info(0x00_15_5d),
        oid::GEN_VENDOR_DRIVER_VERSION | oid::GEN_DRIVER_VERSION => u32_info(0x0001_0000),
        oid::GEN_VENDOR_DESCRIPTION => b"Viridian synthetic NIC\0".to_vec(),
        oid::ETH_MAXIMUM_LIST_SIZE => u32_info(MULTICAST_LIST_SIZE),
        oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES | oid::TCP_OFFLOAD_CURRENT_CONFIG => {
            offload_capabilities(nic.nvsp_version)
        }
        oid::GEN_RECEIVE_SCALE_CAPABILITIES if nic.nvsp_version >= hvdef::netvsp::version::V5 => {
            RssCapabilities {
                header: ObjectHeader {
                    object_type: r::object::RSS_CAPABILITIES,
                    revision: r::RSS_REVISION_2,
                    size: size_of::<RssCapabilities>() as u16,
                },
                capabilities: r::rss_caps::MESSAGE_SIGNALED_INTERRUPTS
                    | r::rss_caps::CLASSIFICATION_AT_DPC
                    | r::rss_caps::HASH_TYPE_TCP_IPV4
                    | r::rss_caps::HASH_TYPE_TCP_IPV6,
                interrupt_messages: u32::from(nic.max_queues),
                receive_queues: u32::from(nic.max_queues),
                indirection_table_entries: RSS_TABLE_ENTRIES,
            }
            .as_bytes()
            .to_vec()
        }
        _ => return None,
    })
}

fn set_offload(state: &mut RndisState, info: &[u8]) -> u32 {
    let mut p = OffloadParameters::default();
    let n = info.len().min(size_of::<OffloadParameters>());
    p.as_mut_bytes()[..n].copy_from_slice(&info[..n]);
    let h = p.header;
    if info.len() < usize::from(r::OFFLOAD_PARAMETERS_SIZE_V4)
        || h.object_type != r::object::DEFAULT
        || h.revision < 1
        || usize::from(h.size) > info.len()
    {
        return status::INVALID_DATA;
    }
    let csum = [
        p.ip4_csum,
        p.tcp4_csum,
        p.udp4_csum,
        p.tcp6_csum,
        p.udp6_csum,
    ];
    if csum.iter().any(|&v| v > r::offload_param::TX_RX_ENABLED)
        || p.lsov2_ip4 > r::offload_param::LSOV2_ENABLED
        || p.lsov2_ip6 > r::offload_param::LSOV2_ENABLED
    {
        return status::INVALID_DATA;
    }
    let o = &mut state.offload;
    let keep = |old: &mut u8, new: u8| {
        if new != r::offload_param::NO_CHANGE {
            *old = new;
        }
    };
    keep(&mut o.ip4_csum, p.ip4_csum);
    keep(&mut o.tcp4_csum, p.tcp4_csum);
    keep(&mut o.udp4_csum, p.udp4_csum);
    keep(&mut o.tcp6_csum, p.tcp6_csum);
    keep(&mut o.udp6_csum, p.udp6_csum);
    keep(&mut o.lsov2_ip4, p.lsov2_ip4);
    keep(&mut o.lsov2_ip6, p.lsov2_ip6);
    status::SUCCESS
}

fn set_rss(state: &mut RndisState, nic: &NicInfo, info: &[u8]) -> u32 {
    let Ok((p, _)) = RssParameters::read_from_prefix(info) else {
        return status::INVALID_LENGTH;
    };
    let h = p.header;
    if h.object_type != r::object::RSS_PARAMETERS || h.revision < 1 {
        return status::INVALID_DATA;
    }
    if p.flags & r::rss_flag::DISABLE_RSS != 0 {
        state.rss.enabled = false;
        return status::SUCCESS;
    }
    let slice = |offset: u32, len: usize| {
        let start = offset as usize;
        info.get(start..start.checked_add(len)?)
    };
    let tsize = usize::from(p.indirection_table_size);
    let Some(table) = slice(p.indirection_table_offset, tsize) else {
        return status::INVALID_DATA;
    };
    let Some(key) = slice(p.hash_key_offset, usize::from(p.hash_key_size)) else {
        return status::INVALID_DATA;
    };
    if !tsize.is_multiple_of(4) || tsize / 4 > 2 * usize::from(RSS_TABLE_ENTRIES) {
        return status::INVALID_DATA;
    }
    let table: Vec<u32> = table
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if table.iter().any(|&q| q >= u32::from(nic.max_queues.max(1))) {
        return status::INVALID_DATA;
    }
    state.rss = RssConfig {
        enabled: true,
        hash_info: p.hash_info,
        table,
        key: key.to_vec(),
    };
    status::SUCCESS
}

fn set(state: &mut RndisState, nic: &NicInfo, which: u32, info: &[u8]) -> u32 {
    match which {
        oid::GEN_CURRENT_PACKET_FILTER => match <[u8; 4]>::try_from(info) {
            Ok(b) => {
                state.packet_filter = u32::from_le_bytes(b);
                status::SUCCESS
            }
            Err(_) => status::INVALID_LENGTH,
        },
        oid::TCP_OFFLOAD_PARAMETERS => set_offload(state, info),
        oid::GEN_RECEIVE_SCALE_PARAMETERS => set_rss(state, nic, info),
        oid::ETH_MULTICAST_LIST => {
            if !info.len().is_multiple_of(6) || info.len() / 6 > MULTICAST_LIST_SIZE as usize {
                status::INVALID_LENGTH
            } else {
                state.multicast_addresses = (info.len() / 6) as u32;
                status::SUCCESS
            }
        }
        oid::OFFLOAD_ENCAPSULATION | oid::GEN_NETWORK_LAYER_ADDRESSES => status::SUCCESS,
        // Includes GEN_RNDIS_CONFIG_PARAMETER ("NetworkAddress"): the MAC is the host's.
        _ => status::NOT_SUPPORTED,
    }
}

/// The information buffer of a QUERY or SET: `info_offset` counts from the request id.
fn info_buffer<'a>(m: &'a [u8], req: &OidRequest) -> Option<&'a [u8]> {
    if req.info_len == 0 {
        return Some(&[]);
    }
    let start = 8usize.checked_add(req.info_offset as usize)?;
    if (req.info_offset as usize) < size_of::<OidRequest>() {
        return None;
    }
    m.get(start..start.checked_add(req.info_len as usize)?)
}

fn request<T: FromBytes>(m: &[u8]) -> Result<T, RndisError> {
    T::read_from_prefix(m.get(8..).unwrap_or(&[]))
        .map(|(t, _)| t)
        .map_err(|_| RndisError::Short(m.len()))
}

/// Handles one control message (anything but PACKET). A malformed request that still has a
/// request id gets a completion with an error status; one without gets `Err`.
pub fn control(
    state: &mut RndisState,
    nic: &NicInfo,
    msg_type: u32,
    m: &[u8],
) -> Result<ControlOutcome, RndisError> {
    let response = match msg_type {
        msg::INIT => {
            let req: r::InitRequest = request(m)?;
            let st = if req.major_version == 0 {
                status::NOT_SUPPORTED
            } else {
                state.initialized = true;
                status::SUCCESS
            };
            let c = InitComplete {
                request_id: req.request_id,
                status: st,
                major_version: r::MAJOR_VERSION,
                minor_version: r::MINOR_VERSION,
                device_flags: r::DF_CONNECTIONLESS,
                medium: r::MEDIUM_802_3,
                max_packets_per_message: MAX_PACKETS_PER_MESSAGE,
                max_transfer_size: 0x40000,
                packet_alignment_factor: PACKET_ALIGNMENT_FACTOR,
                af_list_offset: 0,
                af_list_size: 0,
            };
            Some(message(msg::INIT_COMPLETE, &[c.as_bytes()]))
        }
        msg::HALT => {
            state.initialized = false;
            state.packet_filter = 0;
            None
        }
        msg::QUERY => {
            let req: OidRequest = request(m)?;
            Some(match info_buffer(m, &req) {
                None => query_complete(req.request_id, status::INVALID_DATA, &[]),
                Some(_) => match query(state, nic, req.oid) {
                    Some(info) => query_complete(req.request_id, status::SUCCESS, &info),
                    None => query_complete(req.request_id, status::NOT_SUPPORTED, &[]),
                },
            })
        }
        msg::SET => {
            let req: OidRequest = request(m)?;
            let st = match info_buffer(m, &req) {
                None => status::INVALID_DATA,
                Some(info) => set(state, nic, req.oid, info),
            };
            Some(complete(msg::SET_COMPLETE, req.request_id, st))
        }
        msg::RESET => {
            state.resets += 1;
            let c = ResetComplete {
                status: status::SUCCESS,
                addressing_reset: 1,
            };
            Some(message(msg::RESET_COMPLETE, &[c.as_bytes()]))
        }
        msg::KEEPALIVE => {
            let req: RequestComplete = request(m).or_else(|_| {
                request::<u32>(m).map(|id| RequestComplete {
                    request_id: id,
                    status: 0,
                })
            })?;
            Some(complete(
                msg::KEEPALIVE_COMPLETE,
                req.request_id,
                status::SUCCESS,
            ))
        }
        t => return Err(RndisError::NotARequest(t)),
    };
    Ok(ControlOutcome { response })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIC: NicInfo = NicInfo {
        mac: [0, 0x15, 0x5d, 1, 2, 3],
        mtu: 1500,
        link_up: true,
        max_queues: 4,
        nvsp_version: hvdef::netvsp::version::V61,
    };

    fn oid_request(t: u32, id: u32, which: u32, info: &[u8]) -> Vec<u8> {
        let req = OidRequest {
            request_id: id,
            oid: which,
            info_len: info.len() as u32,
            info_offset: if info.is_empty() { 0 } else { 20 },
            device_vc_handle: 0,
        };
        message(t, &[req.as_bytes(), info])
    }

    fn query_result(resp: &[u8]) -> (u32, u32, Vec<u8>) {
        let (c, _) = QueryComplete::read_from_prefix(&resp[8..]).unwrap();
        let off = 8 + c.info_offset as usize;
        let info = resp[off..off + c.info_len as usize].to_vec();
        (c.request_id, c.status, info)
    }

    #[test]
    fn queries_answer_what_linux_reads() {
        let mut s = RndisState::default();
        let mut q = |which: u32| {
            let m = oid_request(msg::QUERY, 7, which, &[]);
            let r = control(&mut s, &NIC, msg::QUERY, &m)
                .unwrap()
                .response
                .unwrap();
            query_result(&r)
        };
        assert_eq!(q(oid::ETH_PERMANENT_ADDRESS), (7, 0, NIC.mac.to_vec()));
        assert_eq!(q(oid::GEN_MAXIMUM_FRAME_SIZE).2, 1500u32.to_le_bytes());
        assert_eq!(q(oid::GEN_MEDIA_CONNECT_STATUS).2, 0u32.to_le_bytes());
        let caps = q(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES).2;
        assert_eq!(caps.len(), 156);
        assert_eq!((caps[0], caps[1]), (0xA7, 3));
        let rss = q(oid::GEN_RECEIVE_SCALE_CAPABILITIES).2;
        assert_eq!(rss.len(), 18);
        let (st, info) = {
            let (_, st, info) = q(0x1234_5678);
            (st, info)
        };
        assert_eq!((st, info.len()), (status::NOT_SUPPORTED, 0));
    }

    #[test]
    fn sets_validate_their_buffers() {
        let mut s = RndisState::default();
        let set_status = |s: &mut RndisState, which: u32, info: &[u8]| {
            let m = oid_request(msg::SET, 9, which, info);
            let r = control(s, &NIC, msg::SET, &m).unwrap().response.unwrap();
            let c = RequestComplete::read_from_prefix(&r[8..]).unwrap().0;
            c.status
        };
        assert_eq!(
            set_status(
                &mut s,
                oid::GEN_CURRENT_PACKET_FILTER,
                &0xbu32.to_le_bytes()
            ),
            0
        );
        assert_eq!(s.packet_filter, 0xb);
        assert_eq!(
            set_status(&mut s, oid::GEN_CURRENT_PACKET_FILTER, &[1, 2]),
            status::INVALID_LENGTH
        );
        let mut p = OffloadParameters {
            header: ObjectHeader {
                object_type: 0x80,
                revision: 3,
                size: 28,
            },
            ..Default::default()
        };
        p.tcp4_csum = 4;
        p.lsov2_ip4 = 2;
        assert_eq!(
            set_status(&mut s, oid::TCP_OFFLOAD_PARAMETERS, p.as_bytes()),
            0
        );
        assert_eq!((s.offload.tcp4_csum, s.offload.lsov2_ip4), (4, 2));
        p.tcp6_csum = 9;
        assert_eq!(
            set_status(&mut s, oid::TCP_OFFLOAD_PARAMETERS, p.as_bytes()),
            status::INVALID_DATA
        );
        assert_eq!(
            set_status(&mut s, oid::GEN_RNDIS_CONFIG_PARAMETER, &[0; 40]),
            status::NOT_SUPPORTED
        );
        // An info buffer past the message.
        let mut m = oid_request(msg::SET, 3, oid::GEN_CURRENT_PACKET_FILTER, &[0; 4]);
        m[8 + 12..8 + 16].copy_from_slice(&1000u32.to_le_bytes());
        let r = control(&mut s, &NIC, msg::SET, &m)
            .unwrap()
            .response
            .unwrap();
        let st = RequestComplete::read_from_prefix(&r[8..]).unwrap().0.status;
        assert_eq!(st, status::INVALID_DATA);
    }

    #[test]
    fn packets_and_framing() {
        let mut m = vec![0u8; 8 + 36 + 16 + 60];
        m[..4].copy_from_slice(&msg::PACKET.to_le_bytes());
        let len = m.len() as u32;
        m[4..8].copy_from_slice(&len.to_le_bytes());
        let p = Packet {
            data_offset: 36 + 16,
            data_len: 60,
            ppi_offset: 36,
            ppi_len: 16,
            ..Default::default()
        };
        m[8..44].copy_from_slice(p.as_bytes());
        let e = PerPacketInfo {
            size: 16,
            ppi_type: r::ppi::TCPIP_CHECKSUM,
            offset: 12,
        };
        m[44..56].copy_from_slice(e.as_bytes());
        m[56..60].copy_from_slice(&5u32.to_le_bytes());
        let t = parse_packet(&m).unwrap();
        assert_eq!(t.data, 60..120);
        assert_eq!(t.offload.csum, Some(5));
        // A PPI claiming more than the area.
        m[44..48].copy_from_slice(&200u32.to_le_bytes());
        assert_eq!(parse_packet(&m), Err(RndisError::BadPpi));
        // Data past the message.
        m[12..16].copy_from_slice(&61u32.to_le_bytes());
        assert!(matches!(parse_packet(&m), Err(RndisError::BadData { .. })));
        // Two messages, then zero padding; then a length past the end.
        let mut two = m.clone();
        two.extend_from_slice(&m);
        two.extend_from_slice(&[0; 8]);
        assert_eq!(split(&two).filter(|r| r.is_ok()).count(), 2);
        two[4..8].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(split(&two).next().unwrap().is_err());
    }

    #[test]
    fn rx_header_layout() {
        let mut h = [0u8; RX_HEADER_RESERVE];
        let len = rx_packet_header(
            &mut h,
            1000,
            Some(8),
            Some(Fragment {
                packet_id: 3,
                first: true,
                last: false,
            }),
        );
        assert_eq!(len, 1096);
        let mut whole = h.to_vec();
        whole.extend_from_slice(&[0xab; 1000]);
        let p = parse_packet(&whole).unwrap();
        assert_eq!(p.data, 96..1096);
        assert_eq!(p.offload.csum, Some(8));
    }
}
