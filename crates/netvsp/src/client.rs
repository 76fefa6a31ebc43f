//! A guest-side netvsc for loopback tests: it plays Linux's `hv_netvsc` over a
//! [`vmbus::client`] channel (NVSP negotiation, receive and send buffers, the RNDIS bring-up,
//! frames with per-packet info both ways, receive completions) and lets a test misbehave on
//! purpose (raw messages, sections never returned).

use crate::nvsp;
use guestmem::GuestMemory;
use hvdef::netvsp::{self as nv, msg, version, NO_SECTION};
use hvdef::rndis::{self as r, msg as rmsg, oid};
use hvdef::vmbus::{packet_type, PACKET_FLAG_COMPLETION_REQUESTED};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::client::{Client, GuestChannel, Transport};
use vmbus::host::Doorbell;
use vmbus::{ChannelError, PagedRange, VmbusHost};
use zerocopy::{FromBytes, IntoBytes};

const PAGE: u64 = 4096;

/// An RNDIS message the host put in a receive section.
#[derive(Debug, Clone)]
pub struct Received {
    pub channel_type: u32,
    pub bytes: Vec<u8>,
}

/// A frame reassembled from RNDIS data packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub data: Vec<u8>,
    pub csum: Option<u32>,
    /// Sections it came in.
    pub fragments: usize,
}

/// The guest end of one netvsc channel.
pub struct Netvsc {
    pub ch: GuestChannel,
    /// The host the channel signals (a test that restores the bus into a new host sets it).
    pub host: VmbusHost,
    event: Arc<Doorbell>,
    mem: GuestMemory,
    pub version: u32,
    recv_pfns: Vec<u64>,
    pub section_size: u32,
    pub sections: u32,
    send_pfns: Vec<u64>,
    pub send_section_size: u32,
    /// Guest pages for GPA_DIRECT payloads.
    scratch: Vec<u64>,
    next_tid: u64,
    next_request: u32,
    completions: HashMap<u64, (u16, Vec<u8>)>,
    pub inbox: VecDeque<Received>,
    /// In-band messages from the host.
    pub inband: Vec<Vec<u8>>,
    /// Complete transfer-page packets as they arrive (false: hold every section).
    pub auto_complete: bool,
    pub held: Vec<u64>,
    /// Transfer-page packets seen, and ranges in them.
    pub xfer_packets: u64,
    pub xfer_ranges: u64,
    pub xfer_ids: Vec<u16>,
    /// Byte offsets of the ranges of each transfer-page packet, by transaction id.
    pub xfer_offsets: HashMap<u64, Vec<u32>>,
}

/// How a frame travels to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    SendSection(u32),
    Gpa,
}

impl Netvsc {
    /// Opens the channel `relid` with rings of `ring_pages` each way.
    pub fn open<T: Transport>(
        client: &mut Client<T>,
        host: VmbusHost,
        event: Arc<Doorbell>,
        relid: u32,
        ring_pages: u64,
    ) -> Self {
        let ch = client
            .open_channel(relid, ring_pages, ring_pages, 0)
            .expect("open");
        let scratch = client.alloc_pages(40).expect("pages");
        Self {
            ch,
            host,
            event,
            mem: client.memory().clone(),
            version: 0,
            recv_pfns: Vec::new(),
            section_size: 0,
            sections: 0,
            send_pfns: Vec::new(),
            send_section_size: 0,
            scratch,
            next_tid: 1,
            next_request: 1,
            completions: HashMap::new(),
            inbox: VecDeque::new(),
            inband: Vec::new(),
            auto_complete: true,
            held: Vec::new(),
            xfer_packets: 0,
            xfer_ranges: 0,
            xfer_ids: Vec::new(),
            xfer_offsets: HashMap::new(),
        }
    }

    fn signal(&mut self) {
        if self.ch.channel.take_signal() {
            let _ = self.host.signal_event(self.ch.connection_id);
        }
    }

