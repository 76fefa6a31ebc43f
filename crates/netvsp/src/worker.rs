//! One channel's worker: NVSP messages, RNDIS control, the transmit path from the guest to
//! its backend queue, the receive path from the queue into receive sections.

use crate::buffers::{GuestBuffer, ReceiveBuffer, SendBuffer};
use crate::policy::{self, TxVerdict};
use crate::rndis::{self as rn, Fragment, RX_HEADER_RESERVE};
use crate::stats::{add, bump, QueueCounters};
use crate::vnet::{self, VirtioNetHdr, VNET_HDR_LEN};
use crate::{nvsp, BackendQueue, Shared, LOG};
use hvdef::netvsp::{self as nv, msg, status, MESSAGE_SIZE, NO_SECTION};
use hvdef::rndis::msg as rmsg;
use hvdef::vmbus::{packet_type, XferPageRange, XferPagesHeader, PACKET_FLAG_COMPLETION_REQUESTED};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::{
    BusControl, Channel, ChannelError, ChannelWorker, Gpadls, OpenedChannel, PagedRange, Progress,
    WorkerError,
};
use zerocopy::{FromBytes, IntoBytes};

/// Most ranges in one transfer-page packet (what every NDIS version takes).
const MAX_RANGES: usize = 64;
/// Most frames read from the backend per pass before the guest ring is looked at again.
const RX_BUDGET: usize = 256;
/// Most guest packets handled per pass.
const TX_BUDGET: usize = 512;
/// Completions of data packets written before the interrupt they owe the guest is raised,
/// within a pass or across passes: a guest that streams must see its first completions
/// before its socket's send buffer runs out (it sleeps then).
const TX_COMPLETIONS_PER_INTERRUPT: u32 = 32;
/// Bytes of frames whose completions are raised at once, however few. A TCP segment's
/// completion never waits: a TCP sender keeps only about two segments (or a millisecond
/// of its rate) uncompleted (Linux's TCP small queues) and then waits for them.
const TX_BYTES_PER_INTERRUPT: u64 = 16 << 10;
/// How long the interrupt owed for data-packet completions alone may wait for more of
/// them. Nothing else waits: a receive batch, a control answer or any other completion
/// raises it at once and carries the waiting completions with it.
const TX_COMPLETION_DELAY: Duration = Duration::from_millis(1);
/// Largest RNDIS payload of one guest packet (a 64 KiB LSO frame and its headers).
const MAX_TX_BYTES: usize = 128 << 10;
/// RNDIS control answers waiting for a free section before more are refused.
const MAX_PENDING_CONTROL: usize = 64;

enum Out {
    Completion {
        tid: u64,
        msg: [u8; MESSAGE_SIZE],
    },
    Xfer {
        header: Vec<u8>,
        channel_type: u32,
        sections: Vec<u32>,
    },
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    index: u16,
    gpadls: Gpadls,
    bus: Arc<dyn BusControl>,
    queue: Option<Box<dyn BackendQueue>>,
    generation: u64,
    recv: Option<Arc<ReceiveBuffer>>,
    send: Option<Arc<SendBuffer>>,
    /// Receive sections this worker owns and may fill.
    free: Vec<u32>,
    /// Transfer-page packets the guest has not completed: transaction id → sections (kept
    /// in [`Shared`]'s `held` between passes, see [`crate::held`]).
    inflight: crate::held::Held,
    next_tid: u64,
    next_packet_id: u16,
    pending_control: VecDeque<Vec<u8>>,
    out: VecDeque<Out>,
    ring_buf: Vec<u8>,
    tx: Vec<u8>,
    pieces: Vec<(u64, usize)>,
    /// Data-packet completions written since the guest was last interrupted, and the bytes
    /// of the frames they carried.
    tx_unsignalled: u32,
    tx_unsignalled_bytes: u64,
    /// This pass sent the guest something that must not wait (see [`TX_COMPLETION_DELAY`]).
    urgent: bool,
    /// When the interrupt held for data-packet completions must be raised.
    signal_due: Option<Instant>,
    /// The backend may have frames: it was readable at the wait before this pass, or no
    /// wait came between (the loop went on at once), or the last read stopped before
    /// finding it empty. False saves a read that would find nothing.
    backend_ready: bool,
    /// A wait came before this pass (and told [`ChannelWorker::woken`] what was readable).
    waited: bool,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut q) = self.queue.take() {
            let _ = q.set_enabled(false);
            if let Some(slot) = support::lock(&self.shared.queues).get_mut(usize::from(self.index))
            {
                *slot = Some(q);
            }
        }
    }
}

fn xfer_header(id: u16, ranges: &[XferPageRange]) -> Vec<u8> {
    let mut h = XferPagesHeader {
        xfer_pageset_id: id,
        sender_owns_set: 0,
        reserved: 0,
        range_count: ranges.len() as u32,
    }
    .as_bytes()
    .to_vec();
    for r in ranges {
        h.extend_from_slice(r.as_bytes());
    }
    h
}

