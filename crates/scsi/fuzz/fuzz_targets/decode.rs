//! The CDB decoder alone: never panics, ignores bytes past the operation code's CDB length,
//! and every refusal is well-formed fixed-format sense.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scsi::{Command, SenseKey};

fuzz_target!(|cdb: &[u8]| {
    match Command::decode(cdb) {
        Ok(cmd) => {
            let mut longer = cdb.to_vec();
            longer.extend_from_slice(&[0xFF; 16]);
            assert_eq!(Command::decode(&longer), Ok(cmd));
        }
        Err(sense) => {
            assert_eq!(sense.key, SenseKey::IllegalRequest);
            let fixed = sense.to_fixed();
            assert_eq!((fixed[0], fixed[7]), (0x70, 10));
            if let Some(f) = sense.field {
                assert!(usize::from(f.byte) <= 16);
            }
        }
    }
});
