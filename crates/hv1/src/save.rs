//! Save/restore and inspection. The saved state is also the inspection view: serialize it
//! to JSON to see every MSR and queued message of the partition.
//!
//! Guest memory (the overlay pages' contents) is saved with guest RAM, not here.

use hvdef::hv::{self, HvMessage, HvMessageHeader, HV_MESSAGE_PAYLOAD_SIZE, SINT_COUNT};
use serde::{Deserialize, Serialize};

use crate::synic::VpState;
use crate::{lock, Partition, PartitionState, MESSAGE_QUEUE_DEPTH};

/// The Hyper-V state of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub guest_os_id: u64,
    pub hypercall: u64,
    pub reference_tsc: u64,
    pub tsc_sequence: u32,
    pub tsc_invariant_control: u64,
    pub crash: [u64; hv::CRASH_PARAM_COUNT],
    /// One entry per VP, in VP index order.
    pub vps: Vec<SavedVp>,
}

/// The SynIC state of one VP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVp {
    pub vp_assist_page: u64,
    pub scontrol: u64,
    pub simp: u64,
    pub siefp: u64,
    pub sints: [u64; SINT_COUNT],
    /// Messages waiting for a slot, oldest first per SINT.
    pub queued: Vec<SavedMessage>,
}

/// A queued SynIC message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMessage {
    pub sint: u8,
    pub message_type: u32,
    pub payload: Vec<u8>,
}

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("saved state has {saved} VPs, the partition has {actual}")]
    VpCount { saved: usize, actual: u32 },
    #[error("VP {vp}: SINT{sint} value {value:#x} is unmasked with a vector below 16")]
    SintVector { vp: usize, sint: usize, value: u64 },
    #[error("VP {vp}: invalid queued message ({reason})")]
    Message { vp: usize, reason: &'static str },
}

impl Partition {
    /// Captures the state (for checkpoints, migration and inspection).
    pub fn save(&self) -> SavedState {
        let s = lock(&self.state);
        let vps = self
            .vps
            .iter()
            .map(|vp| {
                let v = lock(vp);
                let queued = (0..SINT_COUNT)
                    .flat_map(|sint| {
                        v.queue(sint).map(move |m| SavedMessage {
                            sint: sint as u8,
                            message_type: m.header.message_type,
                            payload: m.payload[..m.header.payload_size as usize].to_vec(),
                        })
                    })
                    .collect();
                SavedVp {
                    vp_assist_page: v.vp_assist_page,
                    scontrol: v.scontrol,
                    simp: v.simp,
                    siefp: v.siefp,
                    sints: v.sints,
                    queued,
                }
            })
            .collect();
        SavedState {
            guest_os_id: s.guest_os_id,
            hypercall: s.hypercall,
            reference_tsc: s.reference_tsc,
            tsc_sequence: s.tsc_sequence,
            tsc_invariant_control: s.tsc_invariant_control,
            crash: s.crash,
            vps,
        }
    }