impl Worker {
    pub fn new(shared: Arc<Shared>, ch: OpenedChannel, queue: Box<dyn BackendQueue>) -> Self {
        Self {
            shared,
            index: ch.index,
            gpadls: ch.gpadls,
            bus: ch.bus,
            queue: Some(queue),
            generation: u64::MAX,
            recv: None,
            send: None,
            free: Vec::new(),
            inflight: Default::default(),
            next_tid: 1,
            next_packet_id: 0,
            pending_control: VecDeque::new(),
            out: VecDeque::new(),
            ring_buf: Vec::new(),
            tx: Vec::new(),
            pieces: Vec::new(),
            tx_unsignalled: 0,
            tx_unsignalled_bytes: 0,
            urgent: false,
            signal_due: None,
            backend_ready: true,
            waited: false,
        }
    }

    fn counters(&self) -> &QueueCounters {
        &self.shared.counters[usize::from(self.index)]
    }

    /// Picks up buffers given, revoked or restored since the last pass (an atomic load when
    /// nothing changed).
    fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.generation = g;
            let restored_free = if self.index == 0 {
                self.remap_restored()
            } else {
                None
            };
            let c = support::lock(&self.shared.control);
            let same = match (&self.recv, &c.recv) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                // Sections of a buffer revoked or replaced mean nothing now; a worker that had
                // no buffer keeps what a restore (or the primary's handover) gave it.
                if self.recv.is_some() {
                    self.free.clear();
                    self.inflight.clear();
                }
                self.pending_control.clear();
                self.out.retain(|o| matches!(o, Out::Completion { .. }));
                if self.index == 0 {
                    if let Some(r) = &c.recv {
                        self.free =
                            restored_free.unwrap_or_else(|| (0..r.sections).rev().collect());
                    }
                }
            }
            self.recv = c.recv.clone();
            self.send = c.send.clone();
        }
        let i = usize::from(self.index);
        if self.index > 0 && self.shared.handover_pending[i].swap(false, Ordering::AcqRel) {
            let mut h = support::lock(&self.shared.handover);
            self.free.append(&mut h[i]);
        }
    }

    /// After a restore, maps the saved buffer GPADLs again (the bus restored them) and
    /// shares the sections no channel's guest holds out to the subchannels; returns the
    /// primary's share.
    fn remap_restored(&mut self) -> Option<Vec<u32>> {
        let mut c = support::lock(&self.shared.control);
        let crate::Restored {
            receive_buffer: rb,
            send_buffer: sb,
            held,
            ..
        } = c.restored.take()?;
        let mem = &self.shared.mem;
        if let Some((gpadl, id)) = rb {
            c.recv = self
                .gpadls
                .get(gpadl)
                .and_then(|r| GuestBuffer::new(mem, gpadl, id, &r).ok())
                .and_then(|b| ReceiveBuffer::new(b, self.shared.config.mtu).ok())
                .map(Arc::new);
        }
        if let Some((gpadl, id)) = sb {
            c.send = self
                .gpadls
                .get(gpadl)
                .and_then(|r| GuestBuffer::new(mem, gpadl, id, &r).ok())
                .and_then(|b| SendBuffer::new(b).ok())
                .map(Arc::new);
        }
        // Every worker picks the buffers up.
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let r = c.recv.clone()?;
        let held: std::collections::HashSet<u32> = held.into_iter().collect();
        let mut all: Vec<u32> = (0..r.sections)
            .rev()
            .filter(|s| !held.contains(s))
            .collect();
        let queues = usize::from(c.subchannels) + 1;
        let share = all.len() / queues;
        let mut h = support::lock(&self.shared.handover);
        for j in 1..queues.min(h.len()) {
            let at = all.len().saturating_sub(share);
            h[j] = all.split_off(at);
            self.shared.handover_pending[j].store(true, Ordering::Release);
        }
        Some(all)
    }

    fn flush_out(&mut self, ch: &mut Channel) -> Result<bool, WorkerError> {
        while let Some(o) = self.out.front() {
            let r = match o {
                Out::Completion { tid, msg } => ch.send_completion(*tid, msg),
                Out::Xfer {
                    header,
                    channel_type,
                    ..
                } => {
                    let m = nvsp::message(
                        msg::SEND_RNDIS_PACKET,
                        &nv::RndisPacket {
                            channel_type: *channel_type,
                            section_index: NO_SECTION,
                            section_size: 0,
                        },
                    );
                    ch.try_send(
                        packet_type::DATA_USING_XFER_PAGES,
                        PACKET_FLAG_COMPLETION_REQUESTED,
                        self.next_tid,
                        header,
                        &m,
                    )
                }
            };
            match r {
                Ok(()) => {
                    if let Some(Out::Xfer { sections, .. }) = self.out.pop_front() {
                        self.urgent = true;
                        self.inflight.insert(self.next_tid, sections);
                        bump(&self.counters().rx_batches);
                        // Past the ids the guest still holds (a restored state's included).
                        loop {
                            self.next_tid = self.next_tid.wrapping_add(1).max(1);
                            if !self.inflight.contains_key(&self.next_tid) {
                                break;
                            }
                        }
                    }
                }
                Err(ChannelError::Full) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Queues a completion that must reach the guest at once.
    fn complete(&mut self, tid: u64, msg: [u8; MESSAGE_SIZE]) {
        self.urgent = true;
        self.out.push_back(Out::Completion { tid, msg });
    }

    /// Queues the completion of a data packet, whose interrupt may wait a little.
    fn complete_data(&mut self, tid: u64, msg: [u8; MESSAGE_SIZE]) {
        self.tx_unsignalled += 1;
        self.out.push_back(Out::Completion { tid, msg });
    }

    /// One guest packet.
    fn handle_packet(
        &mut self,
        ptype: u16,
        tid: u64,
        completion_requested: bool,
        payload: &[u8],
        ranges: Option<Result<Vec<PagedRange>, vmbus::packet::PacketError>>,
    ) {
        if ptype == packet_type::COMPLETION {
            if let Ok(nvsp::Request::RndisPacketComplete { .. }) = nvsp::parse(payload) {
                if let Some(s) = self.inflight.remove(&tid) {
                    // A restored section past a buffer mapped smaller is dropped.
                    let n = self.recv.as_ref().map_or(0, |r| r.sections);
                    self.free.extend(s.into_iter().filter(|&i| i < n));
                    return;
                }
            }
            bump(&self.counters().drop_malformed);
            support::limited!(
                LOG,
                warn,
                tid,
                "netvsp: completion for nothing the host sent"
            );
            return;
        }
        if ptype != packet_type::DATA_INBAND && ptype != packet_type::DATA_USING_GPA_DIRECT {
            bump(&self.counters().drop_malformed);
            if completion_requested {
                self.complete(tid, nvsp::failure(0));
            }
            return;
        }
        let req = match nvsp::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                bump(&self.counters().drop_malformed);
                support::limited!(LOG, warn, error = %e, "netvsp: bad NVSP message");
                if completion_requested {
                    self.complete(tid, nvsp::failure(e.msg_type()));
                }
                return;
            }
        };
        let reply = match req {
            nvsp::Request::RndisPacket(p) => {
                let ranges = match ranges {
                    None => Ok(Vec::new()),
                    Some(r) => r.map_err(|_| ()),
                };
                let st = self.rndis_packet(p, ranges);
                if completion_requested && p.channel_type == nv::CHANNEL_TYPE_DATA {
                    self.complete_data(tid, nvsp::rndis_complete(st));
                    return;
                }
                Some(nvsp::rndis_complete(st))
            }
            r if self.index != 0 => {
                bump(&self.counters().drop_malformed);
                support::limited!(LOG, warn, request = ?r, "netvsp: control message on a subchannel");
                completion_requested.then(|| nvsp::failure(payload_type(payload)))
            }
            r => self.control(r, completion_requested),
        };
        if let Some(m) = reply {
            if completion_requested {
                self.complete(tid, m);
            }
        }
    }

    /// NVSP control messages (primary channel only).
    fn control(
        &mut self,
        req: nvsp::Request,
        completion_requested: bool,
    ) -> Option<[u8; MESSAGE_SIZE]> {
        let shared = self.shared.clone();
        let mut c = support::lock(&shared.control);
        match req {
            nvsp::Request::Init { min, max } => {
                let v = nvsp::negotiate(min, max);
                if v.is_some() {
                    c.nvsp = crate::NvspState {
                        version: v,
                        ..Default::default()
                    };
                }
                Some(nvsp::init_complete(v))
            }
            nvsp::Request::NdisVersion { major, minor } => {
                c.nvsp.ndis_version = Some((major, minor));
                None
            }
            nvsp::Request::NdisConfig { mtu, capabilities } => {
                c.nvsp.guest_mtu = Some(mtu);
                c.nvsp.capabilities = capabilities;
                None
            }
            nvsp::Request::ReceiveBuffer { gpadl, id } => {
                let fail = nvsp::message(
                    msg::SEND_RECEIVE_BUFFER_COMPLETE,
                    &nv::ReceiveBufferComplete {
                        status: status::FAIL,
                        ..Default::default()
                    },
                );
                if c.nvsp.version.is_none() || c.recv.is_some() {
                    bump(&self.counters().drop_malformed);
                    return Some(fail);
                }
                let r = self
                    .gpadls
                    .get(gpadl)
                    .ok_or(crate::buffers::BufferError::NoGpadl(gpadl))
                    .and_then(|r| GuestBuffer::new(&shared.mem, gpadl, id, &r))
                    .and_then(|b| ReceiveBuffer::new(b, shared.config.mtu));
                match r {
                    Ok(r) => {
                        let done = nv::ReceiveBufferComplete {
                            status: status::SUCCESS,
                            num_sections: 1,
                            section: nv::ReceiveSection {
                                offset: 0,
                                sub_alloc_size: r.section_size,
                                num_sub_allocs: r.sections,
                                end_offset: r.sections * r.section_size,
                            },
                        };
                        c.recv = Some(Arc::new(r));
                        shared.generation.fetch_add(1, Ordering::AcqRel);
                        Some(nvsp::message(msg::SEND_RECEIVE_BUFFER_COMPLETE, &done))
                    }
                    Err(e) => {
                        bump(&self.counters().drop_malformed);
                        support::limited!(LOG, warn, error = %e, "netvsp: receive buffer refused");
                        Some(fail)
                    }
                }
            }
            nvsp::Request::SendBuffer { gpadl, id } => {
                let reply = |st, size| {
                    nvsp::message(
                        msg::SEND_SEND_BUFFER_COMPLETE,
                        &nv::SendBufferComplete {
                            status: st,
                            section_size: size,
                        },
                    )
                };
                if c.nvsp.version.is_none() || c.send.is_some() {
                    bump(&self.counters().drop_malformed);
                    return Some(reply(status::FAIL, 0));
                }
                let r = self
                    .gpadls
                    .get(gpadl)
                    .ok_or(crate::buffers::BufferError::NoGpadl(gpadl))
                    .and_then(|r| GuestBuffer::new(&shared.mem, gpadl, id, &r))
                    .and_then(SendBuffer::new);
                match r {
                    Ok(s) => {
                        let size = s.section_size;
                        c.send = Some(Arc::new(s));
                        shared.generation.fetch_add(1, Ordering::AcqRel);
                        Some(reply(status::SUCCESS, size))
                    }
                    Err(e) => {
                        bump(&self.counters().drop_malformed);
                        support::limited!(LOG, warn, error = %e, "netvsp: send buffer refused");
                        Some(reply(status::FAIL, 0))
                    }
                }
            }
            nvsp::Request::RevokeReceiveBuffer { .. } => {
                c.recv = None;
                shared.rndis_ready.store(false, Ordering::Release);
                shared.generation.fetch_add(1, Ordering::AcqRel);
                completion_requested
                    .then(|| nvsp::message(msg::REVOKE_RECEIVE_BUFFER, &status::SUCCESS))
            }
            nvsp::Request::RevokeSendBuffer { .. } => {
                c.send = None;
                shared.generation.fetch_add(1, Ordering::AcqRel);
                completion_requested
                    .then(|| nvsp::message(msg::REVOKE_SEND_BUFFER, &status::SUCCESS))
            }
            nvsp::Request::Subchannel { op, count } => {
                let fail = nvsp::message(
                    msg::SUBCHANNEL,
                    &nv::SubchannelComplete {
                        status: status::FAIL,
                        count: 0,
                    },
                );
                let v5 = c
                    .nvsp
                    .version
                    .is_some_and(|v| v >= hvdef::netvsp::version::V5);
                if !v5 || op != nv::SUBCHANNEL_ALLOCATE || count == 0 || c.recv.is_none() {
                    bump(&self.counters().drop_malformed);
                    return Some(fail);
                }
                let max = shared.config.max_queues - 1;
                let want = count.min(u32::from(max)) as u16;
                if want > c.subchannels {
                    let added = self.bus.add_subchannels(want - c.subchannels);
                    c.subchannels += added;
                }
                let granted = want.min(c.subchannels);
                drop(c);
                self.share_sections(granted);
                Some(nvsp::message(
                    msg::SUBCHANNEL,
                    &nv::SubchannelComplete {
                        status: status::SUCCESS,
                        count: u32::from(granted),
                    },
                ))
            }
            nvsp::Request::SwitchDataPath { .. } => {
                completion_requested.then(|| nvsp::message(msg::SWITCH_DATA_PATH, &status::SUCCESS))
            }
            nvsp::Request::RndisPacket(_) | nvsp::Request::RndisPacketComplete { .. } => {
                Some(nvsp::failure(msg::SEND_RNDIS_PACKET))
            }
        }
    }

    /// Gives each of `subchannels` queues an equal share of the primary's free sections.
    fn share_sections(&mut self, subchannels: u16) {
        let Some(r) = self
            .recv
            .clone()
            .or_else(|| support::lock(&self.shared.control).recv.clone())
        else {
            return;
        };
        let queues = usize::from(subchannels) + 1;
        let share = r.sections as usize / queues;
        let mut h = support::lock(&self.shared.handover);
        for j in 1..queues {
            let n = share.min(self.free.len());
            let at = self.free.len() - n;
            let mut give = self.free.split_off(at);
            h[j].append(&mut give);
            self.shared.handover_pending[j].store(true, Ordering::Release);
        }
    }

    /// A guest SEND_RNDIS_PACKET: gathers its bytes (send section and/or GPA_DIRECT pages),
    /// then handles each RNDIS message in it. Returns the completion status.
    fn rndis_packet(&mut self, p: nv::RndisPacket, ranges: Result<Vec<PagedRange>, ()>) -> u32 {
        let shared = self.shared.clone();
        let mem = &shared.mem;
        self.tx.clear();
        let Ok(ranges) = ranges else {
            bump(&self.counters().drop_malformed);
            return status::FAIL;
        };
        if p.section_index != NO_SECTION {
            let Some(s) = &self.send else {
                bump(&self.counters().drop_malformed);
                return status::FAIL;
            };
            if p.section_index >= s.sections || p.section_size > s.section_size {
                bump(&self.counters().drop_malformed);
                let (index, size) = (p.section_index, p.section_size);
                support::limited!(LOG, warn, index, size, "netvsp: send section out of range");
                return status::FAIL;
            }
            let off = p.section_index * s.section_size;
            if !s.buf.read(mem, off, p.section_size, &mut self.tx) {
                bump(&self.counters().drop_malformed);
                return status::FAIL;
            }
        }
        for r in &ranges {
            let mut left = r.byte_count as usize;
            let mut off = u64::from(r.byte_offset);
            for &pfn in &r.pfns {
                if left == 0 {
                    break;
                }
                let n = (4096 - off as usize).min(left);
                let gpa = pfn.checked_mul(4096).and_then(|g| g.checked_add(off));
                let at = self.tx.len();
                if at + n > MAX_TX_BYTES {
                    bump(&self.counters().drop_malformed);
                    return status::FAIL;
                }
                self.tx.resize(at + n, 0);
                if gpa.is_none_or(|g| mem.read(g, &mut self.tx[at..]).is_err()) {
                    bump(&self.counters().drop_malformed);
                    support::limited!(LOG, warn, pfn, "netvsp: GPA range outside guest RAM");
                    return status::FAIL;
                }
                left -= n;
                off = 0;
            }
            if left > 0 {
                bump(&self.counters().drop_malformed);
                return status::FAIL;
            }
        }
        let mut messages = Vec::new();
        let mut st = status::SUCCESS;
        let base = self.tx.as_ptr() as usize;
        for m in rn::split(&self.tx) {
            match m {
                Ok((t, bytes)) => {
                    let start = bytes.as_ptr() as usize - base;
                    messages.push((t, start..start + bytes.len()));
                }
                Err(e) => {
                    bump(&self.counters().drop_malformed);
                    support::limited!(LOG, warn, error = %e, "netvsp: bad RNDIS framing");
                    st = status::INVALID_RNDIS_PACKET;
                }
            }
        }
        if messages.is_empty() && st == status::SUCCESS {
            bump(&self.counters().drop_malformed);
            return status::INVALID_RNDIS_PACKET;
        }
        for (t, range) in messages {
            let ok = if t == rmsg::PACKET {
                self.transmit(range)
            } else {
                self.rndis_control(t, range)
            };
            if !ok {
                st = status::INVALID_RNDIS_PACKET;
            }
        }
        st
    }

    /// One data packet; false if it is malformed.
    fn transmit(&mut self, range: std::ops::Range<usize>) -> bool {
        let shared = self.shared.clone();
        let c = &shared.counters[usize::from(self.index)];
        let pkt = match rn::parse_packet(&self.tx[range.clone()]) {
            Ok(p) => p,
            Err(e) => {
                bump(&c.drop_malformed);
                support::limited!(LOG, warn, error = %e, "netvsp: bad RNDIS packet");
                return false;
            }
        };
        let data = range.start + pkt.data.start..range.start + pkt.data.end;
        if !shared.link_up.load(Ordering::Relaxed) {
            bump(&c.drop_filtered);
            return true;
        }
        match policy::check_tx(
            &self.tx[data.clone()],
            &shared.config.mac,
            &shared.config.policy,
        ) {
            TxVerdict::Pass => {}
            TxVerdict::SpoofedMac => {
                bump(&c.drop_spoofed_mac);
                return true;
            }
            TxVerdict::Guard => {
                bump(&c.drop_guard);
                return true;
            }
            TxVerdict::Malformed => {
                bump(&c.drop_malformed);
                return false;
            }
        }
        let mut tagged;
        let (frame, hdr) = match pkt.offload.vlan {
            Some(v) => match vnet::insert_vlan(&self.tx[data], v) {
                Ok(f) => {
                    tagged = f;
                    let h = vnet::tx_header(&mut tagged, &pkt.offload);
                    (&tagged[..], h)
                }
                Err(e) => (&[][..], Err(e)),
            },
            None => {
                let h = vnet::tx_header(&mut self.tx[data.clone()], &pkt.offload);
                (&self.tx[data], h)
            }
        };
        let hdr = match hdr {
            Ok(h) => h,
            Err(e) => {
                bump(&c.drop_malformed);
                support::limited!(LOG, warn, error = %e, "netvsp: offload request refused");
                return false;
            }
        };
        let len = frame.len() as u64;
        self.tx_unsignalled_bytes += len;
        if vnet::is_tcp(frame) {
            // Linux's TCP small queues let a sender have about two segments outstanding
            // and then wait for their completions: never keep them waiting.
            self.tx_unsignalled_bytes = TX_BYTES_PER_INTERRUPT;
        }
        let Some(q) = self.queue.as_mut() else {
            bump(&c.drop_backend_error);
            return true;
        };
        match q.send(&hdr, frame) {
            Ok(()) => {
                bump(&c.tx_packets);
                add(&c.tx_bytes, len);
            }
            Err(e) => {
                bump(&c.drop_backend_error);
                support::limited!(LOG, warn, error = %e, "netvsp: backend send failed");
            }
        }
        true
    }

    /// One RNDIS control message; false if it has no valid form.
    fn rndis_control(&mut self, t: u32, range: std::ops::Range<usize>) -> bool {
        let shared = self.shared.clone();
        let mut c = support::lock(&shared.control);
        let info = shared.nic_info(c.nvsp.version.unwrap_or(0));
        let r = rn::control(&mut c.rndis, &info, t, &self.tx[range]);
        let ready = c.rndis.initialized && c.recv.is_some();
        shared
            .packet_filter
            .store(c.rndis.packet_filter, Ordering::Relaxed);
        shared.rndis_ready.store(ready, Ordering::Release);
        drop(c);
        bump(&self.counters().control_requests);
        match r {
            Ok(o) => {
                if t == rmsg::INIT {
                    let up = shared.link_up.load(Ordering::Relaxed);
                    shared
                        .link_reported
                        .store(if up { 2 } else { 1 }, Ordering::Relaxed);
                }
                if let Some(resp) = o.response {
                    if self.pending_control.len() < MAX_PENDING_CONTROL {
                        self.pending_control.push_back(resp);
                    } else {
                        support::limited!(
                            LOG,
                            warn,
                            "netvsp: RNDIS answers pile up; the guest returns no receive sections"
                        );
                    }
                }
                true
            }
            Err(e) => {
                bump(&self.counters().drop_malformed);
                support::limited!(LOG, warn, error = %e, "netvsp: bad RNDIS control message");
                false
            }
        }
    }

    /// Puts waiting RNDIS answers and link indications into sections, one packet.
    fn send_control(&mut self) {
        if self.index == 0 && self.shared.rndis_ready.load(Ordering::Acquire) {
            let up = self.shared.link_up.load(Ordering::Relaxed);
            let want = if up { 2 } else { 1 };
            if self.shared.link_reported.swap(want, Ordering::Relaxed) != want {
                let code = if up {
                    hvdef::rndis::status::MEDIA_CONNECT
                } else {
                    hvdef::rndis::status::MEDIA_DISCONNECT
                };
                self.pending_control.push_back(rn::indicate_status(code));
            }
        }
        let Some(r) = self.recv.clone() else {
            return;
        };
        let mut ranges = Vec::new();
        let mut sections = Vec::new();
        while ranges.len() < MAX_RANGES {
            let Some(m) = self.pending_control.front() else {
                break;
            };
            if m.len() > r.section_size as usize {
                self.pending_control.pop_front();
                continue;
            }
            let Some(s) = self.free.pop() else {
                break;
            };
            let off = r.offset(s);
            if !r.buf.write(&self.shared.mem, off, m) {
                self.free.push(s);
                break;
            }
            ranges.push(XferPageRange {
                byte_count: m.len() as u32,
                byte_offset: off,
            });
            sections.push(s);
            self.pending_control.pop_front();
        }
        if !ranges.is_empty() {
            self.out.push_back(Out::Xfer {
                header: xfer_header(r.buf.id, &ranges),
                channel_type: nv::CHANNEL_TYPE_CONTROL,
                sections,
            });
        }
    }

    /// Drops up to a budget of waiting frames, counting them with `counter`.
    fn discard(&mut self, why: fn(&QueueCounters) -> &std::sync::atomic::AtomicU64) {
        let shared = self.shared.clone();
        let c = &shared.counters[usize::from(self.index)];
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        for _ in 0..RX_BUDGET {
            match q.discard() {
                Ok(true) => bump(why(c)),
                Ok(false) => {
                    self.backend_ready = false;
                    break;
                }
                Err(e) => {
                    bump(&c.drop_backend_error);
                    support::limited!(LOG, warn, error = %e, "netvsp: backend receive failed");
                    break;
                }
            }
        }
    }

    /// Moves frames from the backend into receive sections, one transfer-page packet per
    /// pass.
    fn receive(&mut self) {
        if !self.backend_ready {
            return;
        }
        let shared = self.shared.clone();
        let ready = shared.rndis_ready.load(Ordering::Acquire)
            && shared.link_up.load(Ordering::Relaxed)
            && shared.packet_filter.load(Ordering::Relaxed) != 0;
        let Some(r) = self.recv.clone().filter(|_| ready) else {
            self.discard(|c| &c.drop_filtered);
            return;
        };
        let c = &shared.counters[usize::from(self.index)];
        let mem = &shared.mem;
        let per = r.data_per_section() as usize;
        let Some(max_frame) = self.queue.as_ref().map(|q| q.max_frame()) else {
            return;
        };
        let need = max_frame.div_ceil(per).max(1);
        let mut ranges: Vec<XferPageRange> = Vec::new();
        let mut sections = Vec::new();
        let filter = shared.packet_filter.load(Ordering::Relaxed);
        for _ in 0..RX_BUDGET {
            if ranges.len() + need.min(MAX_RANGES) > MAX_RANGES {
                break;
            }
            let k = need.min(self.free.len()).min(MAX_RANGES - ranges.len());
            if k == 0 {
                self.discard(|c| &c.drop_no_receive_section);
                break;
            }
            let take_at = self.free.len() - k;
            let mut got: Vec<u32> = self.free.split_off(take_at);
            self.pieces.clear();
            for &s in &got {
                let off = r.offset(s) + RX_HEADER_RESERVE as u32;
                r.buf.pieces(off, per as u32, &mut self.pieces);
            }
            let mut hdr = [0u8; VNET_HDR_LEN];
            let Some(q) = self.queue.as_mut() else {
                self.free.append(&mut got);
                break;
            };
            let n = match q.recv(mem, &mut hdr, &self.pieces) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    self.free.append(&mut got);
                    self.backend_ready = false;
                    break;
                }
                Err(e) => {
                    self.free.append(&mut got);
                    bump(&c.drop_backend_error);
                    support::limited!(LOG, warn, error = %e, "netvsp: backend receive failed");
                    break;
                }
            };
            let capacity = k * per;
            if n >= capacity && capacity < max_frame {
                // Cut short: the frame needed more sections than were free.
                self.free.append(&mut got);
                bump(&c.drop_no_receive_section);
                continue;
            }
            let used = n.div_ceil(per);
            if n < 14 || used == 0 {
                self.free.append(&mut got);
                bump(&c.drop_malformed);
                continue;
            }
            let mut dst = [0u8; 6];
            let first = r.offset(got[0]) + RX_HEADER_RESERVE as u32;
            let mut head = Vec::with_capacity(6);
            if !r.buf.read(mem, first, 6, &mut head) {
                self.free.append(&mut got);
                continue;
            }
            dst.copy_from_slice(&head);
            if !policy::rx_accepts(&dst, &shared.config.mac, filter) {
                self.free.append(&mut got);
                bump(&c.drop_filtered);
                continue;
            }
            let vh = VirtioNetHdr::read_from_bytes(&hdr).unwrap_or_default();
            if let Some((start, field)) = vnet::udp_checksum_to_fill(&vh).filter(|_| used == 1) {
                // One section holds the whole datagram: fill its checksum in place.
                let mut frame = Vec::with_capacity(n);
                if r.buf.read(mem, first, n as u32, &mut frame)
                    && vnet::fill_checksum(&mut frame, start, field)
                {
                    r.buf
                        .write(mem, first + field as u32, &frame[field..field + 2]);
                }
            }
            let csum = vnet::rx_checksum_info(&vh);
            let packet_id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            let mut header = [0u8; RX_HEADER_RESERVE];
            for (i, &s) in got[..used].iter().enumerate() {
                let chunk = (n - i * per).min(per) as u32;
                let frag = (used > 1).then_some(Fragment {
                    packet_id,
                    first: i == 0,
                    last: i + 1 == used,
                });
                let len = rn::rx_packet_header(&mut header, chunk, csum, frag);
                let off = r.offset(s);
                r.buf.write(mem, off, &header);
                ranges.push(XferPageRange {
                    byte_count: len,
                    byte_offset: off,
                });
            }
            self.free.extend_from_slice(&got[used..]);
            got.truncate(used);
            sections.append(&mut got);
            bump(&c.rx_packets);
            add(&c.rx_bytes, n as u64);
        }
        if !ranges.is_empty() {
            self.out.push_back(Out::Xfer {
                header: xfer_header(r.buf.id, &ranges),
                channel_type: nv::CHANNEL_TYPE_DATA,
                sections,
            });
        }
    }
}

