//! SCSI-3 persistent reservations (SPC-4 5.13): registrations and one logical-unit-scope
//! reservation per medium, shared by every initiator (every VM) that uses the medium.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::cdb::{Command, PrInAction, PrOutAction};
use crate::sense::{asc, Sense, SenseKey};
use crate::InitiatorId;

/// Persistent reservation types (SPC-4 table 180).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReservationType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl ReservationType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    fn registrants_allowed(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }

    fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// A plain copy of the reservation state, for save/restore and inspection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReservationSnapshot {
    pub generation: u32,
    /// (initiator, reservation key), in registration order.
    pub registrations: Vec<(InitiatorId, u64)>,
    /// (holder, type). For the all-registrants types every registrant holds it.
    pub reservation: Option<(InitiatorId, ReservationType)>,
    /// Persist through power loss activated (APTPL of the last REGISTER): the caller should
    /// save this snapshot with the medium and restore it when the medium is opened again.
    pub aptpl: bool,
    /// Unit attentions owed to initiators whose registration or reservation another
    /// initiator took away (SPC-4 5.13.11), one per initiator, reported on its next command.
    pub unit_attentions: Vec<(InitiatorId, Sense)>,
}

impl ReservationSnapshot {
    /// Whether this is a state the commands could have produced (for a snapshot restored
    /// from outside): each initiator registered at most once and with a non-zero key, a
    /// reservation held by a registered initiator, at most one unit attention (a UNIT
    /// ATTENTION sense) owed to each initiator.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut registered = std::collections::HashSet::new();
        for &(initiator, key) in &self.registrations {
            if key == 0 {
                return Err("a registration with reservation key 0");
            }
            if !registered.insert(initiator) {
                return Err("an initiator registered twice");
            }
        }
        if let Some((holder, _)) = self.reservation {
            if !registered.contains(&holder) {
                return Err("a reservation held by an initiator that is not registered");
            }
        }
        let mut owed = std::collections::HashSet::new();
        for (initiator, sense) in &self.unit_attentions {
            if sense.key != SenseKey::UnitAttention {
                return Err("a unit attention that is not one");
            }
            if !owed.insert(*initiator) {
                return Err("two unit attentions owed to one initiator");
            }
        }
        Ok(())
    }
}

/// The persistent reservation state of one medium, cheap to clone and share between the
/// targets (and VMs) that use the medium.
#[derive(Debug, Clone, Default)]
pub struct SharedReservations {
    state: Arc<Mutex<ReservationSnapshot>>,
    /// Whether APTPL is accepted (PTPL_C): the caller persists the state.
    ptpl_capable: bool,
}

/// How a command is treated under a reservation (SPC-4 table 66, SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Allowed whatever the reservation.
    Any,
    /// Reads the medium: conflicts under the exclusive-access types.
    Read,
    /// Changes the medium: conflicts under every type.
    Write,
}

pub(crate) fn access(cmd: &Command) -> Access {
    match cmd {
        Command::Read { .. } | Command::Verify { .. } | Command::GetLbaStatus { .. } => {
            Access::Read
        }
        Command::Write { .. }
        | Command::WriteSame16 { .. }
        | Command::Unmap { .. }
        | Command::SyncCache { .. }
        | Command::ModeSelect { .. }
        | Command::StartStop { .. }
        | Command::PreventAllow { prevent: true } => Access::Write,
        _ => Access::Any,
    }
}

/// Why PERSISTENT RESERVE OUT failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrOutError {
    Conflict,
    Sense(Sense),
}

const PARAM_LEN: usize = 24;