    /// Sends a packet, retrying while the ring is full.
    pub fn send_raw(&mut self, ptype: u16, flags: u16, tid: u64, header: &[u8], payload: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.ch.channel.try_send(ptype, flags, tid, header, payload) {
                Ok(()) => break,
                Err(ChannelError::Full) if Instant::now() < deadline => {
                    self.signal();
                    self.pump();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("guest send: {e}"),
            }
        }
        self.signal();
    }

    /// Sends an NVSP message in-band with a completion requested; returns its id.
    pub fn send_nvsp(&mut self, m: &[u8]) -> u64 {
        let tid = self.next_tid;
        self.next_tid += 1;
        self.send_raw(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            tid,
            &[],
            m,
        );
        tid
    }

    /// Sends an NVSP message that wants no answer.
    pub fn post_nvsp(&mut self, m: &[u8]) {
        self.send_raw(packet_type::DATA_INBAND, 0, 0, &[], m);
    }

    /// Completes a held transfer-page packet.
    pub fn complete_xfer(&mut self, tid: u64) {
        let m = nvsp::rndis_complete(nv::status::SUCCESS);
        self.send_raw(packet_type::COMPLETION, 0, tid, &[], &m[..8]);
    }

    /// Reads everything the host sent.
    pub fn pump(&mut self) -> usize {
        let mut n = 0;
        let mut buf = Vec::new();
        loop {
            let (ptype, tid, payload, xfer) = match self.ch.channel.try_recv(&mut buf) {
                Ok(Some(p)) => (
                    p.packet_type(),
                    p.transaction_id(),
                    p.payload().to_vec(),
                    p.xfer_page_ranges().ok(),
                ),
                Ok(None) => break,
                Err(e) => panic!("guest receive: {e}"),
            };
            self.signal();
            n += 1;
            match ptype {
                packet_type::COMPLETION => {
                    self.completions.insert(tid, (ptype, payload));
                }
                packet_type::DATA_INBAND => self.inband.push(payload),
                packet_type::DATA_USING_XFER_PAGES => {
                    let (id, ranges) = xfer.expect("transfer-page header");
                    let m = nv::RndisPacket::read_from_prefix(&payload[4..])
                        .expect("SEND_RNDIS_PACKET")
                        .0;
                    assert_eq!(
                        u32::from_le_bytes(payload[..4].try_into().unwrap()),
                        msg::SEND_RNDIS_PACKET
                    );
                    self.xfer_packets += 1;
                    self.xfer_ranges += ranges.len() as u64;
                    self.xfer_ids.push(id);
                    self.xfer_offsets
                        .insert(tid, ranges.iter().map(|r| r.byte_offset).collect());
                    for rg in ranges {
                        let mut b = vec![0u8; rg.byte_count as usize];
                        read_buffer(&self.mem, &self.recv_pfns, rg.byte_offset, &mut b);
                        self.inbox.push_back(Received {
                            channel_type: m.channel_type,
                            bytes: b,
                        });
                    }
                    if self.auto_complete {
                        self.complete_xfer(tid);
                    } else {
                        self.held.push(tid);
                    }
                }
                t => panic!("unexpected packet type {t}"),
            }
        }
        n
    }

