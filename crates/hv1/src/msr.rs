//! Synthetic MSRs (0x40000000..=0x400001FF).
//!
//! Choices where a guest writes something invalid (each mirrors Hyper-V/KVM behaviour):
//!
//! * Writes to read-only MSRs (VP_INDEX, TIME_REF_COUNT, TSC_FREQUENCY, APIC_FREQUENCY,
//!   SVERSION) raise #GP.
//! * SINTn with an unmasked vector below 16 raises #GP (vectors 0..15 are exceptions). A
//!   masked SINT may hold any vector: the reset value is "masked, vector 0" and guests write
//!   it back when they tear down.
//! * Enabling an overlay page (HYPERCALL, REFERENCE_TSC, SIMP, SIEFP, VP_ASSIST_PAGE) whose
//!   GPA is not guest RAM raises #GP and leaves the MSR unchanged (KVM does the same).
//! * HYPERCALL: enabling while GUEST_OS_ID is 0 is ignored (the value is stored with enable
//!   clear); writing GUEST_OS_ID = 0 disables the hypercall page. Once the locked bit is set,
//!   writes are ignored.
//! * TSC_INVARIANT_CONTROL with bits other than bit 0 raises #GP.
//! * Reserved bits of the other MSRs are stored as written and read back (the TLFS marks them
//!   "preserve"); they have no effect.
//! * Unknown or unimplemented MSRs in the range (RESET, VP_RUNTIME, synthetic timers,
//!   GUEST_IDLE, reenlightenment, ...) read 0 and ignore writes, with a rate-limited log line.
//!   EOI/ICR/TPR never reach this crate when the APIC assist is offered (KVM serves them on its
//!   LAPIC); otherwise they are unknown too. Linux accesses MSRs with the non-`_safe`
//!   accessors, so a #GP would only print "unchecked MSR access" warnings.
//!
//! Enabling a SIMP or SIEFP page (or moving it) zeroes it, as KVM does: the guest sees an empty
//! overlay, never stale messages. Disabling the SIMP drops the VP's queued messages (only
//! kexec, hibernation and CPU offline disable it, and a reconnecting guest must not see the
//! old connection's messages).

use std::sync::atomic::Ordering;

use hvdef::hv;

use crate::{lock, Interrupt, Partition, APIC_FREQUENCY_HZ, HYPERCALL_CODE};

/// Longest crash message read from guest memory (CRASH_P4 is clamped to this).
pub const CRASH_MESSAGE_MAX: usize = 4096;

/// How a synthetic MSR access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    /// Inject #GP (set `run->msr.error = 1`).
    #[error("#GP")]
    Gp,
    /// Not a synthetic MSR (outside 0x40000000..=0x400001FF); the caller handles it.
    #[error("not a Hyper-V synthetic MSR")]
    NotSynthetic,
    /// The caller passed a VP index outside the partition (a host bug).
    #[error("no VP with index {0}")]
    InvalidVp(u32),
}

/// A guest crash notification (CRASH_CTL written with bit 63).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// CRASH_P0..P4 (Linux: P0 = error code, P1..P2 = RIP/…, P3/P4 = message GPA/size).
    pub params: [u64; hv::CRASH_PARAM_COUNT],
    /// The crash message (kmsg tail) when CRASH_CTL also had bit 62: up to
    /// [`CRASH_MESSAGE_MAX`] bytes at GPA P3, decoded lossily as UTF-8, trailing NULs removed.
    /// `None` without bit 62 or when P3/P4 do not describe guest RAM.
    pub message: Option<String>,
}

/// Something the caller must do after an MSR write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsrAction {
    /// Inject these interrupts: queued messages or pending events became deliverable (EOM,
    /// SINT unmask, SIMP or SCONTROL enable).
    Interrupts(Vec<Interrupt>),
    /// The guest crashed; log the report.
    GuestCrash(CrashReport),
    /// The VP assist page moved (`Some(gpa)`) or was disabled (`None`) while the APIC assist is
    /// offered: point the in-kernel LAPIC's paravirtual EOI at its first byte, or turn it off.
    /// Bit 0 of that byte means the same to KVM (PV EOI) and to a Hyper-V guest (apic_assist:
    /// "no EOI needed"), so the guest skips the EOI, and its exit, for most interrupts.
    LazyEoi(Option<u64>),
}

