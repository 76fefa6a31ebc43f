//! The CD/DVD target (MMC-6, peripheral type 5): read-only 2048-byte blocks on a removable
//! medium that the host can insert, change or remove, and the guest can eject.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::cdb::Command;
use crate::disk::Geometry;
use crate::inquiry::{self, Identity, VpdParams};
use crate::medium::Medium;
use crate::mode::{self, ModeParams};
use crate::sense::Sense;
use crate::target;
use crate::{be32, Completion, Data, InitiatorId, LogicalUnit};

pub const DVD_BLOCK: u32 = 2048;
pub const PROFILE_DVD_ROM: u16 = 0x0010;

/// Media class event codes (MMC-6 table 139).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MediaEvent {
    NoChange = 0,
    EjectRequest = 1,
    NewMedia = 2,
    MediaRemoval = 3,
}

impl MediaEvent {
    /// The event with this MMC event code (for restoring a saved drive).
    pub fn from_code(code: u8) -> Option<Self> {
        [
            Self::NoChange,
            Self::EjectRequest,
            Self::NewMedia,
            Self::MediaRemoval,
        ]
        .into_iter()
        .find(|e| *e as u8 == code)
    }
}

/// The drive's own state, for save/restore and inspection (the medium is re-attached by the
/// caller, which knows where it came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DvdSnapshot {
    pub medium_present: bool,
    pub unit_attention: bool,
    pub event: MediaEvent,
    pub prevent: bool,
}

struct State {
    medium: Option<Arc<dyn Medium>>,
    unit_attention: bool,
    event: MediaEvent,
    prevent: bool,
}

/// A virtual DVD-ROM drive. Cheap to share: every method takes `&self`.
pub struct ScsiDvd {
    state: Mutex<State>,
    identity: Identity,
    geometry: Geometry,
}

impl std::fmt::Debug for ScsiDvd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("ScsiDvd")
            .field("medium", &s.medium.is_some())
            .field("unit_attention", &s.unit_attention)
            .field("event", &s.event)
            .field("prevent", &s.prevent)
            .finish()
    }
}

impl ScsiDvd {
    /// A drive with `medium` loaded (or empty), identified by `id` (the drive's own
    /// identifier: it does not change with the medium).
    pub fn new(medium: Option<Arc<dyn Medium>>, id: [u8; 16]) -> Self {
        Self {
            state: Mutex::new(State {
                medium,
                unit_attention: false,
                event: MediaEvent::NoChange,
                prevent: false,
            }),
            identity: Identity {
                peripheral: inquiry::TYPE_CDROM,
                removable: true,
                product: inquiry::product("Virtual DVD-ROM"),
                id,
            },
            geometry: Geometry {
                block: DVD_BLOCK,
                max_transfer_blocks: 512,
            },
        }
    }

    /// Sets the largest READ in 2048-byte blocks (at least 1).
    pub fn with_max_transfer_blocks(mut self, blocks: u32) -> Self {
        self.geometry.max_transfer_blocks = blocks.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        support::lock(&self.state)
    }

    /// The host inserts, replaces (`Some`) or removes (`None`) the medium. This is the
    /// administrator's action and ignores the guest's PREVENT MEDIUM REMOVAL. A new medium
    /// raises UNIT ATTENTION 28h and a NewMedia event; a removal raises a MediaRemoval event.
    pub fn change_medium(&self, medium: Option<Arc<dyn Medium>>) {
        let mut s = self.lock();
        match medium {
            Some(m) => {
                s.medium = Some(m);
                s.unit_attention = true;
                s.event = MediaEvent::NewMedia;
            }
            None => {
                let had = s.medium.take().is_some();
                s.unit_attention = false;
                if had {
                    s.event = MediaEvent::MediaRemoval;
                }
            }
        }
    }

