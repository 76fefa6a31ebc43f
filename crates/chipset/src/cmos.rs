//! CMOS RAM with an MC146818 real-time clock that shows the host's time (UTC).

use std::time::{SystemTime, UNIX_EPOCH};

pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
/// The century register named in the FADT.
pub const CENTURY: u8 = 0x32;

/// Status B bit: binary (not BCD) mode.
const B_BINARY: u8 = 0x04;
/// Status B bit: 24-hour mode.
const B_24H: u8 = 0x02;

/// CMOS RAM and RTC.
pub struct Cmos {
    pub(crate) index: u8,
    pub(crate) ram: [u8; 128],
    /// Seconds added to the host clock (the guest may set its RTC).
    pub(crate) offset_secs: i64,
}

impl Cmos {
    /// `below_4g` and `above_4g` are RAM sizes recorded in the usual CMOS bytes for firmware that
    /// reads them (Linux uses the e820 map instead).
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A as usize] = 0x26;
        ram[STATUS_B as usize] = B_24H;
        ram[STATUS_D as usize] = 0x80; // valid RAM and time
                                       // Extended memory above 16 MiB in 64 KiB units (0x34/0x35), capped.
        let ext = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&ext.to_le_bytes());
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        Self {
            index: 0,
            ram,
            offset_secs: 0,
        }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = if port == INDEX_PORT {
            self.index
        } else {
            self.read_register(self.index)
        };
        data.fill(0);
        data[0] = value;
    }

    pub fn write(&mut self, port: u16, data: &[u8]) {
        let value = data[0];
        if port == INDEX_PORT {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = value & 0x7f;
            return;
        }
        match self.index {
            SECONDS | MINUTES | HOURS | DAY | MONTH | YEAR | CENTURY => {
                self.ram[self.index as usize] = value;
                self.offset_secs = self.guest_time_offset();
            }
            STATUS_C | STATUS_D => {}
            i => self.ram[i as usize] = value,
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.ram[STATUS_B as usize] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.ram[STATUS_B as usize] & B_BINARY != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn now(&self) -> i64 {
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        host + self.offset_secs
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let t = civil_from_unix(self.now());
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode(t.hour),
            WEEKDAY => self.encode(t.weekday + 1),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            CENTURY => self.encode((t.year / 100) as u8),
            // Never report "update in progress".
            STATUS_A => self.ram[STATUS_A as usize] & 0x7f,
            STATUS_C => std::mem::take(&mut self.ram[STATUS_C as usize]),
            i => self.ram[i as usize],
        }
    }

    /// The offset between the time the guest wrote into the clock registers and the host time.
    fn guest_time_offset(&self) -> i64 {
        let r = |i: u8| self.decode(self.ram[i as usize]);
        let year = i64::from(r(CENTURY)) * 100 + i64::from(r(YEAR));
        let (month, day) = (r(MONTH).clamp(1, 12), r(DAY).clamp(1, 31));
        let days = days_from_civil(year, month, day);
        let secs = days * 86400
            + i64::from(r(HOURS).min(23)) * 3600
            + i64::from(r(MINUTES).min(59)) * 60
            + i64::from(r(SECONDS).min(59));
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        secs - host
    }
}

struct Civil {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem % 3600 / 60) as u8,
        second: (rem % 60) as u8,
        weekday: (days + 4).rem_euclid(7) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(c: &mut Cmos, i: u8) -> u8 {
        c.write(INDEX_PORT, &[i]);
        let mut d = [0];
        c.read(DATA_PORT, &mut d);
        d[0]
    }

    #[test]
    fn civil_conversions_round_trip() {
        // 2026-11-25 18:49:25 UTC, a Wednesday.
        let t = civil_from_unix(1_795_632_565);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 25));
        assert_eq!((t.hour, t.minute, t.second, t.weekday), (18, 49, 25, 3));
        assert_eq!(days_from_civil(2026, 11, 25) * 86400, 1_795_564_800);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
    }

    #[test]
    fn clock_shows_host_time_in_bcd() {
        let mut c = Cmos::new(512 << 20, 0);
        let now = civil_from_unix(c.now());
        let year = reg(&mut c, YEAR);
        assert_eq!(year, (((now.year % 100) / 10) << 4 | (now.year % 10)) as u8);
        assert_eq!(reg(&mut c, CENTURY), 0x20);
        assert_eq!(reg(&mut c, STATUS_D), 0x80);
    }

    #[test]
    fn guest_can_set_the_clock() {
        let mut c = Cmos::new(0, 0);
        c.write(INDEX_PORT, &[STATUS_B]);
        c.write(DATA_PORT, &[B_24H | B_BINARY]);
        c.write(INDEX_PORT, &[CENTURY]);
        c.write(DATA_PORT, &[19]);
        c.write(INDEX_PORT, &[YEAR]);
        c.write(DATA_PORT, &[99]);
        assert_eq!(reg(&mut c, YEAR), 99);
        assert_eq!(reg(&mut c, CENTURY), 19);
    }
}
