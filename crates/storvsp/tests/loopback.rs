//! storvsp against a guest that plays Linux's storvsc: the real VMBus host (control thread,
//! one worker thread per channel) and guest threads over `vmbus::testing`, with disks on
//! real files (raw and dynamic VHDX).

mod common;

use common::*;
use guestmem::GuestMemory;
use hvdef::storvsp::{self as sp, operation, VstorPacket};
use hvdef::vmbus::packet_type;
use std::time::{Duration, Instant};
use storvsp::{ControllerConfig, DiskSpec, StorvspDevice};
use vmbus::{Device, PagedRange};
use zerocopy::{FromBytes, IntoBytes};

#[test]
fn handshake_for_each_linux_version_with_exact_completions() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 1 << 20);
    for v in storvsp::protocol::VERSIONS {
        let mut r = rig(vec![(0, DiskSpec::open(&path, None, true).unwrap())], 0);
        let mut g = r.open(0, 32);
        // Newer (10.0, proposed by later kernels) and unknown versions first: each declined
        // with a non-zero status, so Linux tries the next.
        let (chosen, props) = g.handshake(&[0x0a00, 0x0700, 0x0603, v]);
        assert_eq!(chosen, v);
        assert_eq!({ props.max_transfer_bytes }, storvsp::MAX_TRANSFER_BYTES);
        assert!(props.max_transfer_bytes >= 1 << 20);
        assert_eq!(({ props.max_channel_cnt }, { props.flags }), (0, 0));
        let i = r.dev.inspect();
        assert_eq!(i["protocol_version"], format!("{}.{}", v >> 8, v & 0xff));
        assert_eq!(i["phase"], "ready");
        // INQUIRY works at once.
        let s = g.srb(1, 0, &[0x12, 0, 0, 0, 36, 0], sp::data_in::READ, 36, 0);
        assert_eq!(
            (s.srb_status, s.scsi_status, { s.data_transfer_length }),
            (1, 0, 36)
        );
        r.host.stop();
    }
}

#[test]
fn srb_before_end_init_and_out_of_order_steps_still_complete() {
    let mut r = rig(vec![], 0);
    let mut g = r.open(0, 8);
    let s = g.srb(5, 0, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0);
    assert_eq!(s.srb_status, sp::srb_status::INVALID_REQUEST);
    assert_ne!(
        { g.control(packet(operation::END_INITIALIZATION)).status },
        0
    );
    assert_ne!({ g.control(packet(operation::QUERY_PROPERTIES)).status }, 0);
    r.host.stop();
}

fn inquiry_capacity_write_read(spec: DiskSpec, size: u64) -> Rig {
    let mut r = rig(vec![(0, spec)], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let s = g.srb(1, 0, &[0x12, 0, 0, 0, 96, 0], sp::data_in::READ, 96, 0);
    assert_eq!((s.srb_status, s.scsi_status), (1, 0));
    let inq = g.read_guest(0, 36);
    assert_eq!(inq[0], 0, "direct-access device");
    assert!(s.data_transfer_length >= 36 && s.data_transfer_length <= 96);
    // READ CAPACITY(16).
    let s = g.srb(
        2,
        0,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        sp::data_in::READ,
        32,
        8,
    );
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 32));
    let cap = g.read_guest(8, 32);
    assert_eq!(
        u64::from_be_bytes(cap[..8].try_into().unwrap()),
        size / 512 - 1
    );
    assert_eq!(u32::from_be_bytes(cap[8..12].try_into().unwrap()), 512);
    // WRITE(10) then READ(10) of 64 KiB, buffers starting mid-page (GPA_DIRECT over 17 pages).
    let data = pattern(7, 64 << 10);
    let s = g.write10(3, 0, 100, &data, 512, false);
    assert_eq!(
        (s.srb_status, s.scsi_status, { s.data_transfer_length }),
        (1, 0, 64 << 10)
    );
    let (s, back) = g.read10(4, 0, 100, 128, 1000);
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 64 << 10));
    assert!(back == data, "read back differs");
    // A FUA write is flushed before it completes; SYNCHRONIZE CACHE(10) succeeds.
    let s = g.write10(5, 0, 7, &pattern(9, 4096), 0, true);
    assert_eq!(s.srb_status, 1);
    assert_eq!(r.dev.inspect()["counters"]["flushes"], 1);
    let s = g.srb(
        6,
        0,
        &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sp::data_in::UNKNOWN,
        0,
        0,
    );
    assert_eq!(s.srb_status, 1);
    // A 1 MiB read (the maximum) in one command.
    let (s, _) = g.read10(7, 0, 0, 2048, 0);
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 1 << 20));
    // Measure-VM's disk bytes: every byte the guest got or gave, the INQUIRY (36) and READ
    // CAPACITY (32) answers included.
    assert_eq!(
        r.dev.io_bytes(),
        ((64 << 10) + (1 << 20) + 36 + 32, (64 << 10) + 4096)
    );
    r.host.stop();
    r
}

