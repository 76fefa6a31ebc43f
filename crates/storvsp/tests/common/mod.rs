//! The test rig shared by the storvsp tests: the real VMBus host (control thread, one worker
//! thread per channel) and a guest that plays Linux's storvsc over `vmbus::testing`.
#![allow(dead_code)]

use guestmem::GuestMemory;
use hvdef::storvsp::{self as sp, operation, ScsiRequest, VstorPacket};
use hvdef::vmbus::{packet_type, Guid, PACKET_FLAG_COMPLETION_REQUESTED};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storvsp::{ControllerConfig, DiskSpec, StorvspDevice};
use vmbus::client::{Client, GuestChannel, LINUX_VERSIONS};
use vmbus::host::Doorbell;
use vmbus::testing::{wait_event, GuestSynic, ThreadedTransport};
use vmbus::{ChannelError, HostConfig, OwnedPacket, PagedRange, ServerConfig, VmbusHost};
use zerocopy::{FromBytes, IntoBytes};

pub const MEM: u64 = 64 << 20;
pub const INIT_ID: u64 = u64::MAX - 2;
pub const INSTANCE: Guid = Guid::from_u128(0x5649_5249_4449_414e_5343_5349_0000_0000);

pub struct Rig {
    pub host: VmbusHost,
    pub synic: Arc<GuestSynic>,
    pub client: Client<ThreadedTransport>,
    pub mem: GuestMemory,
    pub dev: Arc<StorvspDevice>,
}

pub fn rig(disks: Vec<(u8, DiskSpec)>, max_subchannels: u16) -> Rig {
    rig_with(ControllerConfig::new(INSTANCE, max_subchannels), disks)
}