fn interrupts(v: Vec<Interrupt>) -> Option<MsrAction> {
    (!v.is_empty()).then_some(MsrAction::Interrupts(v))
}

fn in_range(msr: u32) -> bool {
    (hv::MSR_RANGE_START..=hv::MSR_RANGE_END).contains(&msr)
}

impl Partition {
    /// Handles RDMSR of a synthetic MSR on VP `vp`.
    pub fn msr_read(&self, vp: u32, msr: u32) -> Result<u64, MsrError> {
        if !in_range(msr) {
            return Err(MsrError::NotSynthetic);
        }
        if vp >= self.config.vp_count {
            return Err(MsrError::InvalidVp(vp));
        }
        let value = match msr {
            hv::MSR_GUEST_OS_ID => lock(&self.state).guest_os_id,
            hv::MSR_HYPERCALL => lock(&self.state).hypercall,
            hv::MSR_VP_INDEX => vp as u64,
            hv::MSR_TIME_REF_COUNT => self.reference_time(),
            hv::MSR_REFERENCE_TSC => lock(&self.state).reference_tsc,
            hv::MSR_TSC_FREQUENCY => self.tsc_hz,
            hv::MSR_APIC_FREQUENCY => APIC_FREQUENCY_HZ,
            hv::MSR_TSC_INVARIANT_CONTROL => lock(&self.state).tsc_invariant_control,
            hv::MSR_CRASH_P0..=hv::MSR_CRASH_P4 => {
                lock(&self.state).crash[(msr - hv::MSR_CRASH_P0) as usize]
            }
            // The crash features we support: notify, with a message.
            hv::MSR_CRASH_CTL => hv::CRASH_CTL_NOTIFY | hv::CRASH_CTL_NOTIFY_MSG,
            hv::MSR_VP_ASSIST_PAGE => self.vp_state(vp)?.vp_assist_page,
            hv::MSR_SCONTROL => self.vp_state(vp)?.scontrol,
            hv::MSR_SVERSION => hv::SYNIC_VERSION,
            hv::MSR_SIEFP => self.vp_state(vp)?.siefp,
            hv::MSR_SIMP => self.vp_state(vp)?.simp,
            hv::MSR_EOM => 0,
            hv::MSR_SINT0..=hv::MSR_SINT15 => {
                self.vp_state(vp)?.sints[(msr - hv::MSR_SINT0) as usize]
            }
            _ => {
                if self.log_limit.allow() {
                    tracing::info!(
                        vp,
                        msr = format_args!("{msr:#x}"),
                        "unhandled rdmsr, returning 0"
                    );
                }
                0
            }
        };
        Ok(value)
    }

