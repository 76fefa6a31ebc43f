//! A SCSI target: the map from LUN to logical unit, REPORT LUNS, and the answers for LUNs
//! that are not there.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::cdb::Command;
use crate::inquiry;
use crate::sense::Sense;
use crate::{be32, Completion, Data, InitiatorId, LogicalUnit};

/// REPORT LUNS parameter data for `luns` (single-level peripheral addressing).
pub(crate) fn report_luns(
    luns: &[u8],
    select: u8,
    alloc: u32,
    data: &mut Data,
) -> Result<usize, Sense> {
    if alloc < 4 {
        return Err(Sense::invalid_cdb_field(6, None));
    }
    let listed: &[u8] = match select {
        0x00 | 0x02 | 0x11 => luns,
        0x01 | 0x10 | 0x12 => &[], // well-known / administrative LUNs: none here
        _ => return Err(Sense::invalid_cdb_field(2, None)),
    };
    let mut out = Vec::with_capacity(8 + 8 * listed.len());
    out.extend_from_slice(&be32(8 * listed.len() as u32));
    out.extend_from_slice(&[0; 4]);
    for &lun in listed {
        out.extend_from_slice(&[0, lun, 0, 0, 0, 0, 0, 0]);
    }
    Ok(data.reply(&out, alloc))
}

/// The logical units behind one SCSI target, addressed by LUN. Units can be added and
/// removed while commands run.
#[derive(Default)]
pub struct Target {
    luns: RwLock<BTreeMap<u8, Arc<dyn LogicalUnit>>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("luns", &self.luns())
            .finish()
    }
}

impl Target {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `unit` at `lun`, returning the unit it replaces.
    pub fn insert(&self, lun: u8, unit: Arc<dyn LogicalUnit>) -> Option<Arc<dyn LogicalUnit>> {
        self.write().insert(lun, unit)
    }

    pub fn remove(&self, lun: u8) -> Option<Arc<dyn LogicalUnit>> {
        self.write().remove(&lun)
    }

    pub fn get(&self, lun: u8) -> Option<Arc<dyn LogicalUnit>> {
        self.read().get(&lun).cloned()
    }

    /// The LUNs present, ascending.
    pub fn luns(&self) -> Vec<u8> {
        self.read().keys().copied().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u8, Arc<dyn LogicalUnit>>> {
        self.luns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u8, Arc<dyn LogicalUnit>>> {
        self.luns.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Decodes and runs `cdb` on `lun`. REPORT LUNS is answered here for any LUN (Linux
    /// sends it to LUN 0 even when LUN 0 is absent). An absent LUN answers INQUIRY with
    /// peripheral qualifier 3 / type 1Fh, REQUEST SENSE with LOGICAL UNIT NOT SUPPORTED as
    /// parameter data, and everything else with CHECK CONDITION, ILLEGAL REQUEST, LOGICAL
    /// UNIT NOT SUPPORTED (25h): the storage VSP maps that to SRB_STATUS_INVALID_LUN.
    pub fn execute(
        &self,
        lun: u8,
        initiator: InitiatorId,
        cdb: &[u8],
        mut data: Data<'_>,
    ) -> Completion {
        let cmd = match Command::decode(cdb) {
            Ok(c) => c,
            Err(s) => {
                return if self.get(lun).is_some() {
                    Completion::check(s)
                } else {
                    Completion::check(Sense::lun_not_supported())
                };
            }
        };
        if let Command::ReportLuns { select, alloc } = cmd {
            return Completion::from_result(report_luns(&self.luns(), select, alloc, &mut data));
        }
        match self.get(lun) {
            Some(unit) => unit.execute_command(initiator, &cmd, data),
            None => absent(&cmd, &mut data),
        }
    }
}

fn absent(cmd: &Command, data: &mut Data) -> Completion {
    match *cmd {
        Command::Inquiry { evpd, page, alloc } => {
            let bytes = if evpd {
                vec![inquiry::NO_LUN, page, 0, 0]
            } else {
                let mut b = [0u8; 36];
                b[0] = inquiry::NO_LUN;
                b[2] = 0x05;
                b[3] = 0x02;
                b[4] = 31;
                b.to_vec()
            };
            Completion::good(data.reply(&bytes, alloc))
        }
        Command::RequestSense { alloc, .. } => {
            Completion::good(data.reply(&Sense::lun_not_supported().to_fixed(), alloc))
        }
        _ => Completion::check(Sense::lun_not_supported()),
    }
}