fn payload_type(p: &[u8]) -> u32 {
    nv::Header::read_from_prefix(p)
        .map(|(h, _)| h.msg_type)
        .unwrap_or(0)
}

impl Worker {
    /// One pass: the guest's packets up to a budget, control answers, one receive batch.
    fn pass(&mut self, ch: &mut Channel) -> Result<Progress, WorkerError> {
        if self.index == 0 {
            self.shared.link_bell.clear();
        }
        self.refresh();
        if !self.flush_out(ch)? {
            return Ok(Progress::WaitingForRoom);
        }
        let mut buf = std::mem::take(&mut self.ring_buf);
        let mut result = Ok(());
        for _ in 0..TX_BUDGET {
            // A buffer given by the previous packet is used by the next one.
            self.refresh();
            let p = match ch.try_recv(&mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let ptype = p.packet_type();
            let ranges =
                (ptype == packet_type::DATA_USING_GPA_DIRECT).then(|| p.gpa_direct_ranges());
            let (tid, cr) = (p.transaction_id(), p.completion_requested());
            let payload = p.payload().to_vec();
            self.handle_packet(ptype, tid, cr, &payload, ranges);
            if !self.out.is_empty() && !self.flush_out(ch)? {
                break;
            }
            if self.tx_completions_due() {
                ch.flush_signals();
                self.tx_unsignalled = 0;
                self.tx_unsignalled_bytes = 0;
            }
        }
        self.ring_buf = buf;
        result?;
        self.refresh();
        self.send_control();
        if self.out.is_empty() {
            self.receive();
        }
        Ok(if self.flush_out(ch)? {
            Progress::Idle
        } else {
            Progress::WaitingForRoom
        })
    }
}

impl Worker {
    /// Whether the data-packet completions written carry enough (frames or bytes) to be
    /// announced now.
    fn tx_completions_due(&self) -> bool {
        self.tx_unsignalled >= TX_COMPLETIONS_PER_INTERRUPT
            || self.tx_unsignalled_bytes >= TX_BYTES_PER_INTERRUPT
    }