    /// The host asks for the medium back, as the eject button of a real drive does. Without
    /// a PREVENT from the guest the medium is removed at once (returns `true`); otherwise the
    /// guest sees an EjectRequest event, and it ejects the medium itself (START STOP UNIT)
    /// after unlocking, or keeps it (returns `false`).
    pub fn request_eject(&self) -> bool {
        let mut s = self.lock();
        if s.prevent {
            s.event = MediaEvent::EjectRequest;
            return false;
        }
        if s.medium.take().is_some() {
            s.event = MediaEvent::MediaRemoval;
        }
        s.unit_attention = false;
        true
    }

    /// The medium loaded now (`None` after an eject by the guest or the host).
    pub fn medium(&self) -> Option<Arc<dyn Medium>> {
        self.lock().medium.clone()
    }

    pub fn snapshot(&self) -> DvdSnapshot {
        let s = self.lock();
        DvdSnapshot {
            medium_present: s.medium.is_some(),
            unit_attention: s.unit_attention,
            event: s.event,
            prevent: s.prevent,
        }
    }

    /// Restores the drive state with `medium` loaded (`snapshot.medium_present` is only
    /// informational: the medium given here wins).
    pub fn restore(&self, snapshot: DvdSnapshot, medium: Option<Arc<dyn Medium>>) {
        let mut s = self.lock();
        s.unit_attention = snapshot.unit_attention && medium.is_some();
        s.medium = medium;
        s.event = snapshot.event;
        s.prevent = snapshot.prevent;
    }

    /// Whether the guest prevents medium removal.
    pub fn removal_prevented(&self) -> bool {
        self.lock().prevent
    }

    fn mode_params(prevented: bool) -> ModeParams<'static> {
        ModeParams {
            pages: &[mode::PAGE_MM_CAPABILITIES],
            device_specific: 0,
            block_descriptor: None,
            prevented,
        }
    }

    fn event_status(&self, classes: u8, alloc: u32, data: &mut Data) -> Completion {
        let mut s = self.lock();
        const MEDIA: u8 = 1 << 4;
        if classes & MEDIA == 0 {
            // No supported class requested: NEA, no descriptor.
            let b = [0, 2, 0x80, MEDIA];
            return Completion::good(data.reply(&b, alloc));
        }
        let present = s.medium.is_some();
        let status = if present { 0x02 } else { 0x01 }; // media present / tray open
        let b = [0, 6, 0x04, MEDIA, s.event as u8, status, 0, 0];
        let n = data.reply(&b, alloc);
        if n == b.len() {
            s.event = MediaEvent::NoChange;
        }
        Completion::good(n)
    }

    fn configuration(
        &self,
        rt: u8,
        start: u16,
        alloc: u32,
        present: bool,
        data: &mut Data,
    ) -> Completion {
        fn feature(
            code: u16,
            version: u8,
            persistent: bool,
            current: bool,
            body: &[u8],
        ) -> Vec<u8> {
            let mut f = code.to_be_bytes().to_vec();
            f.push((version << 2) | (u8::from(persistent) << 1) | u8::from(current));
            f.push(body.len() as u8);
            f.extend_from_slice(body);
            f
        }
        let mut features = vec![
            (
                0x0000,
                true,
                feature(0x0000, 0, true, true, &[0x00, 0x10, u8::from(present), 0]),
            ),
            (
                0x0001,
                true,
                feature(0x0001, 2, true, true, &[0, 0, 0, 1, 0, 0, 0, 0]),
            ),
            (
                0x0002,
                true,
                feature(0x0002, 1, true, true, &[0x02, 0, 0, 0]),
            ),
            (
                0x0003,
                true,
                feature(0x0003, 0, true, true, &[0x29, 0, 0, 0]),
            ),
        ];
        let mut random = be32(DVD_BLOCK).to_vec();
        random.extend_from_slice(&[0, 16, 0, 0]);
        features.push((0x0010, present, feature(0x0010, 0, false, present, &random)));
        features.push((0x001F, present, feature(0x001F, 0, false, present, &[0; 4])));

        let mut out = vec![0u8; 8];
        if present {
            out[6..8].copy_from_slice(&PROFILE_DVD_ROM.to_be_bytes());
        }
        for (code, current, bytes) in &features {
            let wanted = match rt {
                0 => *code >= start,
                1 => *code >= start && *current,
                _ => *code == start,
            };
            if wanted {
                out.extend_from_slice(bytes);
            }
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&be32(len));
        Completion::good(data.reply(&out, alloc))
    }
}