    /// Pumps until `done` holds or 10 s pass.
    pub fn wait_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            vmbus::testing::wait_event(&self.event, Duration::from_millis(20));
        }
    }

    /// Waits for the completion of `tid`; returns its payload.
    pub fn completion(&mut self, tid: u64) -> Vec<u8> {
        assert!(
            self.wait_until(|s| s.completions.contains_key(&tid)),
            "no completion for {tid}"
        );
        self.completions.remove(&tid).expect("checked").1
    }

    /// Sends `m` and waits for its completion; returns (message type, status at `at`).
    pub fn request(&mut self, m: &[u8]) -> Vec<u8> {
        let tid = self.send_nvsp(m);
        self.completion(tid)
    }

    /// INIT with min = max = `v`; returns the status.
    pub fn init(&mut self, v: u32) -> u32 {
        let c = self.request(&nvsp::message(
            msg::INIT,
            &nv::Init {
                min_version: v,
                max_version: v,
            },
        ));
        assert_eq!(u32_at(&c, 0), msg::INIT_COMPLETE);
        u32_at(&c, 12)
    }

    /// Negotiates like Linux: `versions` newest first, then NDIS config and version.
    pub fn negotiate(&mut self, versions: &[u32]) -> Option<u32> {
        let v = versions
            .iter()
            .copied()
            .find(|&v| self.init(v) == nv::status::SUCCESS)?;
        self.version = v;
        if v > version::V1 {
            self.post_nvsp(&nvsp::message(
                msg::SEND_NDIS_CONFIG,
                &nv::NdisConfig {
                    mtu: 1514,
                    reserved: 0,
                    capabilities: nv::capability::IEEE8021Q | nv::capability::TEAMING,
                },
            ));
        }
        let (major, minor) = if v <= version::V4 { (6, 1) } else { (6, 30) };
        self.post_nvsp(&nvsp::message(
            msg::SEND_NDIS_VERSION,
            &nv::NdisVersion { major, minor },
        ));
        Some(v)
    }

    /// Gives a receive buffer of `recv_pages` and a send buffer of `send_pages`; returns
    /// the two completions' statuses.
    pub fn give_buffers<T: Transport>(
        &mut self,
        client: &mut Client<T>,
        recv_pages: u64,
        send_pages: u64,
    ) -> (u32, u32) {
        let relid = self.ch.relid;
        let pfns = client.alloc_pages(recv_pages).expect("pages");
        let g = client.create_gpadl(relid, &pfns).expect("gpadl");
        let c = self.request(&nvsp::message(
            msg::SEND_RECEIVE_BUFFER,
            &nv::SendBuffer {
                gpadl: g,
                id: nv::RECEIVE_BUFFER_ID,
            },
        ));
        assert_eq!(u32_at(&c, 0), msg::SEND_RECEIVE_BUFFER_COMPLETE);
        let rc = nv::ReceiveBufferComplete::read_from_prefix(&c[4..])
            .expect("size")
            .0;
        if rc.status == nv::status::SUCCESS {
            assert_eq!(({ rc.num_sections }, { rc.section.offset }), (1, 0));
            assert!(rc.section.sub_alloc_size >= nv::MIN_SECTION_SIZE);
            assert!(
                u64::from(rc.section.sub_alloc_size) * u64::from(rc.section.num_sub_allocs)
                    <= recv_pages * PAGE
            );
            self.recv_pfns = pfns;
            self.section_size = rc.section.sub_alloc_size;
            self.sections = rc.section.num_sub_allocs;
        }
        let pfns = client.alloc_pages(send_pages).expect("pages");
        let g = client.create_gpadl(relid, &pfns).expect("gpadl");
        let c = self.request(&nvsp::message(
            msg::SEND_SEND_BUFFER,
            &nv::SendBuffer {
                gpadl: g,
                id: nv::SEND_BUFFER_ID,
            },
        ));
        assert_eq!(u32_at(&c, 0), msg::SEND_SEND_BUFFER_COMPLETE);
        let sc = nv::SendBufferComplete::read_from_prefix(&c[4..])
            .expect("size")
            .0;
        if sc.status == nv::status::SUCCESS {
            assert!(sc.section_size >= nv::MIN_SECTION_SIZE);
            self.send_pfns = pfns;
            self.send_section_size = sc.section_size;
        }
        (rc.status, sc.status)
    }

    /// Sends RNDIS bytes as SEND_RNDIS_PACKET; returns the completion status.
    pub fn send_rndis(&mut self, channel_type: u32, bytes: &[u8], via: Via) -> u32 {
        let (index, size, gpa) = match via {
            Via::SendSection(i) => {
                let off = i * self.send_section_size;
                if !self.send_pfns.is_empty() {
                    write_buffer(&self.mem, &self.send_pfns, off, bytes);
                }
                (i, bytes.len() as u32, None)
            }
            Via::Gpa => {
                let base = self.scratch[0] * PAGE;
                self.mem.write(base + 100, bytes).expect("scratch");
                let n = PagedRange::pfn_count(100, bytes.len() as u32) as usize;
                let r = PagedRange {
                    byte_offset: 100,
                    byte_count: bytes.len() as u32,
                    pfns: self.scratch[..n].to_vec(),
                };
                (NO_SECTION, 0, Some(r))
            }
        };
        let m = nvsp::message(
            msg::SEND_RNDIS_PACKET,
            &nv::RndisPacket {
                channel_type,
                section_index: index,
                section_size: size,
            },
        );
        self.send_rndis_raw(&m, gpa)
    }

    /// Sends a SEND_RNDIS_PACKET message as given, optionally with GPA_DIRECT ranges.
    pub fn send_rndis_raw(&mut self, m: &[u8], gpa: Option<PagedRange>) -> u32 {
        let tid = self.next_tid;
        self.next_tid += 1;
        match gpa {
            None => self.send_raw(
                packet_type::DATA_INBAND,
                PACKET_FLAG_COMPLETION_REQUESTED,
                tid,
                &[],
                m,
            ),
            Some(r) => {
                let h = vmbus::packet::gpa_direct_header(&[r]);
                self.send_raw(
                    packet_type::DATA_USING_GPA_DIRECT,
                    PACKET_FLAG_COMPLETION_REQUESTED,
                    tid,
                    &h,
                    m,
                )
            }
        }
        let c = self.completion(tid);
        assert_eq!(u32_at(&c, 0), msg::SEND_RNDIS_PACKET_COMPLETE);
        u32_at(&c, 4)
    }

    /// Sends an RNDIS control request and waits for the answer with its request id.
    pub fn rndis_request(&mut self, msg_type: u32, body_after_id: &[u8]) -> Vec<u8> {
        let id = self.next_request;
        self.next_request += 1;
        let m = rndis_message(msg_type, &[&id.to_le_bytes(), body_after_id]);
        let st = self.send_rndis(nv::CHANNEL_TYPE_CONTROL, &m, Via::SendSection(0));
        assert_eq!(st, nv::status::SUCCESS, "control request {msg_type:#x}");
        self.wait_control(id)
    }

    /// Waits for the control answer with request id `id`.
    pub fn wait_control(&mut self, id: u32) -> Vec<u8> {
        let mut found = None;
        assert!(
            self.wait_until(|s| {
                let at = s.inbox.iter().position(|m| {
                    u32_at(&m.bytes, 0) & rmsg::COMPLETION != 0 && u32_at(&m.bytes, 8) == id
                });
                if let Some(i) = at {
                    found = s.inbox.remove(i);
                }
                found.is_some()
            }),
            "no RNDIS answer for request {id}"
        );
        found.expect("found").bytes
    }

    /// QUERY: (status, information buffer).
    pub fn query(&mut self, which: u32, input: &[u8]) -> (u32, Vec<u8>) {
        let body = [
            which,
            input.len() as u32,
            if input.is_empty() { 0 } else { 20 },
            0,
        ];
        let mut b = body.as_bytes().to_vec();
        b.extend_from_slice(input);
        let r = self.rndis_request(rmsg::QUERY, &b);
        assert_eq!(u32_at(&r, 0), rmsg::QUERY_COMPLETE);
        let c = r::QueryComplete::read_from_prefix(&r[8..]).expect("size").0;
        let info = if c.info_len == 0 {
            Vec::new()
        } else {
            // Linux's checks: the buffer lies after the completion's fields, inside msg_len.
            assert!(c.info_offset >= 16);
            let start = 8 + c.info_offset as usize;
            r[start..start + c.info_len as usize].to_vec()
        };
        (c.status, info)
    }

    /// SET: the status.
    pub fn set(&mut self, which: u32, info: &[u8]) -> u32 {
        let mut b = [which, info.len() as u32, 20, 0].as_bytes().to_vec();
        b.extend_from_slice(info);
        let r = self.rndis_request(rmsg::SET, &b);
        assert_eq!(u32_at(&r, 0), rmsg::SET_COMPLETE);
        u32_at(&r, 12)
    }

    /// The whole Linux bring-up (rndis_filter_device_add, then ifup's packet filter).
    pub fn bring_up(&mut self) -> BringUp {
        let r = self.rndis_request(rmsg::INIT, [1u32, 0, 0x4000].as_bytes());
        assert_eq!(u32_at(&r, 0), rmsg::INIT_COMPLETE);
        let init = r::InitComplete::read_from_prefix(&r[8..]).expect("size").0;
        assert_eq!({ init.status }, 0);
        let (st, mtu) = self.query(oid::GEN_MAXIMUM_FRAME_SIZE, &[]);
        assert_eq!(st, 0);
        let (st, mac) = self.query(oid::ETH_PERMANENT_ADDRESS, &[]);
        assert_eq!((st, mac.len()), (0, 6));
        let _ = self.query(oid::GEN_FRIENDLY_NAME, &[]);
        let (rev, size) = if self.version >= version::V5 {
            (3, r::OFFLOAD_SIZE_6_30)
        } else if self.version >= version::V4 {
            (2, r::OFFLOAD_SIZE_6_1)
        } else {
            (1, r::OFFLOAD_SIZE_6_0)
        };
        let mut input = vec![0u8; usize::from(size)];
        input[..4].copy_from_slice(
            r::ObjectHeader {
                object_type: r::object::OFFLOAD,
                revision: rev,
                size,
            }
            .as_bytes(),
        );
        let (st, caps) = self.query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &input);
        assert_eq!(st, 0);
        let mut full = r::Offload::default();
        full.as_mut_bytes()[..caps.len().min(156)].copy_from_slice(&caps[..caps.len().min(156)]);
        let h = full.header;
        assert_eq!(h.object_type, r::object::OFFLOAD);
        assert!(
            h.revision >= 1 && usize::from(h.size) <= caps.len() && h.size >= r::OFFLOAD_SIZE_6_0
        );
        let mut p = r::OffloadParameters {
            header: r::ObjectHeader {
                object_type: r::object::DEFAULT,
                revision: 3,
                size: 28,
            },
            ip4_csum: r::offload_param::TX_RX_DISABLED,
            tcp4_csum: r::offload_param::TX_RX_ENABLED,
            tcp6_csum: r::offload_param::TX_RX_ENABLED,
            lsov2_ip4: r::offload_param::LSOV2_ENABLED,
            lsov2_ip6: r::offload_param::LSOV2_ENABLED,
            ..Default::default()
        };
        let len = if self.version <= version::V4 {
            p.header.size = r::OFFLOAD_PARAMETERS_SIZE_V4;
            usize::from(r::OFFLOAD_PARAMETERS_SIZE_V4)
        } else {
            p.udp4_csum = r::offload_param::TX_RX_ENABLED;
            p.udp6_csum = r::offload_param::TX_RX_ENABLED;
            28
        };
        let st = self.set(oid::TCP_OFFLOAD_PARAMETERS, &p.as_bytes()[..len]);
        assert_eq!(st, 0, "offload parameters");
        let (st, link) = self.query(oid::GEN_MEDIA_CONNECT_STATUS, &[]);
        assert_eq!(st, 0);
        let mut b = BringUp {
            mtu: u32_at(&mtu, 0),
            mac: mac.try_into().expect("6 bytes"),
            link_up: u32_at(&link, 0) == r::MEDIA_STATE_CONNECTED,
            offload: full,
            link_speed: None,
            rss_queues: None,
        };
        if self.version >= version::V5 {
            let (st, speed) = self.query(oid::GEN_LINK_SPEED, &[]);
            assert_eq!(st, 0);
            b.link_speed = Some(u32_at(&speed, 0));
            let (st, rss) = self.query(oid::GEN_RECEIVE_SCALE_CAPABILITIES, &[0u8; 18]);
            if st == 0 {
                let c = r::RssCapabilities::read_from_prefix(&rss).expect("size").0;
                b.rss_queues = Some(c.receive_queues);
            }
        }
        let f = r::filter::DIRECTED | r::filter::BROADCAST | r::filter::ALL_MULTICAST;
        assert_eq!(
            self.set(oid::GEN_CURRENT_PACKET_FILTER, &f.to_le_bytes()),
            0
        );
        b
    }

    /// Asks for `count` subchannels; returns (status, granted).
    pub fn request_subchannels(&mut self, count: u32) -> (u32, u32) {
        let c = self.request(&nvsp::message(
            msg::SUBCHANNEL,
            &nv::SubchannelRequest {
                op: nv::SUBCHANNEL_ALLOCATE,
                count,
            },
        ));
        assert_eq!(u32_at(&c, 0), msg::SUBCHANNEL);
        (u32_at(&c, 4), u32_at(&c, 8))
    }

    /// Shares another channel's buffers (a subchannel uses the primary's).
    pub fn share_buffers_of(&mut self, primary: &Netvsc) {
        self.version = primary.version;
        self.recv_pfns = primary.recv_pfns.clone();
        self.section_size = primary.section_size;
        self.sections = primary.sections;
        self.send_pfns = primary.send_pfns.clone();
        self.send_section_size = primary.send_section_size;
    }

    /// Sends one frame with per-packet infos (type, value); returns the completion status.
    pub fn send_frame(&mut self, frame: &[u8], ppis: &[(u32, u32)], via: Via) -> u32 {
        let m = data_packet(frame, ppis);
        self.send_rndis(nv::CHANNEL_TYPE_DATA, &m, via)
    }

    /// Sends one frame from send section `section` without waiting for its completion (a
    /// guest streaming); returns its transaction id, which [`Self::completed`] then tells.
    pub fn post_frame(&mut self, frame: &[u8], section: u32) -> u64 {
        let bytes = data_packet(frame, &[]);
        write_buffer(
            &self.mem,
            &self.send_pfns,
            section * self.send_section_size,
            &bytes,
        );
        let m = nvsp::message(
            msg::SEND_RNDIS_PACKET,
            &nv::RndisPacket {
                channel_type: nv::CHANNEL_TYPE_DATA,
                section_index: section,
                section_size: bytes.len() as u32,
            },
        );
        self.send_nvsp(&m)
    }

    /// Whether the host completed `tid` (after [`Self::pump`]); forgets the completion.
    pub fn completed(&mut self, tid: u64) -> bool {
        self.completions.remove(&tid).is_some()
    }

    /// Takes the data frames received so far, reassembling fragments.
    pub fn frames(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut partial: Option<Frame> = None;
        let mut keep = VecDeque::new();
        while let Some(m) = self.inbox.pop_front() {
            if u32_at(&m.bytes, 0) != rmsg::PACKET {
                keep.push_back(m);
                continue;
            }
            let p = crate::rndis::parse_packet(&m.bytes).expect("host packet well formed");
            let data = &m.bytes[p.data.clone()];
            let (csum, frag) = packet_infos(&m.bytes);
            match frag {
                None => out.push(Frame {
                    data: data.to_vec(),
                    csum,
                    fragments: 1,
                }),
                Some(f) => {
                    if f & r::pktinfo::FIRST_FRAGMENT != 0 {
                        partial = Some(Frame {
                            data: Vec::new(),
                            csum,
                            fragments: 0,
                        });
                    }
                    let fr = partial.as_mut().expect("first fragment first");
                    fr.data.extend_from_slice(data);
                    fr.fragments += 1;
                    if f & r::pktinfo::LAST_FRAGMENT != 0 {
                        out.push(partial.take().expect("some"));
                    }
                }
            }
        }
        self.inbox = keep;
        out
    }

    /// Waits until `n` frames arrived; returns them.
    pub fn wait_frames(&mut self, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        self.wait_until(|s| {
            got.extend(s.frames());
            got.len() >= n
        });
        got
    }
}