#[test]
fn raw_file_inquiry_capacity_and_gpa_direct_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 << 20;
    let path = raw_disk(dir.path(), "raw.img", size);
    let r = inquiry_capacity_write_read(DiskSpec::open(&path, None, false).unwrap(), size);
    drop(r);
    // The bytes are in the file where the guest put them.
    let file = std::fs::read(&path).unwrap();
    assert!(file[100 * 512..100 * 512 + (64 << 10)] == pattern(7, 64 << 10)[..]);
    assert!(file[7 * 512..8 * 512] == pattern(9, 4096)[..512]);
}

#[test]
fn dynamic_vhdx_round_trip_and_the_image_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 << 20;
    let path = vhdx_disk(dir.path(), size);
    let spec = DiskSpec::open(&path, None, false).unwrap();
    assert_eq!(spec.format, "VHDX");
    let r = inquiry_capacity_write_read(spec, size);
    // The disk is still open for writing: a second writer is refused, naming the file.
    let e = DiskSpec::open(&path, None, false).unwrap_err().to_string();
    assert!(e.contains("disk.vhdx"), "{e}");
    drop(r);
    let img = vhdx::open::open(&path, true).unwrap();
    assert!(img.check().is_empty(), "{:?}", img.check());
    let mut back = vec![0; 64 << 10];
    vhdx::Disk::read_at(&img, &mut back, 100 * 512).unwrap();
    assert!(back == pattern(7, 64 << 10));
}

#[test]
fn absent_luns_and_targets() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 1 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    // INQUIRY to an absent LUN: peripheral qualifier 3, type 1Fh.
    let s = g.srb(1, 5, &[0x12, 0, 0, 0, 36, 0], sp::data_in::READ, 36, 0);
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 1)[0], 0x7f);
    // Anything else: SRB_STATUS_INVALID_LUN.
    let s = g.srb(2, 5, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0);
    assert_eq!(s.srb_status, sp::srb_status::INVALID_LUN);
    let (s, _) = g.read10(3, 9, 0, 1, 0);
    assert_eq!(
        (s.srb_status, { s.data_transfer_length }),
        (sp::srb_status::INVALID_LUN, 0)
    );
    // Another target id on the same path has no LUNs at all.
    let mut p = g.srb_packet(0, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0);
    let mut srb = p.srb();
    srb.target_id = 1;
    p.set_srb(&srb);
    g.send(4, packet_type::DATA_INBAND, &[], p.as_bytes());
    assert_eq!(
        g.completion(4).srb().srb_status,
        sp::srb_status::INVALID_LUN
    );
    // REPORT LUNS lists LUN 0; an unknown opcode gets ILLEGAL REQUEST sense.
    let s = g.srb(
        5,
        0,
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        sp::data_in::READ,
        64,
        0,
    );
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 4), [0, 0, 0, 8]);
    let s = g.srb(6, 0, &[0xc7, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0);
    assert_eq!((s.srb_status, s.scsi_status), (0x84, 2));
    assert_eq!((s.cdb_or_sense[2] & 0xf, s.cdb_or_sense[12]), (5, 0x20));
    assert_eq!(s.sense_info_length, 18);
    r.host.stop();
}