/// A TOC address: an LBA or, with `msf`, minute/second/frame counted from 00:02:00.
fn address(lba: u64, msf: bool) -> [u8; 4] {
    if !msf {
        return be32(u32::try_from(lba).unwrap_or(u32::MAX));
    }
    let f = lba.saturating_add(150);
    let m = (f / (75 * 60)).min(255) as u8;
    [0, m, ((f / 75) % 60) as u8, (f % 75) as u8]
}

fn read_toc(
    blocks: u64,
    msf: bool,
    format: u8,
    track: u8,
    alloc: u32,
    data: &mut Data,
) -> Completion {
    let mut out = vec![0u8, 0, 1, 1];
    match format {
        0 => {
            let entry = |out: &mut Vec<u8>, number: u8, lba: u64| {
                out.extend_from_slice(&[0, 0x14, number, 0]);
                out.extend_from_slice(&address(lba, msf));
            };
            match track {
                0 | 1 => {
                    entry(&mut out, 1, 0);
                    entry(&mut out, 0xAA, blocks);
                }
                0xAA => entry(&mut out, 0xAA, blocks),
                _ => return Completion::check(Sense::invalid_cdb_field(6, None)),
            }
        }
        1 => {
            out.extend_from_slice(&[0, 0x14, 1, 0]);
            out.extend_from_slice(&address(0, msf));
        }
        _ => return Completion::check(Sense::invalid_cdb_field(2, Some(3))),
    }
    let len = (out.len() - 2) as u16;
    out[..2].copy_from_slice(&len.to_be_bytes());
    Completion::good(data.reply(&out, alloc))
}

fn disc_information(alloc: u32, data: &mut Data) -> Completion {
    let mut b = [0u8; 34];
    b[1] = 32;
    b[2] = 0x0E; // last session complete, disc complete
    b[3] = 1; // first track
    b[4] = 1; // sessions
    b[5] = 1; // first track in last session
    b[6] = 1; // last track in last session
    b[7] = 0x20; // URU
    b[16..24].fill(0xFF); // no lead-in / lead-out to record
    Completion::good(data.reply(&b, alloc))
}

