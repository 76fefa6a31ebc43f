//! An interface address with its prefix length, `ADDR/PREFIX`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address and prefix length, IPv4 or IPv6, as written `192.168.50.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("the prefix length is {prefix}; at most {max}"));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network address with the host bits cleared, e.g. 172.30.254.0 for 172.30.254.1/24.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    /// Checks that this is usable as a host's own address on a switch: not the unspecified,
    /// loopback, multicast or limited-broadcast address.
    pub fn check_host_address(&self) -> Result<(), String> {
        let a = self.addr;
        if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
            return Err(format!("{a} cannot be an interface's own address"));
        }
        if let IpAddr::V4(v4) = a {
            if v4.is_broadcast() {
                return Err(format!("{a} cannot be an interface's own address"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "expected ADDRESS/PREFIX, e.g. 192.168.50.1/24".to_string())?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Cidr::new(addr, prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let c: Cidr = "192.168.50.1/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.50.1/24");
        assert_eq!(c.network().to_string(), "192.168.50.0/24");
        let c: Cidr = "fd00::1/64".parse().unwrap();
        assert_eq!(c.network().to_string(), "fd00::/64");
        assert_eq!(
            "10.0.0.1/0".parse::<Cidr>().unwrap().network().to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "192.168.50.1",
            "192.168.50.1/33",
            "300.1.1.1/24",
            "x/24",
            "fd00::1/129",
            "1.2.3.4/-1",
            "/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!("127.0.0.1/8"
            .parse::<Cidr>()
            .unwrap()
            .check_host_address()
            .is_err());
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .check_host_address()
            .is_err());
        assert!("10.1.2.3/8"
            .parse::<Cidr>()
            .unwrap()
            .check_host_address()
            .is_ok());
    }
}