#[test]
fn hostile_packets_get_error_completions_and_the_channel_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 1 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let read1 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    // A read that claims 512 bytes but carries no buffer (in-band).
    let p = g.srb_packet(0, &read1, sp::data_in::READ, 512);
    g.send(1, packet_type::DATA_INBAND, &[], p.as_bytes());
    assert_eq!(
        g.completion(1).srb().srb_status,
        sp::srb_status::INVALID_REQUEST
    );
    // A GPA_DIRECT range smaller than the SRB claims.
    let p = g.srb_packet(
        0,
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0],
        sp::data_in::READ,
        4096,
    );
    let h = vmbus::packet::gpa_direct_header(&[PagedRange {
        byte_offset: 0,
        byte_count: 512,
        pfns: vec![g.pages[0]],
    }]);
    g.send(2, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
    assert_eq!(
        g.completion(2).srb().srb_status,
        sp::srb_status::INVALID_REQUEST
    );
    // Pages outside guest RAM, for a read and for a write: nothing is written to the disk.
    for (id, pfn, data_in, op) in [
        (3, 1u64 << 40, sp::data_in::READ, 0x28),
        (4, MEM / 4096, sp::data_in::WRITE, 0x2a),
        (5, u64::MAX, sp::data_in::WRITE, 0x2a),
    ] {
        let p = g.srb_packet(0, &[op, 0, 0, 0, 0, 0, 0, 0, 1, 0], data_in, 512);
        let h = vmbus::packet::gpa_direct_header(&[PagedRange {
            byte_offset: 0,
            byte_count: 512,
            pfns: vec![pfn],
        }]);
        g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
        assert_eq!(
            g.completion(id).srb().srb_status,
            sp::srb_status::INVALID_REQUEST
        );
    }
    // A range whose page list is cut short (header claims 2 pages, carries 1).
    let mut h = vmbus::packet::gpa_direct_header(&[PagedRange {
        byte_offset: 0,
        byte_count: 8192,
        pfns: vec![g.pages[0], g.pages[1]],
    }]);
    h.truncate(h.len() - 8);
    let p = g.srb_packet(
        0,
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0],
        sp::data_in::READ,
        8192,
    );
    g.send(6, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
    assert_eq!(
        g.completion(6).srb().srb_status,
        sp::srb_status::INVALID_REQUEST
    );
    // A transfer past the maximum, a CDB length of 0 and of 17, an unknown direction.
    let p = g.srb_packet(
        0,
        &read1,
        sp::data_in::READ,
        storvsp::MAX_TRANSFER_BYTES + 512,
    );
    g.send(7, packet_type::DATA_INBAND, &[], p.as_bytes());
    assert_eq!(
        g.completion(7).srb().srb_status,
        sp::srb_status::INVALID_REQUEST
    );
    for (id, len) in [(8, 0u8), (9, 17)] {
        let mut p = g.srb_packet(0, &[0; 6], sp::data_in::UNKNOWN, 0);
        let mut s = p.srb();
        s.cdb_length = len;
        p.set_srb(&s);
        g.send(id, packet_type::DATA_INBAND, &[], p.as_bytes());
        assert_eq!(
            g.completion(id).srb().srb_status,
            sp::srb_status::INVALID_REQUEST
        );
    }
    let s = g.srb(10, 0, &read1, 7, 512, 0);
    assert_eq!(s.srb_status, sp::srb_status::INVALID_REQUEST);
    // Packets too short to be a vstor_packet, and unknown or host-only operations: a
    // completion with a failure status.
    for (id, bytes) in [
        (11u64, vec![3u8; 20]),
        (12, packet(99).as_bytes().to_vec()),
        (13, packet(operation::ENUMERATE_BUS).as_bytes().to_vec()),
    ] {
        g.send(id, packet_type::DATA_INBAND, &[], &bytes);
        assert_ne!({ g.completion(id).status }, 0);
    }
    // An XFER_PAGES packet (netvsc's kind) asking for a completion gets a refusal.
    let xfer = [0u8; 8];
    g.send(
        15,
        packet_type::DATA_USING_XFER_PAGES,
        &xfer,
        packet(operation::EXECUTE_SRB).as_bytes(),
    );
    assert_ne!({ g.completion(15).status }, 0);
    // The disk is untouched and the channel still works.
    let (s, back) = g.read10(14, 0, 0, 1, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back.iter().all(|&b| b == 0));
    assert!(
        r.dev.inspect()["counters"]["invalid_requests"]
            .as_u64()
            .unwrap()
            >= 12
    );
    r.host.stop();
}

#[test]
fn a_failing_backend_gets_medium_error_completions() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "shrinks.img", 1 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    // The file shrinks under the VM: reads past its new end fail on the host.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let (s, _) = g.read10(1, 0, 100, 8, 0);
    assert_eq!((s.srb_status, s.scsi_status), (0x84, 2));
    assert_eq!(s.cdb_or_sense[2] & 0xf, 3, "MEDIUM ERROR");
    assert_eq!(s.sense_info_length, 18);
    assert_eq!(r.dev.inspect()["counters"]["medium_errors"], 1);
    // Reads the file still has succeed.
    let (s, _) = g.read10(2, 0, 0, 8, 0);
    assert_eq!(s.srb_status, 1);
    r.host.stop();
}