impl SharedReservations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reservations that may persist through power loss: APTPL is accepted and recorded in
    /// [`ReservationSnapshot::aptpl`]; saving and restoring the snapshot is the caller's job.
    pub fn persistent() -> Self {
        Self {
            ptpl_capable: true,
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> ReservationSnapshot {
        self.lock().clone()
    }

    pub fn restore(&self, snapshot: ReservationSnapshot) {
        *self.lock() = snapshot;
    }

    fn lock(&self) -> MutexGuard<'_, ReservationSnapshot> {
        support::lock(&self.state)
    }

    /// Takes the unit attention owed to `initiator`, if any.
    pub(crate) fn take_unit_attention(&self, initiator: InitiatorId) -> Option<Sense> {
        let mut s = self.lock();
        let i = s.unit_attentions.iter().position(|u| u.0 == initiator)?;
        Some(s.unit_attentions.remove(i).1)
    }

    /// Whether `initiator` may run a command of this kind now.
    pub(crate) fn allows(&self, initiator: InitiatorId, access: Access) -> bool {
        if access == Access::Any {
            return true;
        }
        let s = self.lock();
        let Some((holder, ty)) = s.reservation else {
            return true;
        };
        let registered = key_of(&s, initiator).is_some();
        if holder == initiator || (ty.all_registrants() && registered) {
            return true;
        }
        if ty.registrants_allowed() && registered {
            return true;
        }
        access == Access::Read && !ty.exclusive_access()
    }

    /// PERSISTENT RESERVE IN parameter data (before allocation-length truncation).
    pub(crate) fn reserve_in(&self, action: PrInAction) -> Vec<u8> {
        let s = self.lock();
        let mut out = Vec::new();
        match action {
            PrInAction::ReadKeys => {
                out.extend_from_slice(&s.generation.to_be_bytes());
                let len = (s.registrations.len() * 8) as u32;
                out.extend_from_slice(&len.to_be_bytes());
                for &(_, key) in &s.registrations {
                    out.extend_from_slice(&key.to_be_bytes());
                }
            }
            PrInAction::ReadReservation => {
                out.extend_from_slice(&s.generation.to_be_bytes());
                match s.reservation {
                    None => out.extend_from_slice(&0u32.to_be_bytes()),
                    Some((holder, ty)) => {
                        out.extend_from_slice(&16u32.to_be_bytes());
                        let key = if ty.all_registrants() {
                            0
                        } else {
                            key_of(&s, holder).unwrap_or(0)
                        };
                        out.extend_from_slice(&key.to_be_bytes());
                        out.extend_from_slice(&[0; 4]); // obsolete
                        out.push(0);
                        out.push(ty as u8); // scope 0 (logical unit)
                        out.extend_from_slice(&[0; 2]);
                    }
                }
            }
            PrInAction::ReportCapabilities => {
                out.extend_from_slice(&8u16.to_be_bytes());
                out.push(0x04 | u8::from(self.ptpl_capable)); // ATP_C, PTPL_C; no CRH, SIP_C
                out.push(0x80 | u8::from(s.aptpl)); // TMV; ALLOW COMMANDS 0; PTPL_A
                out.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02); // WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
                out.push(0x01); // EX_AC_AR
                out.extend_from_slice(&[0; 2]);
            }
        }
        out
    }

    /// PERSISTENT RESERVE OUT. `params` is the parameter list (`len` bytes, already checked
    /// to be in the data-out buffer).
    pub(crate) fn reserve_out(
        &self,
        initiator: InitiatorId,
        action: PrOutAction,
        scope: u8,
        ty: u8,
        params: &[u8],
    ) -> Result<(), PrOutError> {
        if params.len() != PARAM_LEN {
            return Err(PrOutError::Sense(Sense::parameter_list_length_error()));
        }
        let be64 = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&params[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let key = be64(0);
        let sa_key = be64(8);
        let flags = params[20];
        if flags & 0x08 != 0 {
            return Err(PrOutError::Sense(Sense::invalid_param_field(20))); // SPEC_I_PT
        }
        let register = matches!(
            action,
            PrOutAction::Register | PrOutAction::RegisterAndIgnore
        );
        // APTPL matters only to the register actions (SPC-4 6.16.4).
        let aptpl = flags & 0x01 != 0;
        if register && aptpl && !self.ptpl_capable {
            return Err(PrOutError::Sense(Sense::invalid_param_field(20)));
        }
        let needs_type = matches!(
            action,
            PrOutAction::Reserve
                | PrOutAction::Release
                | PrOutAction::Preempt
                | PrOutAction::PreemptAndAbort
        );
        let rtype = if needs_type {
            if scope != 0 {
                return Err(PrOutError::Sense(Sense::invalid_cdb_field(2, Some(7))));
            }
            Some(
                ReservationType::from_u8(ty)
                    .ok_or(PrOutError::Sense(Sense::invalid_cdb_field(2, Some(3))))?,
            )
        } else {
            None
        };

        let mut s = self.lock();
        let before = s.clone();
        let r = apply(&mut s, initiator, action, key, sa_key, aptpl, rtype);
        if r.is_ok() {
            notify(&mut s, initiator, action, &before);
        }
        r
    }
}