/// What the bring-up learned.
#[derive(Debug, Clone)]
pub struct BringUp {
    pub mtu: u32,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub offload: r::Offload,
    pub link_speed: Option<u32>,
    pub rss_queues: Option<u32>,
}

fn packet_infos(m: &[u8]) -> (Option<u32>, Option<u8>) {
    let p = r::Packet::read_from_prefix(&m[8..]).expect("size").0;
    let (mut csum, mut frag) = (None, None);
    let mut at = 8 + p.ppi_offset as usize;
    let end = at + p.ppi_len as usize;
    while at + 12 <= end {
        let e = r::PerPacketInfo::read_from_prefix(&m[at..])
            .expect("size")
            .0;
        let v = at + e.offset as usize;
        let ty = e.ppi_type;
        match ty {
            r::ppi::TCPIP_CHECKSUM => csum = Some(u32_at(m, v)),
            t if t == r::ppi::PKTINFO_ID | r::ppi::INTERNAL => frag = Some(m[v + 1]),
            _ => {}
        }
        at += e.size as usize;
    }
    (csum, frag)
}

/// An RNDIS message of `msg_type` with `parts` after the header.
pub fn rndis_message(msg_type: u32, parts: &[&[u8]]) -> Vec<u8> {
    let len = 8 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&msg_type.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// A data packet with per-packet infos as Linux's netvsc_xmit builds it.
pub fn data_packet(frame: &[u8], ppis: &[(u32, u32)]) -> Vec<u8> {
    let ppi_len = (ppis.len() * 16) as u32;
    let p = r::Packet {
        data_offset: 36 + ppi_len,
        data_len: frame.len() as u32,
        ppi_offset: if ppis.is_empty() { 0 } else { 36 },
        ppi_len,
        ..Default::default()
    };
    let mut infos = Vec::new();
    for &(t, v) in ppis {
        infos.extend_from_slice(
            r::PerPacketInfo {
                size: 16,
                ppi_type: t,
                offset: 12,
            }
            .as_bytes(),
        );
        infos.extend_from_slice(&v.to_le_bytes());
    }
    rndis_message(rmsg::PACKET, &[p.as_bytes(), &infos, frame])
}

/// The little-endian u32 at `at`.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
        .unwrap_or(u32::MAX)
}

fn read_buffer(mem: &GuestMemory, pfns: &[u64], offset: u32, out: &mut [u8]) {
    let mut done = 0;
    while done < out.len() {
        let at = u64::from(offset) + done as u64;
        let n = ((PAGE - at % PAGE) as usize).min(out.len() - done);
        let gpa = pfns[(at / PAGE) as usize] * PAGE + at % PAGE;
        mem.read(gpa, &mut out[done..done + n])
            .expect("receive buffer");
        done += n;
    }
}

fn write_buffer(mem: &GuestMemory, pfns: &[u64], offset: u32, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let at = u64::from(offset) + done as u64;
        let n = ((PAGE - at % PAGE) as usize).min(data.len() - done);
        let gpa = pfns[(at / PAGE) as usize] * PAGE + at % PAGE;
        mem.write(gpa, &data[done..done + n]).expect("send buffer");
        done += n;
    }
}
