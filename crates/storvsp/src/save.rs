//! Save and restore of a controller: the handshake, each channel's in-flight requests (see
//! [`crate::inflight`]), a rescan the guest has not been told of, the DVD drives and the
//! disks' persistent reservations.
//!
//! Saving pauses the controller: from then on no worker takes a packet off its ring or puts
//! a completion in one, so the saved state stays true of guest memory however long the
//! caller takes to save the rest of the VM. [`StorvspDevice::resume`] lets a VM that goes on
//! running continue; a restored controller starts unpaused.

use crate::inflight::{SavedChannel, MAX_SAVED_REQUESTS};
use crate::protocol::{self, Handshake, Phase};
use crate::{Lun, StorvspDevice, SAVED_STATE_VERSION};
use hvdef::storvsp::VstorPacket;
use scsi::InitiatorId;
use std::sync::atomic::Ordering;
use vmbus::{DeviceRestoreError, SavedDevice};

/// The device's saved state (version [`SAVED_STATE_VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub handshake: Handshake,
    /// Channels with requests in flight.
    #[serde(default)]
    pub channels: Vec<SavedChannel>,
    /// The guest is still to be told to rescan (ENUMERATE_BUS) after a hot add or remove.
    #[serde(default)]
    pub rescan: bool,
    #[serde(default)]
    pub dvds: Vec<SavedDvd>,
    /// The disks whose persistent reservations are not the initial (empty) state.
    #[serde(default)]
    pub reservations: Vec<SavedReservations>,
}

/// Most registrations (and unit attentions) one disk's saved reservations may hold.
const MAX_SAVED_REGISTRATIONS: usize = 4096;

/// A disk's persistent reservations ([`scsi::ReservationSnapshot`]); initiators are channel
/// indexes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedReservations {
    pub lun: u8,
    pub generation: u32,
    /// `(initiator, reservation key)`, in registration order.
    pub registrations: Vec<(u64, u64)>,
    /// `(holder, type code)`.
    pub reservation: Option<(u64, u8)>,
    pub aptpl: bool,
    /// `(initiator, ASC, ASCQ)` of each UNIT ATTENTION owed.
    pub unit_attentions: Vec<(u64, u8, u8)>,
}

impl SavedReservations {
    fn new(lun: u8, s: scsi::ReservationSnapshot) -> Self {
        Self {
            lun,
            generation: s.generation,
            registrations: s.registrations.iter().map(|&(i, k)| (i.0, k)).collect(),
            reservation: s.reservation.map(|(i, t)| (i.0, t as u8)),
            aptpl: s.aptpl,
            unit_attentions: s
                .unit_attentions
                .iter()
                .map(|(i, u)| (i.0, u.asc, u.ascq))
                .collect(),
        }
    }

    /// The snapshot, if it is one the commands could have produced.
    fn snapshot(&self) -> Result<scsi::ReservationSnapshot, DeviceRestoreError> {
        let why = |w: &str| invalid(format!("reservations of LUN {}: {w}", self.lun));
        if self.registrations.len() > MAX_SAVED_REGISTRATIONS
            || self.unit_attentions.len() > MAX_SAVED_REGISTRATIONS
        {
            return Err(why("too many registrations"));
        }
        let reservation = match self.reservation {
            None => None,
            Some((holder, code)) => Some((
                InitiatorId(holder),
                scsi::ReservationType::from_u8(code).ok_or_else(|| why("an unknown type"))?,
            )),
        };
        let ua = scsi::SenseKey::UnitAttention;
        let s = scsi::ReservationSnapshot {
            generation: self.generation,
            registrations: self
                .registrations
                .iter()
                .map(|&(i, k)| (InitiatorId(i), k))
                .collect(),
            reservation,
            aptpl: self.aptpl,
            unit_attentions: self
                .unit_attentions
                .iter()
                .map(|&(i, asc, ascq)| (InitiatorId(i), scsi::Sense::new(ua, (asc, ascq))))
                .collect(),
        };
        s.check().map_err(why)?;
        Ok(s)
    }
}

/// A DVD drive's state. The medium itself is the caller's to attach again; a drive saved
/// empty (the guest ejected it) is restored empty.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedDvd {
    pub lun: u8,
    pub medium_present: bool,
    pub removal_prevented: bool,
    pub unit_attention: bool,
    /// The MMC media event code not yet reported.
    pub event: u8,
}

fn invalid(why: impl Into<String>) -> DeviceRestoreError {
    DeviceRestoreError::Invalid(why.into())
}