#[test]
fn many_requests_in_flight_with_a_small_ring_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 1 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    // One data page each way: about 50 completions fit.
    let mut g = r.open(0, 1);
    g.handshake(&[0x0602]);
    let n = 40;
    let tur = g.srb_packet(0, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0);
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..5u64 {
        for i in 0..n {
            g.send(
                round * 1000 + i,
                packet_type::DATA_INBAND,
                &[],
                tur.as_bytes(),
            );
        }
        // Read only after everything was sent (the host filled its ring and waited).
        for _ in 0..n {
            let p = g.recv();
            assert_eq!(p.payload.len(), 64);
            assert!(seen.insert(p.transaction_id), "twice: {}", p.transaction_id);
        }
    }
    assert_eq!(seen.len(), 5 * n as usize);
    r.host.stop();
}

#[test]
fn subchannels_are_offered_and_carry_io_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 8 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 2);
    let mut g = r.open(0, 32);
    let (_, props) = g.handshake(&[0x0602]);
    assert_eq!(({ props.max_channel_cnt }, { props.flags }), (2, 1));
    // Linux asks for one per CPU; the controller grants at most its maximum.
    let mut p = packet(operation::CREATE_SUB_CHANNELS);
    p.set_sub_channel_count(3);
    assert_eq!({ g.control(p).status }, 0);
    // drain_messages waits the transport's timeout for more: keep it short here.
    r.client.transport_mut().timeout = Duration::from_millis(20);
    let deadline = Instant::now() + Duration::from_secs(5);
    while r
        .client
        .offers()
        .filter(|o| o.interface_type == sp::INTERFACE)
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no subchannel offers");
        r.client.drain_messages();
        std::thread::sleep(Duration::from_millis(10));
    }
    r.client.transport_mut().timeout = Duration::from_secs(10);
    assert_eq!(r.dev.handshake().subchannels, 2);
    let subs: Vec<Guest> = (1..=2).map(|i| r.open(i, 32)).collect();
    let threads: Vec<_> = std::iter::once(g)
        .chain(subs)
        .enumerate()
        .map(|(t, mut g)| {
            std::thread::spawn(move || {
                for i in 0..50u32 {
                    let lba = (t as u32) * 4096 + i * 16;
                    let data = pattern((t * 50 + i as usize) as u8, 8192);
                    let s = g.write10(u64::from(i) * 2 + 1, 0, lba, &data, 100, false);
                    assert_eq!(s.srb_status, 1);
                    let (s, back) = g.read10(u64::from(i) * 2 + 2, 0, lba, 16, 300);
                    assert_eq!(s.srb_status, 1);
                    assert!(back == data, "channel {t} request {i}");
                }
                g
            })
        })
        .collect();
    for t in threads {
        t.join().expect("guest thread");
    }
    let v = r.host.inspect().unwrap();
    let chans = v["devices"][0]["channels"].as_array().unwrap();
    assert_eq!(chans.len(), 3, "{v:#}");
    assert_eq!(r.dev.inspect()["counters"]["bytes_written"], 3 * 50 * 8192);
    r.host.stop();
}

#[test]
fn save_and_restore_keep_the_negotiated_state() {
    let mut r = rig(vec![], 1);
    let mut g = r.open(0, 8);
    g.handshake(&[0x0600]);
    let saved = r.dev.save();
    r.host.stop();
    let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
    let fresh =
        StorvspDevice::new(ControllerConfig::new(INSTANCE, 1), mem.clone(), vec![]).unwrap();
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.handshake(), r.dev.handshake());
    assert_eq!(fresh.handshake().version, Some(0x0600));
    // Tampered states are refused.
    let mut bad = saved.clone();
    bad.version = 9;
    assert!(fresh.restore(&bad).is_err());
    let mut bad = saved.clone();
    bad.data["handshake"]["version"] = 0x0402.into();
    assert!(fresh.restore(&bad).is_err());
    let mut bad = saved.clone();
    bad.data["handshake"]["subchannels"] = 5.into();
    assert!(fresh.restore(&bad).is_err());
    let none = StorvspDevice::new(ControllerConfig::new(INSTANCE, 0), mem, vec![]).unwrap();
    assert!(none.restore(&saved).is_ok());
}