impl LogicalUnit for ScsiDvd {
    fn execute_command(&self, _: InitiatorId, cmd: &Command, mut data: Data<'_>) -> Completion {
        let (medium, prevent) = {
            let mut s = self.lock();
            if s.unit_attention && !cmd.ignores_unit_attention() {
                s.unit_attention = false;
                return Completion::check(Sense::medium_changed());
            }
            (s.medium.clone(), s.prevent)
        };
        let g = &self.geometry;
        // Commands that need the medium.
        let need = |m: &Option<Arc<dyn Medium>>| m.clone().ok_or(Sense::medium_not_present());
        match *cmd {
            Command::TestUnitReady => match need(&medium) {
                Ok(_) => Completion::good(0),
                Err(s) => Completion::check(s),
            },
            Command::RequestSense { desc, alloc } => {
                if desc {
                    return Completion::check(Sense::invalid_cdb_field(1, Some(0)));
                }
                let sense = {
                    let mut s = self.lock();
                    if s.unit_attention {
                        s.unit_attention = false;
                        Sense::medium_changed()
                    } else if s.medium.is_none() {
                        Sense::medium_not_present()
                    } else {
                        Sense::no_sense()
                    }
                };
                Completion::good(data.reply(&sense.to_fixed(), alloc))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let bytes = if evpd {
                    let p = VpdParams {
                        identity: &self.identity,
                        limits: None,
                        lbpu: false,
                        lbprz: false,
                    };
                    match inquiry::vpd(page, &p) {
                        Ok(b) => b,
                        Err(s) => return Completion::check(s),
                    }
                } else {
                    inquiry::standard(&self.identity).to_vec()
                };
                Completion::good(data.reply(&bytes, alloc))
            }
            Command::ReportLuns { select, alloc } => {
                Completion::from_result(target::report_luns(&[0], select, alloc, &mut data))
            }
            Command::ReadCapacity10 => match need(&medium) {
                Ok(m) => Completion::good(data.reply(&g.capacity10(&*m), 8)),
                Err(s) => Completion::check(s),
            },
            Command::ReadCapacity16 { alloc } => match need(&medium) {
                Ok(m) => {
                    let mut b = [0u8; 32];
                    b[..8].copy_from_slice(&g.blocks(&*m).saturating_sub(1).to_be_bytes());
                    b[8..12].copy_from_slice(&be32(DVD_BLOCK));
                    Completion::good(data.reply(&b, alloc))
                }
                Err(s) => Completion::check(s),
            },
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => match mode::sense(
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                &Self::mode_params(prevent),
            ) {
                Ok(b) => Completion::good(data.reply(&b, alloc)),
                Err(s) => Completion::check(s),
            },
            Command::ModeSelect { ten, pf, sp, len } => {
                let r = data.param_list(len, if ten { 7 } else { 4 }).and_then(|l| {
                    mode::select(ten, pf, sp, l, &Self::mode_params(prevent)).map(|()| l.len())
                });
                Completion::from_result(r)
            }
            Command::Read { .. } => {
                let m = match need(&medium) {
                    Ok(m) => m,
                    Err(s) => return Completion::check(s),
                };
                let buffer_len = data.input().len();
                match g.io(&*m, cmd, buffer_len) {
                    Ok(Some(io)) => g.run(&*m, io, &mut data),
                    Ok(None) => Completion::good(0),
                    Err(s) => Completion::check(s),
                }
            }
            Command::Write { .. } | Command::WriteSame16 { .. } | Command::Unmap { .. } => {
                match need(&medium) {
                    Ok(_) => Completion::check(Sense::write_protected()),
                    Err(s) => Completion::check(s),
                }
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                let m = match need(&medium) {
                    Ok(m) => m,
                    Err(s) => return Completion::check(s),
                };
                if bytchk {
                    return Completion::check(Sense::invalid_cdb_field(1, Some(1)));
                }
                Completion::from_result(g.range(&*m, lba, blocks.into()).map(|_| 0))
            }
            Command::SyncCache { .. } => Completion::good(0),
            Command::StartStop { start, loej, .. } => {
                if loej && !start {
                    let mut s = self.lock();
                    if s.prevent {
                        return Completion::check(Sense::removal_prevented());
                    }
                    if s.medium.take().is_some() {
                        s.event = MediaEvent::MediaRemoval;
                    }
                }
                Completion::good(0)
            }
            Command::PreventAllow { prevent } => {
                self.lock().prevent = prevent;
                Completion::good(0)
            }
            Command::GetConfiguration { rt, start, alloc } => {
                self.configuration(rt, start, alloc, medium.is_some(), &mut data)
            }
            Command::GetEventStatus { classes, alloc } => {
                self.event_status(classes, alloc, &mut data)
            }
            Command::ReadToc {
                msf,
                format,
                track,
                alloc,
            } => match need(&medium) {
                Ok(m) => read_toc(g.blocks(&*m), msf, format, track, alloc, &mut data),
                Err(s) => Completion::check(s),
            },
            Command::ReadDiscInformation { alloc } => match need(&medium) {
                Ok(_) => disc_information(alloc, &mut data),
                Err(s) => Completion::check(s),
            },
            Command::GetLbaStatus { .. }
            | Command::PersistentReserveIn { .. }
            | Command::PersistentReserveOut { .. } => Completion::check(Sense::invalid_opcode()),
        }
    }
}