/// Owes the initiators that lost something in `action` a unit attention.
fn notify(
    s: &mut ReservationSnapshot,
    initiator: InitiatorId,
    action: PrOutAction,
    before: &ReservationSnapshot,
) {
    let (registrations, reservation) = (&before.registrations, before.reservation);
    let ua = |code| Sense::new(SenseKey::UnitAttention, code);
    let mut owed: Vec<(InitiatorId, Sense)> = Vec::new();
    let others = |s: &ReservationSnapshot| -> Vec<InitiatorId> {
        s.registrations
            .iter()
            .map(|r| r.0)
            .filter(|&i| i != initiator)
            .collect()
    };
    let released = |s: &ReservationSnapshot| match (reservation, s.reservation) {
        (Some((_, ty)), None) => ty.registrants_allowed(),
        _ => false,
    };
    match action {
        PrOutAction::Clear => {
            for &(i, _) in registrations.iter().filter(|r| r.0 != initiator) {
                owed.push((i, ua(asc::RESERVATIONS_PREEMPTED)));
            }
        }
        PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
            for &(i, _) in registrations {
                if i != initiator && key_of(s, i).is_none() {
                    owed.push((i, ua(asc::REGISTRATIONS_PREEMPTED)));
                }
            }
            let changed = match (reservation, s.reservation) {
                (Some((_, a)), Some((_, b))) => a != b,
                (Some(_), None) => true,
                _ => false,
            };
            if changed {
                for i in others(s) {
                    owed.push((i, ua(asc::RESERVATIONS_RELEASED)));
                }
            }
        }
        PrOutAction::Release | PrOutAction::Register | PrOutAction::RegisterAndIgnore => {
            if released(s) {
                for i in others(s) {
                    owed.push((i, ua(asc::RESERVATIONS_RELEASED)));
                }
            }
        }
        PrOutAction::Reserve => {}
    }
    for (i, sense) in owed {
        if !s.unit_attentions.iter().any(|u| u.0 == i) {
            s.unit_attentions.push((i, sense));
        }
    }
}

fn apply(
    s: &mut ReservationSnapshot,
    initiator: InitiatorId,
    action: PrOutAction,
    key: u64,
    sa_key: u64,
    aptpl: bool,
    rtype: Option<ReservationType>,
) -> Result<(), PrOutError> {
    let current = key_of(s, initiator);
    match action {
        PrOutAction::Register | PrOutAction::RegisterAndIgnore => {
            if action == PrOutAction::Register && current.unwrap_or(0) != key {
                return Err(PrOutError::Conflict);
            }
            match (current, sa_key) {
                (None, 0) => {}
                (None, new) => {
                    s.registrations.push((initiator, new));
                    s.generation = s.generation.wrapping_add(1);
                }
                (Some(_), 0) => {
                    unregister(s, initiator);
                    s.generation = s.generation.wrapping_add(1);
                }
                (Some(_), new) => {
                    if let Some(r) = s.registrations.iter_mut().find(|r| r.0 == initiator) {
                        r.1 = new;
                    }
                    s.generation = s.generation.wrapping_add(1);
                }
            }
            if current.is_some() || sa_key != 0 {
                s.aptpl = aptpl;
            }
            Ok(())
        }
        _ => {
            if current != Some(key) {
                return Err(PrOutError::Conflict);
            }
            match action {
                PrOutAction::Reserve => reserve(s, initiator, rtype),
                PrOutAction::Release => release(s, initiator, rtype),
                PrOutAction::Clear => {
                    s.registrations.clear();
                    s.reservation = None;
                    s.generation = s.generation.wrapping_add(1);
                    Ok(())
                }
                _ => preempt(s, initiator, key, sa_key, rtype),
            }
        }
    }
}