impl StorvspDevice {
    pub(crate) fn save_state(&self) -> SavedState {
        let s = &self.shared;
        s.paused.store(true, Ordering::SeqCst);
        let registries: Vec<_> = support::lock(&s.channels).values().cloned().collect();
        let mut rescan = s.rescan_pending.load(Ordering::Acquire);
        let mut channels = Vec::new();
        for r in registries {
            // Waits for a worker in the middle of taking a packet or sending a completion.
            let q = r.lock();
            rescan |= q.notices > 0;
            if !q.entries.is_empty() {
                channels.push(SavedChannel {
                    index: r.index,
                    requests: q.save(),
                });
            }
        }
        let dvds = support::lock_read(&s.luns)
            .iter()
            .filter_map(|(&lun, l)| match l {
                Lun::Dvd { drive, .. } => {
                    let snap = drive.snapshot();
                    Some(SavedDvd {
                        lun,
                        medium_present: snap.medium_present,
                        removal_prevented: snap.prevent,
                        unit_attention: snap.unit_attention,
                        event: snap.event as u8,
                    })
                }
                Lun::Disk(..) => None,
            })
            .collect();
        // After the channels: a command that changes them ran before save or runs after
        // resume (see `crate::inflight`).
        let reservations = support::lock_read(&s.luns)
            .iter()
            .filter_map(|(&lun, l)| match l {
                Lun::Disk(_, disk) => {
                    let snap = disk.reservations().snapshot();
                    (snap != scsi::ReservationSnapshot::default())
                        .then(|| SavedReservations::new(lun, snap))
                }
                Lun::Dvd { .. } => None,
            })
            .collect();
        SavedState {
            handshake: self.handshake(),
            channels,
            rescan,
            dvds,
            reservations,
        }
    }

    /// Lets a paused (saved) controller go on: workers take packets and send completions
    /// again.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        for r in support::lock(&self.shared.channels).values() {
            r.wake.ring();
        }
    }

    pub(crate) fn restore_state(&self, saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        if !(1..=SAVED_STATE_VERSION).contains(&saved.version) {
            return Err(DeviceRestoreError::Version(saved.version));
        }
        let s: SavedState =
            serde_json::from_value(saved.data.clone()).map_err(|e| invalid(e.to_string()))?;
        let max_sub = self.shared.config.max_subchannels;
        let h = s.handshake;
        if let Some(v) = h.version {
            if !protocol::VERSIONS.contains(&v) {
                return Err(invalid(format!(
                    "protocol version {v:#06x} is not one this controller speaks"
                )));
            }
        }
        if h.phase == Phase::Ready && h.version.is_none() {
            return Err(invalid("ready without a protocol version"));
        }
        if h.subchannels > max_sub {
            return Err(invalid(format!(
                "{} subchannels, more than the {max_sub} allowed",
                h.subchannels
            )));
        }
        let mut restored = std::collections::BTreeMap::new();
        for c in &s.channels {
            if c.index > max_sub {
                return Err(invalid(format!("channel {} does not exist", c.index)));
            }
            if c.requests.len() > MAX_SAVED_REQUESTS {
                return Err(invalid(format!(
                    "channel {}: {} requests in flight",
                    c.index,
                    c.requests.len()
                )));
            }
            for r in &c.requests {
                if vmbus::packet::Packet::parse(&r.packet).is_err() {
                    return Err(invalid(format!("channel {}: a malformed packet", c.index)));
                }
                if r.completion
                    .as_ref()
                    .is_some_and(|c| c.len() != size_of::<VstorPacket>())
                {
                    return Err(invalid(format!(
                        "channel {}: a completion of the wrong size",
                        c.index
                    )));
                }
            }
            if restored.insert(c.index, c.requests.clone()).is_some() {
                return Err(invalid(format!("channel {} saved twice", c.index)));
            }
        }
        let mut luns = support::lock_write(&self.shared.luns);
        let mut dvds = Vec::new();
        for d in &s.dvds {
            let event = scsi::MediaEvent::from_code(d.event)
                .ok_or_else(|| invalid(format!("DVD at LUN {}: media event {}", d.lun, d.event)))?;
            match luns.get(&d.lun) {
                Some(Lun::Dvd { .. }) => dvds.push((d, event)),
                _ => {
                    return Err(invalid(format!(
                        "no DVD drive at LUN {} on this controller",
                        d.lun
                    )))
                }
            }
        }
        let mut reservations = std::collections::BTreeMap::new();
        for r in &s.reservations {
            if !matches!(luns.get(&r.lun), Some(Lun::Disk(..))) {
                return Err(invalid(format!(
                    "no disk at LUN {} on this controller",
                    r.lun
                )));
            }
            if reservations.insert(r.lun, r.snapshot()?).is_some() {
                return Err(invalid(format!(
                    "reservations of LUN {} saved twice",
                    r.lun
                )));
            }
        }
        // Checked; now change things.
        for (lun, l) in luns.iter() {
            if let Lun::Disk(_, disk) = l {
                let snap = reservations.remove(lun).unwrap_or_default();
                disk.reservations().restore(snap);
            }
        }
        for (d, event) in dvds {
            if let Some(Lun::Dvd { drive, medium }) = luns.get_mut(&d.lun) {
                if !d.medium_present {
                    *medium = None;
                }
                let snap = scsi::DvdSnapshot {
                    medium_present: d.medium_present,
                    unit_attention: d.unit_attention,
                    event,
                    prevent: d.removal_prevented,
                };
                drive.restore(snap, medium.as_ref().map(|m| m.medium.clone()));
            }
        }
        drop(luns);
        *support::lock(&self.shared.handshake) = h;
        *support::lock(&self.shared.restored) = restored;
        self.shared.paused.store(false, Ordering::SeqCst);
        if s.rescan {
            self.rescan();
        }
        Ok(())
    }
}