    /// Handles WRMSR of a synthetic MSR on VP `vp`.
    pub fn msr_write(&self, vp: u32, msr: u32, value: u64) -> Result<Option<MsrAction>, MsrError> {
        if !in_range(msr) {
            return Err(MsrError::NotSynthetic);
        }
        if vp >= self.config.vp_count {
            return Err(MsrError::InvalidVp(vp));
        }
        match msr {
            hv::MSR_GUEST_OS_ID => {
                let mut s = lock(&self.state);
                s.guest_os_id = value;
                if value == 0 {
                    s.hypercall &= !hv::HYPERCALL_ENABLE;
                    self.sync_hypercall_flag(&s);
                }
            }
            hv::MSR_HYPERCALL => self.write_hypercall(value)?,
            hv::MSR_REFERENCE_TSC => self.write_reference_tsc(value)?,
            hv::MSR_TSC_INVARIANT_CONTROL => {
                if value & !hv::TSC_INVARIANT_EXPOSE != 0 {
                    return Err(MsrError::Gp);
                }
                lock(&self.state).tsc_invariant_control = value;
            }
            hv::MSR_VP_INDEX
            | hv::MSR_TIME_REF_COUNT
            | hv::MSR_TSC_FREQUENCY
            | hv::MSR_APIC_FREQUENCY
            | hv::MSR_SVERSION => return Err(MsrError::Gp),
            hv::MSR_CRASH_P0..=hv::MSR_CRASH_P4 => {
                lock(&self.state).crash[(msr - hv::MSR_CRASH_P0) as usize] = value;
            }
            hv::MSR_CRASH_CTL => return Ok(self.write_crash_ctl(value)),
            hv::MSR_VP_ASSIST_PAGE => return self.write_vp_assist_page(vp, value),
            hv::MSR_SCONTROL => {
                let mut s = self.vp_state(vp)?;
                let was = s.scontrol & hv::SCONTROL_ENABLE != 0;
                s.scontrol = value;
                if !was && value & hv::SCONTROL_ENABLE != 0 {
                    return Ok(interrupts(s.kick_all(&self.mem, vp)));
                }
            }
            hv::MSR_SIMP => {
                let mut s = self.vp_state(vp)?;
                let old = s.simp;
                self.enable_overlay(old, value)?;
                s.simp = value;
                if value & hv::OVERLAY_ENABLE == 0 {
                    let dropped = s.drop_queues();
                    if dropped != 0 && self.log_limit.allow() {
                        tracing::info!(vp, dropped, "SIMP disabled; dropped queued messages");
                    }
                } else if old & hv::OVERLAY_ENABLE == 0 {
                    let mut out = Vec::new();
                    s.flush_all(&self.mem, vp, &mut out);
                    return Ok(interrupts(out));
                }
            }
            hv::MSR_SIEFP => {
                let mut s = self.vp_state(vp)?;
                self.enable_overlay(s.siefp, value)?;
                s.siefp = value;
            }
            hv::MSR_EOM => {
                let mut s = self.vp_state(vp)?;
                let mut out = Vec::new();
                s.flush_all(&self.mem, vp, &mut out);
                return Ok(interrupts(out));
            }
            hv::MSR_SINT0..=hv::MSR_SINT15 => {
                let sint = (msr - hv::MSR_SINT0) as usize;
                let masked = value & hv::SINT_MASKED != 0;
                if !masked && ((value & hv::SINT_VECTOR_MASK) as u8) < hv::SINT_MIN_VECTOR {
                    return Err(MsrError::Gp);
                }
                if !masked && value & hv::SINT_AUTO_EOI != 0 && self.log_limit.allow() {
                    // KVM cannot clear the ISR bit for the guest. Guests that honour the
                    // "deprecating AutoEOI" hint never ask for it.
                    tracing::warn!(vp, sint, "guest enabled AutoEOI, which is not emulated");
                }
                let mut s = self.vp_state(vp)?;
                let was_masked = s.sints[sint] & hv::SINT_MASKED != 0;
                s.sints[sint] = value;
                if was_masked && !masked {
                    let mut out: Vec<_> = s.flush(&self.mem, vp, sint).into_iter().collect();
                    if out.is_empty() {
                        out.extend(s.pending_events(&self.mem, vp, sint));
                    }
                    return Ok(interrupts(out));
                }
            }
            _ => {
                if self.log_limit.allow() {
                    tracing::info!(
                        vp,
                        msr = format_args!("{msr:#x}"),
                        value = format_args!("{value:#x}"),
                        "unhandled wrmsr, ignored"
                    );
                }
            }
        }
        Ok(None)
    }

    /// The VP assist page. With the APIC assist offered, enabling it clears its first word
    /// (apic_assist: no EOI owed yet) and asks for lazy EOI at its address; disabling it asks to
    /// stop. Without it the page is only stored.
    fn write_vp_assist_page(&self, vp: u32, value: u64) -> Result<Option<MsrAction>, MsrError> {
        self.check_overlay(value)?;
        let mut s = self.vp_state(vp)?;
        if !self.config.apic_assist {
            s.vp_assist_page = value;
            return Ok(None);
        }
        let page = (value & hv::OVERLAY_ENABLE != 0).then_some(value & hv::OVERLAY_GPA_MASK);
        if let Some(gpa) = page {
            self.mem
                .store_u32(gpa, 0, Ordering::Release)
                .map_err(|_| MsrError::Gp)?;
        }
        s.vp_assist_page = value;
        Ok(Some(MsrAction::LazyEoi(page)))
    }