fn key_of(s: &ReservationSnapshot, initiator: InitiatorId) -> Option<u64> {
    s.registrations
        .iter()
        .find(|r| r.0 == initiator)
        .map(|r| r.1)
}

fn holds(s: &ReservationSnapshot, initiator: InitiatorId) -> bool {
    match s.reservation {
        Some((holder, ty)) => {
            holder == initiator || (ty.all_registrants() && key_of(s, initiator).is_some())
        }
        None => false,
    }
}

/// Removes `initiator`'s registration and the reservation it alone held.
fn unregister(s: &mut ReservationSnapshot, initiator: InitiatorId) {
    s.registrations.retain(|r| r.0 != initiator);
    if let Some((holder, ty)) = s.reservation {
        if ty.all_registrants() {
            if s.registrations.is_empty() {
                s.reservation = None;
            } else if holder == initiator {
                s.reservation = Some((s.registrations[0].0, ty));
            }
        } else if holder == initiator {
            s.reservation = None;
        }
    }
}

fn reserve(
    s: &mut ReservationSnapshot,
    initiator: InitiatorId,
    ty: Option<ReservationType>,
) -> Result<(), PrOutError> {
    let Some(ty) = ty else {
        return Err(PrOutError::Sense(Sense::invalid_cdb_field(2, Some(3))));
    };
    match s.reservation {
        None => {
            s.reservation = Some((initiator, ty));
            Ok(())
        }
        Some((_, held)) if held == ty && holds(s, initiator) => Ok(()),
        Some(_) => Err(PrOutError::Conflict),
    }
}

fn release(
    s: &mut ReservationSnapshot,
    initiator: InitiatorId,
    ty: Option<ReservationType>,
) -> Result<(), PrOutError> {
    match s.reservation {
        Some((_, held)) if holds(s, initiator) => {
            if Some(held) != ty {
                return Err(PrOutError::Sense(Sense::invalid_release()));
            }
            s.reservation = None;
            Ok(())
        }
        _ => Ok(()),
    }
}