    /// Restores a saved state. Everything is validated first; on error nothing changes.
    /// Guest pages are not rewritten (they come back with guest RAM).
    pub fn restore(&self, saved: &SavedState) -> Result<(), RestoreError> {
        if saved.vps.len() != self.config.vp_count as usize {
            return Err(RestoreError::VpCount {
                saved: saved.vps.len(),
                actual: self.config.vp_count,
            });
        }
        let mut new_vps = Vec::with_capacity(saved.vps.len());
        for (i, sv) in saved.vps.iter().enumerate() {
            let mut v = VpState::new();
            for (sint, &value) in sv.sints.iter().enumerate() {
                if value & hv::SINT_MASKED == 0
                    && ((value & hv::SINT_VECTOR_MASK) as u8) < hv::SINT_MIN_VECTOR
                {
                    return Err(RestoreError::SintVector { vp: i, sint, value });
                }
            }
            v.vp_assist_page = sv.vp_assist_page;
            v.scontrol = sv.scontrol;
            v.simp = sv.simp;
            v.siefp = sv.siefp;
            v.sints = sv.sints;
            for m in &sv.queued {
                let err = |reason| RestoreError::Message { vp: i, reason };
                let sint = m.sint as usize;
                if sint >= SINT_COUNT {
                    return Err(err("SINT out of range"));
                }
                if m.message_type == hv::HVMSG_NONE {
                    return Err(err("message type 0"));
                }
                if m.payload.len() > HV_MESSAGE_PAYLOAD_SIZE {
                    return Err(err("payload larger than 240 bytes"));
                }
                if v.queued(sint) >= MESSAGE_QUEUE_DEPTH {
                    return Err(err("queue deeper than MESSAGE_QUEUE_DEPTH"));
                }
                let mut msg = HvMessage {
                    header: HvMessageHeader {
                        message_type: m.message_type,
                        payload_size: m.payload.len() as u8,
                        ..Default::default()
                    },
                    payload: [0; HV_MESSAGE_PAYLOAD_SIZE],
                };
                msg.payload[..m.payload.len()].copy_from_slice(&m.payload);
                v.push(sint, msg);
            }
            new_vps.push(v);
        }
        let mut s = lock(&self.state);
        *s = PartitionState {
            guest_os_id: saved.guest_os_id,
            hypercall: saved.hypercall,
            reference_tsc: saved.reference_tsc,
            tsc_sequence: saved.tsc_sequence,
            tsc_invariant_control: saved.tsc_invariant_control,
            crash: saved.crash,
        };
        self.sync_hypercall_flag(&s);
        drop(s);
        for (slot, v) in self.vps.iter().zip(new_vps) {
            *lock(slot) = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::partition;
    use hvdef::hv::*;

    #[test]
    fn save_restore_round_trip_through_json() {
        let (p, _mem, _) = partition(2);
        p.msr_write(0, MSR_GUEST_OS_ID, 0x8100 << 48).unwrap();
        p.msr_write(0, MSR_HYPERCALL, 0x1001).unwrap();
        p.msr_write(0, MSR_REFERENCE_TSC, 0x2001).unwrap();
        p.msr_write(0, MSR_CRASH_P1, 77).unwrap();
        p.msr_write(1, MSR_SIMP, 0x5001).unwrap();
        p.msr_write(1, MSR_SINT0 + 2, 0xF3).unwrap();
        p.msr_write(1, MSR_VP_ASSIST_PAGE, 0x9001).unwrap();
        // SynIC not enabled on VP 1 yet: these queue.
        p.post_message(1, 2, 1, b"one").unwrap();
        p.post_message(1, 2, 1, b"two").unwrap();
        p.post_message(1, 5, 9, b"").unwrap();

        let saved = p.save();
        assert_eq!(saved.vps[1].queued.len(), 3);
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedState = serde_json::from_str(&json).unwrap();

        let (q, mem2, _) = partition(2);
        q.restore(&back).unwrap();
        assert_eq!(q.save(), saved);
        assert!(q.hypercalls_enabled());
        assert_eq!(q.msr_read(0, MSR_CRASH_P1), Ok(77));
        assert_eq!(q.queued_messages(1, 2), 2);
        // The restored queue delivers when the SynIC is enabled.
        let a = q.msr_write(1, MSR_SCONTROL, 1).unwrap();
        assert!(a.is_some());
        let mut b = [0u8; 3];
        mem2.read(0x5000 + 2 * 256 + 16, &mut b).unwrap();
        assert_eq!(&b, b"one");
    }

    #[test]
    fn restore_rejects_bad_state_without_changing_anything() {
        let (p, _mem, _) = partition(1);
        p.msr_write(0, MSR_GUEST_OS_ID, 5).unwrap();
        let good = p.save();

        let mut bad = good.clone();
        bad.vps.push(bad.vps[0].clone());
        assert!(matches!(p.restore(&bad), Err(RestoreError::VpCount { .. })));

        let mut bad = good.clone();
        bad.guest_os_id = 99;
        bad.vps[0].sints[3] = 5;
        assert!(matches!(
            p.restore(&bad),
            Err(RestoreError::SintVector { .. })
        ));

        for m in [
            SavedMessage {
                sint: 16,
                message_type: 1,
                payload: vec![],
            },
            SavedMessage {
                sint: 2,
                message_type: 0,
                payload: vec![],
            },
            SavedMessage {
                sint: 2,
                message_type: 1,
                payload: vec![0; 241],
            },
        ] {
            let mut bad = good.clone();
            bad.guest_os_id = 99;
            bad.vps[0].queued.push(m);
            assert!(matches!(p.restore(&bad), Err(RestoreError::Message { .. })));
        }
        let mut bad = good.clone();
        bad.vps[0].queued = vec![
            SavedMessage {
                sint: 2,
                message_type: 1,
                payload: vec![],
            };
            MESSAGE_QUEUE_DEPTH + 1
        ];
        assert!(p.restore(&bad).is_err());
        assert_eq!(p.save(), good);
    }
}