    fn vp_state(
        &self,
        vp: u32,
    ) -> Result<std::sync::MutexGuard<'_, crate::synic::VpState>, MsrError> {
        self.vp(vp).ok_or(MsrError::InvalidVp(vp))
    }

    /// #GP if `value` enables a page that is not guest RAM.
    fn check_overlay(&self, value: u64) -> Result<(), MsrError> {
        if value & hv::OVERLAY_ENABLE != 0
            && !self
                .mem
                .contains(value & hv::OVERLAY_GPA_MASK, hv::HV_PAGE_SIZE)
        {
            return Err(MsrError::Gp);
        }
        Ok(())
    }

    /// Checks a SIMP/SIEFP write and, when it enables the page or moves it, zeroes the new
    /// page.
    fn enable_overlay(&self, old: u64, value: u64) -> Result<(), MsrError> {
        self.check_overlay(value)?;
        let enabling = value & hv::OVERLAY_ENABLE != 0;
        let same = old & hv::OVERLAY_ENABLE != 0
            && old & hv::OVERLAY_GPA_MASK == value & hv::OVERLAY_GPA_MASK;
        if enabling && !same {
            self.mem
                .zero(value & hv::OVERLAY_GPA_MASK, hv::HV_PAGE_SIZE)
                .map_err(|_| MsrError::Gp)?;
        }
        Ok(())
    }

    fn write_hypercall(&self, mut value: u64) -> Result<(), MsrError> {
        let mut s = lock(&self.state);
        if s.hypercall & hv::HYPERCALL_LOCKED != 0 {
            return Ok(());
        }
        if value & hv::HYPERCALL_ENABLE != 0 {
            if s.guest_os_id == 0 {
                value &= !hv::HYPERCALL_ENABLE;
            } else {
                let gpa = value & hv::OVERLAY_GPA_MASK;
                let mut page = [0xCCu8; hv::HV_PAGE_SIZE as usize];
                page[..HYPERCALL_CODE.len()].copy_from_slice(&HYPERCALL_CODE);
                self.mem.write(gpa, &page).map_err(|_| MsrError::Gp)?;
            }
        }
        s.hypercall = value;
        self.sync_hypercall_flag(&s);
        Ok(())
    }

    fn write_reference_tsc(&self, value: u64) -> Result<(), MsrError> {
        self.check_overlay(value)?;
        let mut s = lock(&self.state);
        if value & hv::OVERLAY_ENABLE != 0 {
            let gpa = value & hv::OVERLAY_GPA_MASK;
            // Sequence 0 and u32::MAX are avoided (0 means "invalid").
            let seq = match s.tsc_sequence.wrapping_add(1) {
                0 | u32::MAX => 1,
                n => n,
            };
            let mut header = [0u8; hv::HV_REFERENCE_TSC_HEADER_SIZE];
            header[8..16].copy_from_slice(&self.tsc_scale.to_le_bytes());
            // tsc_offset (bytes 16..24) is 0: reference time counts from guest TSC 0.
            let write = || -> Result<(), guestmem::Error> {
                self.mem.store_u32(gpa, 0, Ordering::SeqCst)?;
                self.mem.zero(gpa + 24, hv::HV_PAGE_SIZE - 24)?;
                self.mem.write(gpa + 4, &header[4..])?;
                self.mem.store_u32(gpa, seq, Ordering::Release)
            };
            write().map_err(|_| MsrError::Gp)?;
            s.tsc_sequence = seq;
        }
        s.reference_tsc = value;
        Ok(())
    }

    fn write_crash_ctl(&self, value: u64) -> Option<MsrAction> {
        if value & hv::CRASH_CTL_NOTIFY == 0 {
            return None;
        }
        let params = lock(&self.state).crash;
        let message = (value & hv::CRASH_CTL_NOTIFY_MSG != 0)
            .then(|| self.read_crash_message(params[3], params[4]))
            .flatten();
        Some(MsrAction::GuestCrash(CrashReport { params, message }))
    }

    fn read_crash_message(&self, gpa: u64, size: u64) -> Option<String> {
        let len = size.min(CRASH_MESSAGE_MAX as u64) as usize;
        let mut buf = vec![0u8; len];
        if let Err(e) = self.mem.read(gpa, &mut buf) {
            if self.log_limit.allow() {
                tracing::warn!(gpa, size, error = %e, "guest crash message is not in guest RAM");
            }
            return None;
        }
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The reference TSC scale (tests).
    #[cfg(test)]
    pub(crate) fn tsc_scale(&self) -> u64 {
        self.tsc_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{partition, RAM, TSC_HZ};
    use crate::time;
    use hvdef::hv::*;
    use zerocopy::FromBytes;

    #[test]
    fn outside_range_and_bad_vp() {
        let (p, _, _) = partition(2);
        assert_eq!(p.msr_read(0, 0x3FFF_FFFF), Err(MsrError::NotSynthetic));
        assert_eq!(p.msr_read(0, 0x4000_0200), Err(MsrError::NotSynthetic));
        assert_eq!(p.msr_write(0, 0x10, 0), Err(MsrError::NotSynthetic));
        assert_eq!(p.msr_read(2, MSR_VP_INDEX), Err(MsrError::InvalidVp(2)));
        assert_eq!(p.msr_write(9, MSR_SCONTROL, 1), Err(MsrError::InvalidVp(9)));
    }

    #[test]
    fn guest_os_id_and_hypercall_page() {
        let (p, mem, _) = partition(1);
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0));
        // Enable before GUEST_OS_ID: ignored (stored without enable), page untouched.
        p.msr_write(0, MSR_HYPERCALL, 0x3000 | 1).unwrap();
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0x3000));
        assert!(!p.hypercalls_enabled());
        assert_eq!(mem.read_obj::<u32>(0x3000).unwrap(), 0);

        let os_id = 0x8100u64 << 48 | 0x060C_0000;
        p.msr_write(0, MSR_GUEST_OS_ID, os_id).unwrap();
        assert_eq!(p.msr_read(0, MSR_GUEST_OS_ID), Ok(os_id));
        assert_eq!(p.msr_write(0, MSR_HYPERCALL, 0x3000 | 1), Ok(None));
        // Read-back includes the enable bit.
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0x3001));
        assert!(p.hypercalls_enabled());
        let mut page = [0u8; 4096];
        mem.read(0x3000, &mut page).unwrap();
        assert_eq!(&page[..4], &[0xF3, 0x0F, 0x1E, 0xFA], "ENDBR64 first");
        assert_eq!(&page[..32], &HYPERCALL_CODE);
        assert!(page[32..].iter().all(|&b| b == 0xCC));

        // Outside RAM: #GP, state unchanged.
        assert_eq!(p.msr_write(0, MSR_HYPERCALL, RAM | 1), Err(MsrError::Gp));
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0x3001));

        // GUEST_OS_ID = 0 disables hypercalls (kexec cleanup).
        p.msr_write(0, MSR_GUEST_OS_ID, 0).unwrap();
        assert!(!p.hypercalls_enabled());
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0x3000));
        // A 0 write disables.
        p.msr_write(0, MSR_GUEST_OS_ID, os_id).unwrap();
        p.msr_write(0, MSR_HYPERCALL, 0x3001).unwrap();
        p.msr_write(0, MSR_HYPERCALL, 0).unwrap();
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0));

        // Locked: later writes are ignored.
        p.msr_write(0, MSR_HYPERCALL, 0x4000 | HYPERCALL_LOCKED | 1)
            .unwrap();
        p.msr_write(0, MSR_HYPERCALL, 0).unwrap();
        assert_eq!(
            p.msr_read(0, MSR_HYPERCALL),
            Ok(0x4000 | HYPERCALL_LOCKED | 1)
        );
        // A reset unlocks.
        p.reset();
        assert_eq!(p.msr_read(0, MSR_HYPERCALL), Ok(0));
        assert!(!p.hypercalls_enabled());
    }

    #[test]
    fn read_only_msrs() {
        let (p, _, _) = partition(3);
        assert_eq!(p.msr_read(2, MSR_VP_INDEX), Ok(2));
        assert_eq!(p.msr_read(0, MSR_TSC_FREQUENCY), Ok(TSC_HZ));
        assert_eq!(p.msr_read(0, MSR_APIC_FREQUENCY), Ok(1_000_000_000));
        assert_eq!(p.msr_read(0, MSR_SVERSION), Ok(1));
        for msr in [
            MSR_VP_INDEX,
            MSR_TIME_REF_COUNT,
            MSR_TSC_FREQUENCY,
            MSR_APIC_FREQUENCY,
            MSR_SVERSION,
        ] {
            assert_eq!(p.msr_write(0, msr, 0), Err(MsrError::Gp), "{msr:#x}");
        }
        assert_eq!(p.msr_read(2, MSR_VP_INDEX), Ok(2));
    }

    #[test]
    fn time_ref_count_and_tsc_page() {
        let (p, mem, time) = partition(1);
        time.set_tsc(TSC_HZ * 3); // three seconds
        let t = p.msr_read(0, MSR_TIME_REF_COUNT).unwrap();
        assert!((29_999_999..=30_000_000).contains(&t), "{t}");
        time.advance(TSC_HZ / 1000);
        let t2 = p.msr_read(0, MSR_TIME_REF_COUNT).unwrap();
        assert!((10_000 - 1..=10_000 + 1).contains(&(t2 - t)), "{}", t2 - t);

        assert_eq!(p.msr_read(0, MSR_REFERENCE_TSC), Ok(0));
        mem.write(0x7000, &[0xAA; 4096]).unwrap();
        p.msr_write(0, MSR_REFERENCE_TSC, 0x7000 | 1).unwrap();
        assert_eq!(p.msr_read(0, MSR_REFERENCE_TSC), Ok(0x7001));
        let page: HvReferenceTscPage = mem.read_obj(0x7000).unwrap();
        assert_ne!(page.tsc_sequence, 0);
        assert_eq!(page.reserved1, 0);
        assert_eq!(
            page.tsc_scale,
            ((10_000_000u128 << 64) / TSC_HZ as u128) as u64
        );
        assert_eq!(page.tsc_scale, p.tsc_scale());
        assert_eq!(page.tsc_offset, 0);
        assert!(page.reserved2.iter().all(|&w| w == 0));
        // The page and the MSR agree exactly, as the guest computes it.
        for tsc in [0, 1, TSC_HZ, 123_456_789_012, u64::MAX / 3] {
            time.set_tsc(tsc);
            let from_page = time::reference_time(tsc, page.tsc_scale, page.tsc_offset);
            assert_eq!(p.msr_read(0, MSR_TIME_REF_COUNT), Ok(from_page));
            assert_eq!(from_page, time::reference_time(tsc, p.tsc_scale(), 0));
        }
        // Re-enabling writes a new, different non-zero sequence.
        p.msr_write(0, MSR_REFERENCE_TSC, 0x7000 | 1).unwrap();
        let page2: HvReferenceTscPage = mem.read_obj(0x7000).unwrap();
        assert_ne!(page2.tsc_sequence, 0);
        assert_ne!(page2.tsc_sequence, page.tsc_sequence);
        // Disable; outside RAM is #GP.
        p.msr_write(0, MSR_REFERENCE_TSC, 0x7000).unwrap();
        assert_eq!(p.msr_read(0, MSR_REFERENCE_TSC), Ok(0x7000));
        assert_eq!(
            p.msr_write(0, MSR_REFERENCE_TSC, (RAM + 0x1000) | 1),
            Err(MsrError::Gp)
        );
        assert_eq!(p.msr_read(0, MSR_REFERENCE_TSC), Ok(0x7000));
    }

    #[test]
    fn tsc_invariant_control() {
        let (p, _, _) = partition(1);
        assert_eq!(p.msr_write(0, MSR_TSC_INVARIANT_CONTROL, 1), Ok(None));
        assert_eq!(p.msr_read(0, MSR_TSC_INVARIANT_CONTROL), Ok(1));
        assert_eq!(
            p.msr_write(0, MSR_TSC_INVARIANT_CONTROL, 2),
            Err(MsrError::Gp)
        );
        assert_eq!(p.msr_read(0, MSR_TSC_INVARIANT_CONTROL), Ok(1));
    }

    #[test]
    fn crash_msrs() {
        let (p, mem, _) = partition(1);
        assert_eq!(p.msr_read(0, MSR_CRASH_CTL), Ok(3 << 62));
        for i in 0..5 {
            p.msr_write(0, MSR_CRASH_P0 + i, 0x100 + i as u64).unwrap();
        }
        assert_eq!(p.msr_read(0, MSR_CRASH_P2), Ok(0x102));
        // CTL without bit 63: nothing.
        assert_eq!(p.msr_write(0, MSR_CRASH_CTL, 0), Ok(None));
        // Notify without message.
        let a = p.msr_write(0, MSR_CRASH_CTL, CRASH_CTL_NOTIFY).unwrap();
        assert_eq!(
            a,
            Some(MsrAction::GuestCrash(CrashReport {
                params: [0x100, 0x101, 0x102, 0x103, 0x104],
                message: None
            }))
        );
        // With a message at P3/P4 (NUL padded).
        let text = b"Kernel panic - not syncing: VFS\n\0\0\0";
        mem.write(0x9000, text).unwrap();
        p.msr_write(0, MSR_CRASH_P3, 0x9000).unwrap();
        p.msr_write(0, MSR_CRASH_P4, text.len() as u64).unwrap();
        let Some(MsrAction::GuestCrash(r)) = p
            .msr_write(0, MSR_CRASH_CTL, CRASH_CTL_NOTIFY | CRASH_CTL_NOTIFY_MSG)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            r.message.as_deref(),
            Some("Kernel panic - not syncing: VFS\n")
        );
        // Hostile size: clamped to 4 KiB.
        mem.write(0x10000, &[b'A'; 8192]).unwrap();
        p.msr_write(0, MSR_CRASH_P3, 0x10000).unwrap();
        p.msr_write(0, MSR_CRASH_P4, u64::MAX).unwrap();
        let Some(MsrAction::GuestCrash(r)) = p.msr_write(0, MSR_CRASH_CTL, 3 << 62).unwrap() else {
            panic!()
        };
        assert_eq!(r.message.unwrap().len(), CRASH_MESSAGE_MAX);
        // Hostile GPA: report without a message.
        p.msr_write(0, MSR_CRASH_P3, RAM - 16).unwrap();
        p.msr_write(0, MSR_CRASH_P4, 64).unwrap();
        let Some(MsrAction::GuestCrash(r)) = p.msr_write(0, MSR_CRASH_CTL, 3 << 62).unwrap() else {
            panic!()
        };
        assert_eq!(r.message, None);
        assert_eq!(r.params[3], RAM - 16);
    }

    #[test]
    fn vp_assist_page_asks_for_lazy_eoi_only_with_the_apic_assist() {
        // Without the APIC assist (the test partition's default) the page is only stored.
        let (p, mem, _) = partition(1);
        mem.write(0x8000, &[0xEE; 8]).unwrap();
        assert_eq!(p.msr_write(0, MSR_VP_ASSIST_PAGE, 0x8001), Ok(None));
        assert_eq!(mem.read_obj::<u64>(0x8000).unwrap(), 0xEEEE_EEEE_EEEE_EEEE);

        let time = std::sync::Arc::new(time::ManualTime::new(TSC_HZ));
        let config = crate::PartitionConfig {
            vp_count: 2,
            invariant_tsc: false,
            apic_assist: true,
        };
        let p = Partition::new(config, mem.clone(), time).unwrap();
        // Enabling clears apic_assist (the first u32) and nothing else, then asks for lazy
        // EOI at the page; reading back gives what was written.
        assert_eq!(
            p.msr_write(1, MSR_VP_ASSIST_PAGE, 0x8001),
            Ok(Some(MsrAction::LazyEoi(Some(0x8000))))
        );
        assert_eq!(mem.read_obj::<u64>(0x8000).unwrap(), 0xEEEE_EEEE_0000_0000);
        assert_eq!(p.msr_read(1, MSR_VP_ASSIST_PAGE), Ok(0x8001));
        assert_eq!(p.msr_read(0, MSR_VP_ASSIST_PAGE), Ok(0));
        // Disabling asks to stop; the page is not touched.
        mem.write(0x8000, &[0xEE; 4]).unwrap();
        assert_eq!(
            p.msr_write(1, MSR_VP_ASSIST_PAGE, 0x8000),
            Ok(Some(MsrAction::LazyEoi(None)))
        );
        assert_eq!(mem.read_obj::<u32>(0x8000).unwrap(), 0xEEEE_EEEE);
        // A page outside RAM is #GP and changes nothing.
        assert_eq!(
            p.msr_write(1, MSR_VP_ASSIST_PAGE, RAM | 1),
            Err(MsrError::Gp)
        );
        assert_eq!(p.msr_read(1, MSR_VP_ASSIST_PAGE), Ok(0x8000));
    }

    #[test]
    fn per_vp_synic_msrs_and_reset_values() {
        let (p, mem, _) = partition(2);
        for vp in 0..2 {
            assert_eq!(p.msr_read(vp, MSR_SCONTROL), Ok(0));
            assert_eq!(p.msr_read(vp, MSR_SIMP), Ok(0));
            assert_eq!(p.msr_read(vp, MSR_SIEFP), Ok(0));
            assert_eq!(p.msr_read(vp, MSR_EOM), Ok(0));
            assert_eq!(p.msr_read(vp, MSR_VP_ASSIST_PAGE), Ok(0));
            for n in 0..16 {
                assert_eq!(p.msr_read(vp, MSR_SINT0 + n), Ok(0x10000));
            }
        }
        mem.write(0x5000, &[0xEE; 4096]).unwrap();
        p.msr_write(1, MSR_SIMP, 0x5001).unwrap();
        p.msr_write(1, MSR_SIEFP, 0x6001).unwrap();
        p.msr_write(1, MSR_SCONTROL, 1).unwrap();
        p.msr_write(1, MSR_SINT0 + 2, 0xF3).unwrap();
        p.msr_write(1, MSR_VP_ASSIST_PAGE, 0x8001).unwrap();
        assert_eq!(p.msr_read(1, MSR_SIMP), Ok(0x5001));
        assert_eq!(p.msr_read(1, MSR_SIEFP), Ok(0x6001));
        assert_eq!(p.msr_read(1, MSR_SCONTROL), Ok(1));
        assert_eq!(p.msr_read(1, MSR_SINT0 + 2), Ok(0xF3));
        assert_eq!(p.msr_read(1, MSR_VP_ASSIST_PAGE), Ok(0x8001));
        assert!(p.synic_enabled(1));
        // VP 0 is independent.
        assert_eq!(p.msr_read(0, MSR_SIMP), Ok(0));
        assert_eq!(p.msr_read(0, MSR_SINT0 + 2), Ok(0x10000));
        assert!(!p.synic_enabled(0));
        // Enabling SIMP zeroed the page.
        let page = mem.read_obj::<HvMessagePage>(0x5000).unwrap();
        assert!(page.as_bytes_all_zero());
        // Overlays outside RAM.
        for msr in [MSR_SIMP, MSR_SIEFP, MSR_VP_ASSIST_PAGE] {
            assert_eq!(p.msr_write(1, msr, RAM | 1), Err(MsrError::Gp), "{msr:#x}");
            // Disabled with a bogus GPA is fine (nothing is accessed).
            assert_eq!(p.msr_write(0, msr, RAM), Ok(None), "{msr:#x}");
        }
        assert_eq!(p.msr_read(1, MSR_SIMP), Ok(0x5001));
    }

    #[test]
    fn sint_vector_validation() {
        let (p, _, _) = partition(1);
        for v in 0..16u64 {
            assert_eq!(p.msr_write(0, MSR_SINT0 + 2, v), Err(MsrError::Gp));
            // Masked: any vector is accepted.
            assert_eq!(p.msr_write(0, MSR_SINT0 + 2, v | SINT_MASKED), Ok(None));
        }
        assert_eq!(p.msr_read(0, MSR_SINT0 + 2), Ok(15 | SINT_MASKED));
        assert_eq!(p.msr_write(0, MSR_SINT0 + 15, 16), Ok(None));
        assert_eq!(p.msr_read(0, MSR_SINT0 + 15), Ok(16));
        // AutoEOI/polling bits are stored.
        let v = 0xF3 | SINT_AUTO_EOI | SINT_POLLING;
        p.msr_write(0, MSR_SINT0 + 5, v).unwrap();
        assert_eq!(p.msr_read(0, MSR_SINT0 + 5), Ok(v));
    }

    #[test]
    fn unknown_msrs_read_zero_and_accept_writes() {
        let (p, _, _) = partition(1);
        for msr in [
            MSR_RESET,
            MSR_VP_RUNTIME,
            MSR_EOI,
            MSR_STIMER0_CONFIG,
            MSR_GUEST_IDLE,
            MSR_REENLIGHTENMENT_CONTROL,
            0x4000_01FF,
            0x4000_0150,
        ] {
            assert_eq!(p.msr_write(0, msr, 0xDEAD), Ok(None), "{msr:#x}");
            assert_eq!(p.msr_read(0, msr), Ok(0), "{msr:#x}");
        }
    }

    trait AllZero {
        fn as_bytes_all_zero(&self) -> bool;
    }
    impl AllZero for HvMessagePage {
        fn as_bytes_all_zero(&self) -> bool {
            zerocopy::IntoBytes::as_bytes(self).iter().all(|&b| b == 0)
        }
    }

    #[test]
    fn page_struct_layout() {
        let mut b = [0u8; 4096];
        b[0] = 1;
        b[8] = 2;
        let p = HvReferenceTscPage::read_from_bytes(&b).unwrap();
        assert_eq!((p.tsc_sequence, p.tsc_scale), (1, 2));
    }
}