fn preempt(
    s: &mut ReservationSnapshot,
    initiator: InitiatorId,
    own_key: u64,
    sa_key: u64,
    ty: Option<ReservationType>,
) -> Result<(), PrOutError> {
    let Some(ty) = ty else {
        return Err(PrOutError::Sense(Sense::invalid_cdb_field(2, Some(3))));
    };
    // Removes the other initiators registered with `victim`; false when there were none.
    let remove = |s: &mut ReservationSnapshot, victim: u64| {
        let before = s.registrations.len();
        s.registrations
            .retain(|r| r.0 == initiator || r.1 != victim);
        s.registrations.len() != before || (victim == own_key && before > 0)
    };
    match s.reservation {
        Some((_, held)) if held.all_registrants() => {
            if sa_key == 0 {
                s.registrations.retain(|r| r.0 == initiator);
                s.reservation = Some((initiator, ty));
            } else if !remove(s, sa_key) {
                return Err(PrOutError::Conflict);
            }
        }
        Some((holder, _)) if key_of(s, holder) == Some(sa_key) => {
            remove(s, sa_key);
            s.reservation = Some((initiator, ty));
        }
        _ => {
            if sa_key == 0 {
                return Err(PrOutError::Sense(Sense::invalid_param_field(8)));
            }
            if !remove(s, sa_key) {
                return Err(PrOutError::Conflict);
            }
        }
    }
    s.generation = s.generation.wrapping_add(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: InitiatorId = InitiatorId(1);
    const B: InitiatorId = InitiatorId(2);
    const C: InitiatorId = InitiatorId(3);

    fn params(key: u64, sa: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa.to_be_bytes());
        p
    }

    fn out(
        r: &SharedReservations,
        who: InitiatorId,
        action: PrOutAction,
        ty: u8,
        key: u64,
        sa: u64,
    ) -> Result<(), PrOutError> {
        r.reserve_out(who, action, 0, ty, &params(key, sa))
    }

    #[test]
    fn register_reserve_conflict_release() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 0xB).unwrap();
        // Wrong key: conflict.
        assert_eq!(
            out(&r, A, PrOutAction::Register, 0, 0x99, 0xC),
            Err(PrOutError::Conflict)
        );
        out(&r, A, PrOutAction::Reserve, 1, 0xA, 0).unwrap();
        assert_eq!(
            out(&r, B, PrOutAction::Reserve, 1, 0xB, 0),
            Err(PrOutError::Conflict)
        );
        // Write Exclusive: B may read, not write; C (unregistered) likewise.
        assert!(r.allows(B, Access::Read));
        assert!(!r.allows(B, Access::Write));
        assert!(r.allows(A, Access::Write));
        // Release with the wrong type.
        assert_eq!(
            out(&r, A, PrOutAction::Release, 3, 0xA, 0),
            Err(PrOutError::Sense(Sense::invalid_release()))
        );
        out(&r, A, PrOutAction::Release, 1, 0xA, 0).unwrap();
        assert!(r.allows(B, Access::Write));
        let snap = r.snapshot();
        assert_eq!(snap.generation, 2);
        assert_eq!(snap.registrations, vec![(A, 0xA), (B, 0xB)]);
    }

    #[test]
    fn read_keys_and_reservation_bytes() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::RegisterAndIgnore, 0, 0x77, 0x1122).unwrap();
        out(&r, A, PrOutAction::Reserve, 3, 0x1122, 0).unwrap();
        let keys = r.reserve_in(PrInAction::ReadKeys);
        assert_eq!(keys, [0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x11, 0x22]);
        let res = r.reserve_in(PrInAction::ReadReservation);
        assert_eq!(res.len(), 24);
        assert_eq!(&res[4..8], &[0, 0, 0, 16]);
        assert_eq!(&res[8..16], &0x1122u64.to_be_bytes());
        assert_eq!(res[21], 3);
        assert!(!r.allows(B, Access::Read));
        assert!(r.allows(B, Access::Any));
    }

    #[test]
    fn preempt_takes_over_and_removes_victim() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 0xB).unwrap();
        out(&r, A, PrOutAction::Reserve, 3, 0xA, 0).unwrap();
        out(&r, B, PrOutAction::Preempt, 3, 0xB, 0xA).unwrap();
        let s = r.snapshot();
        assert_eq!(s.reservation, Some((B, ReservationType::ExclusiveAccess)));
        assert_eq!(s.registrations, vec![(B, 0xB)]);
        // A is no longer registered: its commands conflict.
        assert_eq!(
            out(&r, A, PrOutAction::Reserve, 3, 0xA, 0),
            Err(PrOutError::Conflict)
        );
        // Preempting a key nobody holds.
        assert_eq!(
            out(&r, B, PrOutAction::Preempt, 3, 0xB, 0x5555),
            Err(PrOutError::Conflict)
        );
        // A zero service-action key with a non-all-registrants reservation.
        out(&r, B, PrOutAction::Release, 3, 0xB, 0).unwrap();
        assert_eq!(
            out(&r, B, PrOutAction::Preempt, 3, 0xB, 0),
            Err(PrOutError::Sense(Sense::invalid_param_field(8)))
        );
    }

    #[test]
    fn registrants_only_and_all_registrants() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 0xB).unwrap();
        out(&r, A, PrOutAction::Reserve, 5, 0xA, 0).unwrap();
        assert!(r.allows(B, Access::Write));
        assert!(!r.allows(C, Access::Write));
        assert!(r.allows(C, Access::Read));
        out(&r, A, PrOutAction::Release, 5, 0xA, 0).unwrap();
        out(&r, A, PrOutAction::Reserve, 8, 0xA, 0).unwrap();
        // B is a holder too under all-registrants.
        out(&r, B, PrOutAction::Reserve, 8, 0xB, 0).unwrap();
        assert!(!r.allows(C, Access::Read));
        // The reservation key of an all-registrants reservation reads as zero.
        let res = r.reserve_in(PrInAction::ReadReservation);
        assert_eq!(&res[8..16], &[0; 8]);
        // It survives A leaving and ends with the last registrant.
        out(&r, A, PrOutAction::Register, 0, 0xA, 0).unwrap();
        assert!(r.snapshot().reservation.is_some());
        out(&r, B, PrOutAction::Register, 0, 0xB, 0).unwrap();
        assert_eq!(r.snapshot().reservation, None);
    }

    #[test]
    fn holder_unregistering_drops_reservation_and_clear_empties() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, A, PrOutAction::Reserve, 1, 0xA, 0).unwrap();
        out(&r, A, PrOutAction::Register, 0, 0xA, 0).unwrap();
        assert_eq!(r.snapshot().reservation, None);
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 0xB).unwrap();
        out(&r, A, PrOutAction::Reserve, 1, 0xA, 0).unwrap();
        out(&r, B, PrOutAction::Clear, 0, 0xB, 0).unwrap();
        let s = r.snapshot();
        assert!(s.registrations.is_empty() && s.reservation.is_none());
    }

    #[test]
    fn losers_are_owed_unit_attentions() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 0xA).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 0xB).unwrap();
        out(&r, C, PrOutAction::Register, 0, 0, 0xC).unwrap();
        out(&r, A, PrOutAction::Reserve, 5, 0xA, 0).unwrap();
        // Releasing a registrants-only reservation tells the other registrants.
        out(&r, A, PrOutAction::Release, 5, 0xA, 0).unwrap();
        let released = Sense::new(SenseKey::UnitAttention, asc::RESERVATIONS_RELEASED);
        assert_eq!(r.take_unit_attention(B), Some(released));
        assert_eq!(r.take_unit_attention(C), Some(released));
        assert_eq!(r.take_unit_attention(A), None);
        assert_eq!(r.take_unit_attention(B), None);
        // B preempts A's reservation (type unchanged): only A hears about it.
        out(&r, A, PrOutAction::Reserve, 1, 0xA, 0).unwrap();
        out(&r, B, PrOutAction::Preempt, 1, 0xB, 0xA).unwrap();
        let preempted = Sense::new(SenseKey::UnitAttention, asc::REGISTRATIONS_PREEMPTED);
        assert_eq!(r.take_unit_attention(A), Some(preempted));
        assert_eq!(r.take_unit_attention(C), None);
        // CLEAR preempts everyone else.
        out(&r, B, PrOutAction::Clear, 0, 0xB, 0).unwrap();
        let cleared = Sense::new(SenseKey::UnitAttention, asc::RESERVATIONS_PREEMPTED);
        assert_eq!(r.take_unit_attention(C), Some(cleared));
        assert_eq!(r.take_unit_attention(B), None);
        // A failed command owes nothing.
        assert_eq!(
            out(&r, A, PrOutAction::Clear, 0, 0xA, 0),
            Err(PrOutError::Conflict)
        );
        assert!(r.snapshot().unit_attentions.is_empty());
    }

    #[test]
    fn persist_through_power_loss() {
        let r = SharedReservations::persistent();
        assert_eq!(
            r.reserve_in(PrInAction::ReportCapabilities)[2..4],
            [0x05, 0x80]
        );
        let mut p = params(0, 9);
        p[20] = 0x01;
        r.reserve_out(A, PrOutAction::Register, 0, 0, &p).unwrap();
        assert!(r.snapshot().aptpl);
        assert_eq!(
            r.reserve_in(PrInAction::ReportCapabilities)[2..4],
            [0x05, 0x81]
        );
        // A later REGISTER without APTPL turns it off; the state survives save/restore.
        out(&r, A, PrOutAction::Register, 0, 9, 10).unwrap();
        let snap = r.snapshot();
        assert!(!snap.aptpl);
        let again = SharedReservations::persistent();
        again.restore(snap.clone());
        assert_eq!(again.snapshot(), snap);
    }

    #[test]
    fn hostile_parameters() {
        let r = SharedReservations::new();
        assert_eq!(
            r.reserve_out(A, PrOutAction::Register, 0, 0, &[0; 23]),
            Err(PrOutError::Sense(Sense::parameter_list_length_error()))
        );
        let mut p = params(0, 1);
        p[20] = 0x01; // APTPL
        assert_eq!(
            r.reserve_out(A, PrOutAction::Register, 0, 0, &p),
            Err(PrOutError::Sense(Sense::invalid_param_field(20)))
        );
        out(&r, A, PrOutAction::Register, 0, 0, 1).unwrap();
        // APTPL is ignored by the other actions.
        let mut p = params(1, 0);
        p[20] = 0x01;
        r.reserve_out(A, PrOutAction::Reserve, 0, 1, &p).unwrap();
        r.reserve_out(A, PrOutAction::Release, 0, 1, &p).unwrap();
        // Bad type and bad scope.
        assert!(matches!(
            out(&r, A, PrOutAction::Reserve, 2, 1, 0),
            Err(PrOutError::Sense(s)) if s.asc == 0x24
        ));
        assert!(matches!(
            r.reserve_out(A, PrOutAction::Reserve, 1, 1, &params(1, 0)),
            Err(PrOutError::Sense(s)) if s.asc == 0x24
        ));
        // Unregistered initiator: register with a non-zero key conflicts; zero/zero is a no-op.
        assert_eq!(
            out(&r, B, PrOutAction::Register, 0, 5, 6),
            Err(PrOutError::Conflict)
        );
        out(&r, B, PrOutAction::Register, 0, 0, 0).unwrap();
        assert_eq!(r.snapshot().registrations.len(), 1);
        assert_eq!(
            r.reserve_in(PrInAction::ReportCapabilities),
            [0, 8, 0x04, 0x80, 0xEA, 0x01, 0, 0]
        );
    }

    #[test]
    fn snapshots_the_commands_cannot_produce_fail_the_check() {
        let r = SharedReservations::new();
        out(&r, A, PrOutAction::Register, 0, 0, 1).unwrap();
        out(&r, B, PrOutAction::Register, 0, 0, 2).unwrap();
        out(&r, A, PrOutAction::Reserve, 1, 1, 0).unwrap();
        out(&r, B, PrOutAction::Preempt, 1, 2, 1).unwrap();
        let good = r.snapshot();
        assert_eq!(good.check(), Ok(()));
        assert_eq!(good.unit_attentions.len(), 1);
        let bad = |f: &dyn Fn(&mut ReservationSnapshot)| {
            let mut s = good.clone();
            f(&mut s);
            s.check()
        };
        assert!(bad(&|s| s.registrations[0].1 = 0).is_err());
        assert!(bad(&|s| s.registrations.push((B, 7))).is_err());
        assert!(bad(&|s| s.reservation = Some((C, ReservationType::WriteExclusive))).is_err());
        assert!(bad(&|s| s.unit_attentions.push(s.unit_attentions[0])).is_err());
        assert!(bad(&|s| s.unit_attentions[0].1 = Sense::invalid_param_field(0)).is_err());
    }
}