#[test]
fn hot_add_and_remove_during_io_send_enumerate_bus() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "a.img", 4 << 20);
    let vhdx = vhdx_disk(dir.path(), 8 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&raw, None, false).unwrap())], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let expect_rescan = |g: &mut Guest| {
        let p = g.recv();
        assert_eq!(
            (p.packet_type, p.transaction_id),
            (packet_type::DATA_INBAND, 0)
        );
        let v = VstorPacket::read_from_prefix(&p.payload).unwrap().0;
        assert_eq!({ v.operation }, operation::ENUMERATE_BUS);
    };
    // I/O to LUN 0 before, between and after the changes.
    let data = pattern(3, 4096);
    assert_eq!(g.write10(1, 0, 8, &data, 0, false).srb_status, 1);
    r.dev
        .add_disk(1, DiskSpec::open(&vhdx, None, false).unwrap())
        .unwrap();
    expect_rescan(&mut g);
    assert!(
        r.dev
            .add_disk(1, DiskSpec::open(&raw, None, true).unwrap())
            .is_err(),
        "LUN 1 taken"
    );
    let s = g.srb(2, 1, &[0x12, 0, 0, 0, 36, 0], sp::data_in::READ, 36, 0);
    assert_eq!((s.srb_status, g.read_guest(0, 1)[0]), (1, 0));
    assert_eq!(g.write10(3, 1, 0, &data, 0, false).srb_status, 1);
    let (s, back) = g.read10(4, 0, 8, 8, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back == data);
    // Remove LUN 1: the guest is told, its commands get INVALID_LUN, and the VHDX is
    // unlocked once the controller lets go.
    let spec = r.dev.remove_disk(1).expect("LUN 1 present");
    expect_rescan(&mut g);
    let s = g.srb(5, 1, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0);
    assert_eq!(s.srb_status, sp::srb_status::INVALID_LUN);
    drop(spec);
    let reopened = DiskSpec::open(&vhdx, None, false).expect("unlocked after removal");
    let mut back = vec![0; 4096];
    reopened.medium.read_at(&mut back, 0).unwrap();
    assert!(back == data);
    assert_eq!(r.dev.inspect()["counters"]["rescans"], 2);
    assert!(r.dev.remove_disk(1).is_none());
    r.host.stop();
}

#[test]
fn a_reset_between_requests_is_answered_and_io_continues() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "a.img", 4 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&raw, None, false).unwrap())], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    // Requests queued around resets, as storvsc's error handler does (RESET_BUS with
    // VMBUS_RQST_RESET): every one completes.
    let reset_id = u64::MAX - 3;
    let tur = g.srb_packet(0, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0);
    for (i, op) in [
        operation::RESET_BUS,
        operation::RESET_LUN,
        operation::RESET_ADAPTER,
    ]
    .into_iter()
    .enumerate()
    {
        g.send(10 + i as u64, packet_type::DATA_INBAND, &[], tur.as_bytes());
        g.send(
            reset_id,
            packet_type::DATA_INBAND,
            &[],
            packet(op).as_bytes(),
        );
        g.send(20 + i as u64, packet_type::DATA_INBAND, &[], tur.as_bytes());
        assert_eq!(g.completion(10 + i as u64).srb().srb_status, 1);
        assert_eq!({ g.completion(reset_id).status }, 0);
        assert_eq!(g.completion(20 + i as u64).srb().srb_status, 1);
    }
    r.host.stop();
}

#[test]
fn raw_images_are_locked_like_vhdx_ones() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "shared.img", 1 << 20);
    let writer = DiskSpec::open(&raw, None, false).unwrap();
    assert_eq!(writer.format, "raw");
    let e = DiskSpec::open(&raw, None, false).unwrap_err().to_string();
    assert!(e.contains("shared.img") && e.contains("in use"), "{e}");
    // Readers proceed; once the writer is gone a new writer gets the file, and readers
    // then keep writers out.
    let reader = DiskSpec::open(&raw, None, true).unwrap();
    drop(writer);
    drop(reader);
    let reader = DiskSpec::open(&raw, None, true).unwrap();
    assert!(
        DiskSpec::open(&raw, None, false).is_err(),
        "a reader holds it"
    );
    drop(reader);
    DiskSpec::open(&raw, None, false).unwrap();
}

/// A controller still referenced (as the control socket's handle keeps it) lets go of its
/// files on close: the VHDX the guest wrote is clean (no log to replay, qemu-img agrees) and
/// unlocked.
#[test]
fn close_leaves_the_vhdx_clean_and_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let path = vhdx_disk(dir.path(), 8 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    let mut g = r.open(0, 16);
    g.handshake(&[0x0602]);
    let data = pattern(9, 65536);
    assert_eq!(g.write10(1, 0, 64, &data, 0, false).srb_status, 1);
    r.host.stop();
    assert!(DiskSpec::open(&path, None, false).is_err(), "still locked");
    assert!(r.dev.close().is_empty());
    assert!(r.dev.drives().is_empty());
    let again = DiskSpec::open(&path, None, true).expect("unlocked");
    let mut back = vec![0; data.len()];
    again.medium.read_at(&mut back, 64 * 512).unwrap();
    assert!(back == data);
    drop(again);
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("qemu-img not installed: the clean-header check is skipped");
    }
}
