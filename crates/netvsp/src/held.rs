//! Receive sections the guest holds: sent to it in transfer-page packets and not yet returned
//! by its completion (by transaction id).
//!
//! Each channel's map lives in [`crate::Shared`] behind a mutex its worker holds for a whole
//! pass (it moves the map in and out, so the data path takes one uncontended lock per pass).
//! Saving sets the NIC's pause flag and then takes each channel's lock: a pass under way
//! finishes first, and a worker that finds the flag set does nothing (no packet into or out
//! of the ring, no section written) until [`crate::NetvspDevice::resume`]. So the saved maps
//! are exactly the packets the ring has given the guest and the guest has not completed.
//!
//! A restored map is checked against the saved section count (no section out of range,
//! none twice, no transaction id twice); the primary then shares out only the sections no
//! channel holds, and a held section becomes free again when the guest completes its packet.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One channel's held sections: transaction id → sections.
pub(crate) type Held = HashMap<u64, Vec<u32>>;

/// One transfer-page packet the guest had not completed at save.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedXfer {
    pub tid: u64,
    pub sections: Vec<u32>,
}

/// A channel's held sections in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedChannel {
    pub index: u16,
    pub held: Vec<SavedXfer>,
}

pub(crate) fn save(index: u16, held: &Held) -> Option<SavedChannel> {
    if held.is_empty() {
        return None;
    }
    let mut held: Vec<SavedXfer> = held
        .iter()
        .map(|(&tid, s)| SavedXfer {
            tid,
            sections: s.clone(),
        })
        .collect();
    held.sort_by_key(|x| x.tid);
    Some(SavedChannel { index, held })
}

/// Each channel's map and every held section, if the saved channels are possible for a NIC
/// of `queues` queues whose receive buffer had `sections` sections.
pub(crate) fn restore(
    channels: &[SavedChannel],
    queues: u16,
    sections: Option<u32>,
) -> Result<(BTreeMap<u16, Held>, Vec<u32>), String> {
    let mut maps = BTreeMap::new();
    let mut all = HashSet::new();
    for c in channels {
        if c.index >= queues {
            return Err(format!("channel {} does not exist", c.index));
        }
        let mut map = Held::new();
        for x in &c.held {
            if x.sections.is_empty() {
                return Err(format!(
                    "channel {}: packet {} holds nothing",
                    c.index, x.tid
                ));
            }
            for &s in &x.sections {
                let Some(n) = sections else {
                    return Err("sections held without a receive buffer".into());
                };
                if s >= n {
                    return Err(format!("channel {}: section {s} of {n}", c.index));
                }
                if !all.insert(s) {
                    return Err(format!("section {s} held twice"));
                }
            }
            if map.insert(x.tid, x.sections.clone()).is_some() {
                return Err(format!("channel {}: packet {} twice", c.index, x.tid));
            }
        }
        if maps.insert(c.index, map).is_some() {
            return Err(format!("channel {} saved twice", c.index));
        }
    }
    Ok((maps, all.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(index: u16, held: &[(u64, &[u32])]) -> SavedChannel {
        SavedChannel {
            index,
            held: held
                .iter()
                .map(|&(tid, s)| SavedXfer {
                    tid,
                    sections: s.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn saved_maps_come_back_and_impossible_ones_are_refused() {
        let mut m = Held::new();
        m.insert(9, vec![3, 4]);
        m.insert(2, vec![7]);
        let saved = save(1, &m).unwrap();
        assert_eq!(saved, ch(1, &[(2, &[7]), (9, &[3, 4])]));
        assert_eq!(save(0, &Held::new()), None);
        let (maps, mut all) = restore(&[saved, ch(0, &[(1, &[0])])], 2, Some(8)).unwrap();
        all.sort();
        assert_eq!((maps[&1].clone(), all), (m, vec![0, 3, 4, 7]));
        for (what, bad, sections) in [
            (
                "channel past the queues",
                vec![ch(2, &[(1, &[0])])],
                Some(8),
            ),
            ("section out of range", vec![ch(0, &[(1, &[8])])], Some(8)),
            ("no receive buffer", vec![ch(0, &[(1, &[0])])], None),
            ("section twice", vec![ch(0, &[(1, &[5, 5])])], Some(8)),
            (
                "section on two channels",
                vec![ch(0, &[(1, &[5])]), ch(1, &[(1, &[5])])],
                Some(8),
            ),
            ("tid twice", vec![ch(0, &[(1, &[5]), (1, &[6])])], Some(8)),
            ("empty packet", vec![ch(0, &[(1, &[])])], Some(8)),
            (
                "channel twice",
                vec![ch(0, &[(1, &[5])]), ch(0, &[(2, &[6])])],
                Some(8),
            ),
            ("huge section", vec![ch(0, &[(1, &[u32::MAX])])], Some(8)),
        ] {
            assert!(restore(&bad, 2, sections).is_err(), "{what} accepted");
        }
    }
}