/// A rig whose controller has `config` (its instance id must be [`INSTANCE`] for
/// [`Rig::open`]).
pub fn rig_with(controller: ControllerConfig, disks: Vec<(u8, DiskSpec)>) -> Rig {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let config = HostConfig {
        server: ServerConfig {
            vp_count: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, mem.clone(), synic.clone()).unwrap();
    let dev = StorvspDevice::new(controller, mem.clone(), disks).unwrap();
    host.add_device(dev.clone()).unwrap();
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem.clone(),
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    Rig {
        host,
        synic,
        client,
        mem,
        dev,
    }
}

/// One channel's guest end, on whatever thread owns it.
pub struct Guest {
    pub ch: GuestChannel,
    pub host: VmbusHost,
    pub event: Arc<Doorbell>,
    pub mem: GuestMemory,
    /// Guest pages for data buffers.
    pub pages: Vec<u64>,
}

impl Rig {
    pub fn open(&mut self, sub: u16, ring_pages: u64) -> Guest {
        self.open_on(INSTANCE, sub, ring_pages)
    }

    /// Opens channel `sub` of the controller with instance id `instance`.
    pub fn open_on(&mut self, instance: Guid, sub: u16, ring_pages: u64) -> Guest {
        let relid = self
            .client
            .offers()
            .find(|o| {
                o.interface_type == sp::INTERFACE
                    && o.instance_id.to_string() == instance.to_string()
                    && o.sub_channel_index == sub
            })
            .expect("scsi offer")
            .relid;
        let ch = self
            .client
            .open_channel(relid, ring_pages, ring_pages, 0)
            .unwrap();
        let pages = self.client.alloc_pages(300).unwrap();
        Guest {
            event: self.synic.event(ch.relid),
            ch,
            host: self.host.clone(),
            mem: self.mem.clone(),
            pages,
        }
    }
}

pub fn packet(op: u32) -> VstorPacket {
    let mut p = VstorPacket::new(op, 0);
    p.flags = sp::REQUEST_COMPLETION_FLAG;
    p
}

impl Guest {
    pub fn signal(&mut self) {
        if self.ch.channel.take_signal() {
            let _ = self.host.signal_event(self.ch.connection_id);
        }
    }

    pub fn send(&mut self, id: u64, ptype: u16, header: &[u8], payload: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.ch.channel.try_send(
                ptype,
                PACKET_FLAG_COMPLETION_REQUESTED,
                id,
                header,
                payload,
            ) {
                Ok(()) => break,
                Err(ChannelError::Full) if Instant::now() < deadline => {
                    self.signal();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("guest send: {e}"),
            }
        }
        self.signal();
    }

    pub fn recv(&mut self) -> OwnedPacket {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.ch.channel.recv_owned().unwrap();
            self.signal();
            if let Some(p) = p {
                return p;
            }
            assert!(Instant::now() < deadline, "no completion");
            wait_event(&self.event, Duration::from_millis(100));
        }
    }

    /// Receives a completion and checks it is what storvsc expects: a COMP of exactly
    /// 64 bytes with operation COMPLETE_IO echoing `id`.
    pub fn completion(&mut self, id: u64) -> VstorPacket {
        let p = self.recv();
        assert_eq!(p.packet_type, packet_type::COMPLETION);
        assert_eq!(p.transaction_id, id);
        assert_eq!(p.payload.len(), 64, "completion size");
        let v = VstorPacket::read_from_bytes(&p.payload).unwrap();
        assert_eq!({ v.operation }, operation::COMPLETE_IO);
        v
    }

    pub fn control(&mut self, p: VstorPacket) -> VstorPacket {
        self.send(INIT_ID, packet_type::DATA_INBAND, &[], p.as_bytes());
        self.completion(INIT_ID)
    }

    /// storvsc_channel_init: BEGIN_INIT, versions newest first, properties, END_INIT.
    pub fn handshake(&mut self, versions: &[u16]) -> (u16, sp::ChannelProperties) {
        assert_eq!(
            { self.control(packet(operation::BEGIN_INITIALIZATION)).status },
            0
        );
        let mut chosen = None;
        for &v in versions {
            let mut p = packet(operation::QUERY_PROTOCOL_VERSION);
            p.set_version(&sp::ProtocolVersion {
                major_minor: v,
                revision: 0,
            });
            if self.control(p).status == 0 {
                chosen = Some(v);
                break;
            }
        }
        let props = self.control(packet(operation::QUERY_PROPERTIES));
        assert_eq!({ props.status }, 0);
        assert_eq!(
            { self.control(packet(operation::END_INITIALIZATION)).status },
            0
        );
        (chosen.expect("a version accepted"), props.properties())
    }

    pub fn srb_packet(&self, lun: u8, cdb: &[u8], data_in: u8, len: u32) -> VstorPacket {
        let mut p = packet(operation::EXECUTE_SRB);
        let mut s = ScsiRequest {
            length: sp::SCSI_REQUEST_LEN,
            lun,
            cdb_length: cdb.len() as u8,
            sense_info_length: sp::SENSE_LEN as u8,
            data_in,
            data_transfer_length: len,
            ..Default::default()
        };
        s.cdb_or_sense[..cdb.len()].copy_from_slice(cdb);
        p.set_srb(&s);
        p
    }

    /// A GPA_DIRECT SRB whose buffer starts `offset` bytes into the guest's data pages.
    pub fn srb(
        &mut self,
        id: u64,
        lun: u8,
        cdb: &[u8],
        data_in: u8,
        len: u32,
        offset: u32,
    ) -> ScsiRequest {
        self.send_srb(id, lun, cdb, data_in, len, offset);
        self.completion(id).srb()
    }

    /// Sends an SRB as [`Guest::srb`] does, without waiting for its completion.
    pub fn send_srb(&mut self, id: u64, lun: u8, cdb: &[u8], data_in: u8, len: u32, offset: u32) {
        let p = self.srb_packet(lun, cdb, data_in, len);
        if len == 0 {
            self.send(id, packet_type::DATA_INBAND, &[], p.as_bytes());
        } else {
            let n = PagedRange::pfn_count(offset, len) as usize;
            let r = PagedRange {
                byte_offset: offset,
                byte_count: len,
                pfns: self.pages[..n].to_vec(),
            };
            let h = vmbus::packet::gpa_direct_header(&[r]);
            self.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
        }
    }

    pub fn buf_gpa(&self, offset: u32) -> u64 {
        self.pages[0] * 4096 + u64::from(offset)
    }

    pub fn write_guest(&self, offset: u32, data: &[u8]) {
        // The pages are consecutive in the pool.
        self.mem.write(self.buf_gpa(offset), data).unwrap();
    }

    pub fn read_guest(&self, offset: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read(self.buf_gpa(offset), &mut v).unwrap();
        v
    }

    pub fn write10(
        &mut self,
        id: u64,
        lun: u8,
        lba: u32,
        data: &[u8],
        offset: u32,
        fua: bool,
    ) -> ScsiRequest {
        self.write_guest(offset, data);
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0x2a, if fua { 0x08 } else { 0 }, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.srb(id, lun, &cdb, sp::data_in::WRITE, data.len() as u32, offset)
    }

    pub fn read10(
        &mut self,
        id: u64,
        lun: u8,
        lba: u32,
        blocks: u16,
        offset: u32,
    ) -> (ScsiRequest, Vec<u8>) {
        let mut cdb = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let len = u32::from(blocks) * 512;
        self.write_guest(offset, &vec![0xEE; len as usize]);
        let s = self.srb(id, lun, &cdb, sp::data_in::READ, len, offset);
        (s, self.read_guest(offset, len as usize))
    }
}

pub fn raw_disk(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

pub fn vhdx_disk(dir: &Path, size: u64) -> std::path::PathBuf {
    use vhdx::open::{create, CreateOptions, Format, ImageType};
    let path = dir.join("disk.vhdx");
    let img = create(
        &path,
        &CreateOptions {
            format: Format::Vhdx,
            image_type: ImageType::Dynamic,
            size,
            block_size: 0,
            logical_sector_size: 0,
            physical_sector_size: 0,
            parent: None,
        },
    )
    .unwrap();
    drop(img);
    path
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}