    /// Whether a wait includes the backend's descriptor (not while answers wait for room:
    /// frames would only pile up behind them).
    fn polls_backend(&self) -> bool {
        self.out.is_empty() && self.queue.is_some()
    }

    /// Raises the interrupt held back, if one is owed, and counts the pass's interrupts
    /// (those sent since `before`).
    fn raise_held(&mut self, ch: &mut Channel, before: u64) {
        ch.release_signals();
        self.tx_unsignalled = 0;
        self.tx_unsignalled_bytes = 0;
        self.signal_due = None;
        add(
            &self.counters().guest_interrupts,
            ch.signals_sent() - before,
        );
    }
}

impl ChannelWorker for Worker {
    /// One pass, its interrupts to the guest held back and raised once at its end: the
    /// pass's send completions and its receive batch cost the guest one interrupt.
    /// A channel taken over after a restore may owe the guest the interrupt for packets in
    /// its ring (one this worker's predecessor held back): raise it.
    fn start(&mut self, ch: &mut Channel) -> Result<(), WorkerError> {
        Ok(ch.signal_if_unread()?)
    }

    fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Progress, WorkerError> {
        let shared = self.shared.clone();
        let i = usize::from(self.index);
        shared.resume_bells[i].clear();
        let before = ch.signals_sent();
        // The whole pass under the channel's held lock, and none while paused (see
        // `crate::held`).
        let mut held = support::lock(&shared.held[i]);
        if shared.paused.load(Ordering::SeqCst) {
            // An interrupt held back goes out now: the guest may be saved next.
            self.raise_held(ch, before);
            // Not Idle: packets left in the ring would have the worker called again at once.
            return Ok(Progress::WaitingForRoom);
        }
        self.inflight = std::mem::take(&mut *held);
        self.urgent = false;
        if !std::mem::take(&mut self.waited) {
            self.backend_ready = true;
        }
        ch.hold_signals();
        let r = self.pass(ch);
        *held = std::mem::take(&mut self.inflight);
        drop(held);
        // Completions of data packets alone may wait for more (one interrupt for many) while
        // the guest keeps the ring busy; anything else, a full ring or the deadline raises
        // the interrupt now.
        let wait = matches!(r, Ok(Progress::Idle))
            && !self.urgent
            && !self.tx_completions_due()
            && ch.signal_held()
            && *self.signal_due.get_or_insert(now + TX_COMPLETION_DELAY) > now;
        if wait {
            add(
                &self.counters().guest_interrupts,
                ch.signals_sent() - before,
            );
        } else {
            self.raise_held(ch, before);
        }
        r
    }

    fn deadline(&self) -> Option<Instant> {
        self.signal_due
    }

    fn woken(&mut self, readable: &[bool]) {
        // The backend's descriptor comes first when it was waited on. A pause that began
        // since `fds` only costs one read that finds nothing.
        self.waited = true;
        if !self.polls_backend() || readable.first() == Some(&true) {
            self.backend_ready = true;
        }
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let resume = self.shared.resume_bells[usize::from(self.index)].as_fd();
        if self.shared.paused.load(Ordering::SeqCst) {
            // Nothing else is handled until resume (the backend's fd would stay readable).
            return vec![resume];
        }
        let mut v = Vec::with_capacity(3);
        if self.polls_backend() {
            if let Some(q) = &self.queue {
                v.push(q.rx_fd());
            }
        }
        if self.index == 0 {
            v.push(self.shared.link_bell.as_fd());
        }
        v.push(resume);
        v
    }
}
