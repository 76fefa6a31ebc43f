//! KVP against a guest that answers the way Linux 6.1's hv_kvp driver and Debian 12's
//! hv_kvp_daemon do, over the VMBus loopback; then against hostile answers.

mod common;

use common::*;
use hvdef::ic::kvp::{self as wire, op, status, value_type};
use hvdef::ic::{msgtype, IcMessageHeader, IcVersion};
use hvdef::vmbus::{guid, Guid};
use ic::kvp::{KvpSavedState, MAX_ITEMS_PER_POOL, MAX_QUEUE};
use ic::{
    DaemonState, HostItemState, IcError, IcState, IpAddressInfo, Kvp, KvpEvent, KvpPool,
    KvpRequest, KvpStatus, SavedNegotiation,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vmbus::client::GuestChannel;
use vmbus::Channel;
use zerocopy::{FromBytes, IntoBytes};

/// What the guest's daemon does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    /// Registered and answering.
    Running,
    /// Went away after registering: the kernel answers every request E_FAIL.
    Gone,
    /// Hung: nothing is answered (the test plays the kernel's 30-s timeout itself).
    Hung,
}

fn utf16(s: &str, field: &mut [u8]) -> u32 {
    let mut n = 0;
    for (d, u) in field.chunks_exact_mut(2).zip(s.encode_utf16()) {
        d.copy_from_slice(&u.to_le_bytes());
        n += 1;
    }
    field[2 * n..2 * n + 2].fill(0);
    2 * (n as u32 + 1)
}

/// Linux's utf16s_to_utf8s of a sized field, as the kernel passes it to the daemon.
fn from_utf16(field: &[u8], size: u32) -> String {
    let units: Vec<u16> = field[..(size as usize).min(field.len())]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).unwrap()
}

/// Linux's hv_kvp driver plus hv_kvp_daemon.
struct LinuxKvp {
    daemon: Daemon,
    fw: Vec<IcVersion>,
    msg: Vec<IcVersion>,
    negotiated: Option<(IcVersion, IcVersion)>,
    auto: Vec<(String, String)>,
    pools: BTreeMap<u8, Vec<(String, String)>>,
    /// MAC (upper case) -> (addresses, subnets, gateways, dns).
    nics: BTreeMap<String, [&'static str; 4]>,
    /// Requests seen: (operation, pool).
    seen: Vec<(u8, u8)>,
    /// Requests read but not answered (Hung), with their transaction ids.
    held: Vec<(u64, Vec<u8>)>,
}

impl LinuxKvp {
    fn new() -> Self {
        let auto = [
            ("FullyQualifiedDomainName", "debian.example.org"),
            ("IntegrationServicesVersion", "3.1"),
            ("NetworkAddressIPv4", "192.168.1.20"),
            ("NetworkAddressIPv6", "fe80::215:5dff:fe00:1"),
            ("OSBuildNumber", "6.1.0-28-amd64"),
            ("OSName", "Debian GNU/Linux"),
            ("OSMajorVersion", "12"),
            ("OSMinorVersion", ""),
            ("OSVersion", "6.1.0"),
            ("ProcessorArchitecture", "x86_64"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut nics = BTreeMap::new();
        nics.insert(
            "00:15:5D:00:00:01".to_string(),
            [
                "192.168.1.20;fe80::215:5dff:fe00:1",
                "255.255.255.0;/64",
                "192.168.1.1;",
                "192.168.1.1;1.1.1.1;",
            ],
        );
        Self {
            daemon: Daemon::Running,
            fw: vec![IcVersion::new(3, 0), IcVersion::new(1, 0)],
            msg: vec![
                IcVersion::new(4, 0),
                IcVersion::new(3, 0),
                IcVersion::new(1, 0),
            ],
            negotiated: None,
            auto,
            pools: BTreeMap::new(),
            nics,
            seen: Vec::new(),
            held: Vec::new(),
        }
    }

    /// Reads and answers every waiting packet. The host must never have two requests out:
    /// the driver reads one and answers it before it reads the next.
    fn poll(
        &mut self,
        c: &mut vmbus::client::Client<vmbus::loopback::Loopback>,
        ch: &mut GuestChannel,
    ) -> usize {
        let mut n = 0;
        while let Some(p) = c.recv(ch).unwrap() {
            n += 1;
            let mut buf = p.payload.clone();
            assert!(buf.len() <= 4 * 4096, "hv_kvp's receive buffer is 4 pages");
            let hdr = IcMessageHeader::read_from_prefix(&buf[8..]).unwrap().0;
            if hdr.msgtype == msgtype::NEGOTIATE {
                self.negotiated = negotiate_in_place(&mut buf, &self.fw, &self.msg);
                c.send_inband(ch, p.transaction_id, &buf, false).unwrap();
                continue;
            }
            assert_eq!({ hdr.msgtype }, msgtype::KVP_EXCHANGE);
            assert!(self.held.is_empty(), "a second request while one is out");
            let (o, pool) = (buf[HDR], buf[HDR + 1]);
            self.seen.push((o, pool));
            let st = match self.daemon {
                Daemon::Hung => {
                    self.held.push((p.transaction_id, buf));
                    continue;
                }
                Daemon::Gone => status::E_FAIL,
                Daemon::Running => self.daemon_answer(&mut buf),
            };
            make_response(&mut buf, st);
            c.send_inband(ch, p.transaction_id, &buf, false).unwrap();
        }
        n
    }

    fn daemon_answer(&mut self, buf: &mut [u8]) -> u32 {
        let (o, pool) = (buf[HDR], buf[HDR + 1]);
        let body = &mut buf[HDR + 4..];
        match o {
            op::SET => {
                assert_eq!(body.len(), wire::KVP_BODY_SIZE);
                let v = wire::KvpValue::read_from_prefix(body).unwrap().0;
                assert_eq!({ v.value_type }, value_type::REG_SZ);
                let key = from_utf16(&v.key, v.key_size);
                let value = from_utf16(&v.value, v.value_size);
                let recs = self.pools.entry(pool).or_default();
                match recs.iter_mut().find(|(k, _)| *k == key) {
                    Some(r) => r.1 = value,
                    None => recs.push((key, value)),
                }
                status::S_OK
            }
            op::DELETE => {
                let d = wire::KvpDelete::read_from_prefix(body).unwrap().0;
                let key = from_utf16(&d.key, d.key_size);
                let recs = self.pools.entry(pool).or_default();
                match recs.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        recs.remove(i);
                        status::S_OK
                    }
                    None => status::S_CONT,
                }
            }
            op::ENUMERATE => {
                let mut e = wire::KvpEnumerate::read_from_prefix(body).unwrap().0;
                let list = if pool == wire::pool::AUTO {
                    &self.auto
                } else {
                    self.pools.entry(pool).or_default()
                };
                let Some((k, v)) = list.get(e.index as usize) else {
                    return status::S_CONT;
                };
                // As the kernel converts the daemon's answer: sizes include the NUL.
                e.value.key_size = utf16(k, &mut e.value.key);
                e.value.value_size = utf16(v, &mut e.value.value);
                e.value.value_type = value_type::REG_SZ;
                body[..size_of::<wire::KvpEnumerate>()].copy_from_slice(e.as_bytes());
                status::S_OK
            }
            op::GET_IP_INFO => {
                let m = wire::KvpIpMessage::read_from_prefix(&buf[HDR..]).unwrap().0;
                let mac = from_utf16(&m.value.adapter_id, 256);
                let Some(nic) = self.nics.get(&mac) else {
                    return status::E_FAIL;
                };
                let mut v = m.value;
                utf16(nic[0], &mut v.ip_addr);
                utf16(nic[1], &mut v.sub_net);
                utf16(nic[2], &mut v.gate_way);
                utf16(nic[3], &mut v.dns_addr);
                v.addr_family = wire::addr_family::IPV4 | wire::addr_family::IPV6;
                v.dhcp_enabled = 1;
                buf[HDR + 2..HDR + 2 + size_of::<wire::KvpIpAddrValue>()]
                    .copy_from_slice(v.as_bytes());
                status::S_OK
            }
            _ => status::S_CONT,
        }
    }
}

struct KvpRig {
    r: Rig,
    gch: GuestChannel,
    host: Channel,
    kvp: Kvp,
    guest: LinuxKvp,
    now: Instant,
}

impl KvpRig {
    fn new(kvp: Kvp) -> Self {
        let mut r = rig_offers(vec![Kvp::offer(Guid::from_u128(0x4b5650))]);
        let (gch, mut host) = open_raw(&mut r, 0);
        let mut kvp = kvp;
        kvp.open(&mut host).unwrap();
        Self {
            r,
            gch,
            host,
            kvp,
            guest: LinuxKvp::new(),
            now: Instant::now(),
        }
    }

    /// A rig past negotiation.
    fn ready() -> Self {
        let mut k = Self::new(Kvp::new());
        k.guest_poll();
        let ev = k.process();
        assert_eq!(
            ev,
            vec![KvpEvent::Negotiated {
                framework: IcVersion::new(3, 0),
                message: IcVersion::new(4, 0)
            }]
        );
        k
    }

    fn guest_poll(&mut self) -> usize {
        self.guest.poll(&mut self.r.client, &mut self.gch)
    }

    fn process(&mut self) -> Vec<KvpEvent> {
        self.kvp.process(&mut self.host, self.now).unwrap()
    }

    fn try_process(&mut self) -> Result<Vec<KvpEvent>, IcError> {
        self.kvp.process(&mut self.host, self.now)
    }

    /// Runs guest and host until the host has nothing left to send; checks the host never
    /// has more than one request out.
    fn run(&mut self) -> Vec<KvpEvent> {
        let mut events = self.kvp.poll(&mut self.host, self.now).unwrap();
        for _ in 0..10_000 {
            let n = self.guest_poll();
            assert!(n <= 1, "{n} requests outstanding at once");
            events.extend(self.process());
            if self.kvp.outstanding().is_none() && self.kvp.queued() == 0 {
                return events;
            }
        }
        panic!("did not settle");
    }

    /// The guest reads the host's next request; returns it for a hand-made answer.
    fn take_request(&mut self) -> (u64, Vec<u8>) {
        let p = self
            .r
            .client
            .recv(&mut self.gch)
            .unwrap()
            .expect("a request");
        (p.transaction_id, p.payload)
    }

    fn send(&mut self, tid: u64, buf: &[u8]) {
        self.r
            .client
            .send_inband(&mut self.gch, tid, buf, false)
            .unwrap();
    }
}

#[test]
fn kvp_offer_and_versions() {
    assert_eq!(
        Kvp::interface_type().to_string(),
        "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6"
    );
    assert_eq!(Kvp::interface_type(), guid::KVP_IC);
    // An old guest that only knows 3.0 gets it.
    let mut k = KvpRig::new(Kvp::new());
    k.guest.msg = vec![IcVersion::new(3, 0)];
    k.guest_poll();
    assert_eq!(
        k.process(),
        vec![KvpEvent::Negotiated {
            framework: IcVersion::new(3, 0),
            message: IcVersion::new(3, 0)
        }]
    );
    // ... and cannot be asked for IP info.
    assert_eq!(
        k.kvp.get_ip_info("00:15:5d:00:00:01"),
        Err(IcError::Unsupported)
    );
    // A guest with only 5.0 finds no common version.
    let mut k = KvpRig::new(Kvp::new());
    k.guest.msg = vec![IcVersion::new(5, 0)];
    k.guest_poll();
    assert_eq!(k.process(), vec![KvpEvent::NegotiationFailed]);
    assert_eq!(k.kvp.state(), IcState::NoCommonVersion);
}

#[test]
fn refresh_enumerates_the_auto_pool_one_request_at_a_time() {
    let mut k = KvpRig::new(Kvp::new());
    // Queued before negotiation: nothing goes out until versions are agreed.
    k.kvp.refresh().unwrap();
    k.kvp.refresh().unwrap();
    assert_eq!(
        k.kvp.queued(),
        1,
        "a second refresh of the same pool is a no-op"
    );
    assert_eq!(k.kvp.deadline(), None);
    assert_eq!(k.guest_poll(), 1); // the NEGOTIATE
    let ev = k.run();
    assert!(ev.contains(&KvpEvent::Enumerated {
        pool: KvpPool::Auto,
        count: 10
    }));
    // Indices 0..=10 were asked for, in order, one at a time.
    assert_eq!(k.guest.seen, vec![(op::ENUMERATE, wire::pool::AUTO); 11]);
    let items = k.kvp.items();
    let auto = &items.guest[&KvpPool::Auto];
    assert_eq!(auto["OSName"], "Debian GNU/Linux");
    assert_eq!(auto["OSMajorVersion"], "12");
    assert_eq!(auto["FullyQualifiedDomainName"], "debian.example.org");
    assert_eq!(auto["NetworkAddressIPv6"], "fe80::215:5dff:fe00:1");
    assert_eq!(auto["OSMinorVersion"], "");
    assert_eq!(items.daemon, DaemonState::Running);
    assert_eq!(k.kvp.deadline(), None, "nothing left to do");
    // A second refresh replaces the snapshot.
    k.guest.auto.truncate(3);
    k.kvp.refresh().unwrap();
    k.run();
    assert_eq!(k.kvp.items().guest[&KvpPool::Auto].len(), 3);
    // JSON for `viridian vm kvp NAME --json`.
    let json = serde_json::to_value(k.kvp.items()).unwrap();
    assert_eq!(
        json["guest"]["auto"]["FullyQualifiedDomainName"],
        "debian.example.org"
    );
    assert_eq!(json["daemon"], "running");
}

#[test]
fn set_and_delete_reach_the_daemon_pool() {
    let mut k = KvpRig::ready();
    k.kvp.set(KvpPool::External, "VmName", "web").unwrap();
    k.kvp.set(KvpPool::External, "Unicode", "ünï€ 😀").unwrap();
    k.kvp.set(KvpPool::External, "Empty", "").unwrap();
    // A queued SET of the same key is replaced, not queued twice.
    k.kvp.set(KvpPool::External, "VmName", "web-1").unwrap();
    assert_eq!(k.kvp.queued(), 3);
    assert_eq!(
        k.kvp.items().host[&KvpPool::External]["VmName"].state,
        HostItemState::Pending
    );
    // The worker polls after set; the deadline says "now" while work is queued.
    assert_eq!(k.kvp.deadline(), Some(k.now));
    let ev = k.run();
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(
                e,
                KvpEvent::Completed {
                    status: KvpStatus::Ok,
                    ..
                }
            ))
            .count(),
        3
    );
    assert_eq!(
        k.guest.pools[&0],
        vec![
            ("VmName".to_string(), "web-1".to_string()),
            ("Unicode".to_string(), "ünï€ 😀".to_string()),
            ("Empty".to_string(), String::new()),
        ]
    );
    let host = &k.kvp.items().host[&KvpPool::External];
    assert!(host.values().all(|i| i.state == HostItemState::Applied));
    assert_eq!(host["VmName"].value, "web-1");
    // The host's pool reads back through ENUMERATE.
    k.kvp.refresh_pool(KvpPool::External).unwrap();
    k.run();
    assert_eq!(
        k.kvp.items().guest[&KvpPool::External]["Unicode"],
        "ünï€ 😀"
    );
    // DELETE, and DELETE of a missing key (the daemon answers S_CONT).
    k.kvp.delete(KvpPool::External, "VmName").unwrap();
    k.kvp.delete(KvpPool::External, "Nope").unwrap();
    let ev = k.run();
    assert!(ev.contains(&KvpEvent::Completed {
        request: KvpRequest::Delete {
            pool: KvpPool::External,
            key: "VmName".into()
        },
        status: KvpStatus::Ok
    }));
    assert!(ev.contains(&KvpEvent::Completed {
        request: KvpRequest::Delete {
            pool: KvpPool::External,
            key: "Nope".into()
        },
        status: KvpStatus::NoMoreItems
    }));
    assert_eq!(k.guest.pools[&0].len(), 2);
    assert!(!k.kvp.items().host[&KvpPool::External].contains_key("VmName"));
}

#[test]
fn host_arguments_are_checked() {
    let mut k = KvpRig::ready();
    let long_key = "k".repeat(256);
    assert!(matches!(
        k.kvp.set(KvpPool::External, &long_key, "v"),
        Err(IcError::InvalidArgument(_))
    ));
    assert!(k.kvp.set(KvpPool::External, &"k".repeat(255), "v").is_ok());
    assert!(k.kvp.set(KvpPool::External, "", "v").is_err());
    assert!(k.kvp.set(KvpPool::External, "a\0b", "v").is_err());
    assert!(k
        .kvp
        .set(KvpPool::External, "k", &"v".repeat(1024))
        .is_err());
    assert!(k.kvp.get_ip_info("").is_err());
    assert!(k.kvp.get_ip_info(&"A".repeat(128)).is_err());
    for i in 0..MAX_QUEUE - 1 {
        k.kvp.delete(KvpPool::Guest, &format!("x{i}")).unwrap();
    }
    assert_eq!(
        k.kvp.delete(KvpPool::Guest, "one-too-many"),
        Err(IcError::QueueFull)
    );
}

#[test]
fn get_ip_info_is_parsed_into_typed_addresses() {
    let mut k = KvpRig::ready();
    k.kvp.get_ip_info("00:15:5d:00:00:01").unwrap();
    let ev = k.run();
    let items = k.kvp.items();
    let info = &items.ip_info["00:15:5D:00:00:01"];
    assert!(ev.contains(&KvpEvent::IpInfo {
        adapter_id: "00:15:5D:00:00:01".into(),
        info: info.clone()
    }));
    assert!(info.ipv4 && info.ipv6 && info.dhcp_enabled);
    assert_eq!(
        info.addresses,
        vec![
            IpAddressInfo {
                address: "192.168.1.20".parse().unwrap(),
                prefix_len: Some(24)
            },
            IpAddressInfo {
                address: "fe80::215:5dff:fe00:1".parse().unwrap(),
                prefix_len: Some(64)
            },
        ]
    );
    assert_eq!(
        info.gateways,
        vec!["192.168.1.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(info.dns_servers.len(), 2);
    assert!(info.unparsed.is_empty());
    let json = serde_json::to_value(&items).unwrap();
    assert_eq!(
        json["ip_info"]["00:15:5D:00:00:01"]["addresses"][0]["address"],
        "192.168.1.20"
    );
    // An adapter the guest does not have: the daemon answers E_FAIL; that is not "no
    // daemon".
    k.kvp.get_ip_info("00:15:5D:99:99:99").unwrap();
    let ev = k.run();
    assert!(ev.contains(&KvpEvent::Completed {
        request: KvpRequest::GetIpInfo {
            adapter_id: "00:15:5D:99:99:99".into()
        },
        status: KvpStatus::Failed(status::E_FAIL)
    }));
    assert!(!ev.contains(&KvpEvent::NoDaemon));
    assert_eq!(k.kvp.items().daemon, DaemonState::Running);
    assert_eq!(k.guest.seen[0], (op::GET_IP_INFO, wire::pool::GUEST));
}

#[test]
fn kernel_failure_status_means_no_daemon() {
    let mut k = KvpRig::ready();
    k.kvp.refresh().unwrap();
    k.run();
    assert_eq!(k.kvp.items().guest[&KvpPool::Auto].len(), 10);
    k.guest.daemon = Daemon::Gone;
    k.kvp.set(KvpPool::External, "a", "b").unwrap();
    k.kvp.refresh().unwrap();
    let ev = k.run();
    assert_eq!(
        ev.iter().filter(|e| **e == KvpEvent::NoDaemon).count(),
        1,
        "reported once"
    );
    assert!(ev.contains(&KvpEvent::EnumerationAborted {
        pool: KvpPool::Auto,
        status: KvpStatus::Failed(status::E_FAIL)
    }));
    let items = k.kvp.items();
    assert_eq!(items.daemon, DaemonState::NotRunning);
    assert_eq!(
        items.host[&KvpPool::External]["a"].state,
        HostItemState::Failed {
            status: KvpStatus::Failed(status::E_FAIL)
        }
    );
    // The last good snapshot stays.
    assert_eq!(items.guest[&KvpPool::Auto].len(), 10);
    // The daemon comes back.
    k.guest.daemon = Daemon::Running;
    k.kvp.set(KvpPool::External, "a", "b").unwrap();
    k.run();
    assert_eq!(k.kvp.items().daemon, DaemonState::Running);
    assert_eq!(
        k.kvp.items().host[&KvpPool::External]["a"].state,
        HostItemState::Applied
    );
}

#[test]
fn unanswered_requests_time_out_and_the_queue_moves_on() {
    let mut k = KvpRig::new(Kvp::with_timeout(Duration::from_secs(10)));
    k.guest_poll();
    k.process();
    k.guest.daemon = Daemon::Hung;
    let t0 = k.now;
    k.kvp.set(KvpPool::External, "first", "1").unwrap();
    k.kvp.set(KvpPool::External, "second", "2").unwrap();
    assert!(k.kvp.poll(&mut k.host, t0).unwrap().is_empty());
    assert_eq!(k.guest_poll(), 1);
    assert_eq!(k.kvp.deadline(), Some(t0 + Duration::from_secs(10)));
    // Before the deadline nothing else goes out.
    assert!(k
        .kvp
        .poll(&mut k.host, t0 + Duration::from_secs(9))
        .unwrap()
        .is_empty());
    assert_eq!(k.r.client.recv(&mut k.gch).unwrap(), None);
    // At the deadline the first request times out and the second goes out.
    let t1 = t0 + Duration::from_secs(10);
    let ev = k.kvp.poll(&mut k.host, t1).unwrap();
    assert_eq!(
        ev,
        vec![KvpEvent::Completed {
            request: KvpRequest::Set {
                pool: KvpPool::External,
                key: "first".into(),
                value: "1".into()
            },
            status: KvpStatus::TimedOut
        }]
    );
    assert_eq!(k.kvp.items().daemon, DaemonState::NotResponding);
    assert_eq!(k.kvp.deadline(), Some(t1 + Duration::from_secs(10)));
    // The kernel's own timeout fires: it answers the first request E_FAIL, late. That
    // answer is stale and dropped; the second request is still outstanding.
    let (tid, mut late) = k.guest.held.remove(0);
    make_response(&mut late, status::E_FAIL);
    k.send(tid, &late);
    k.now = t1;
    assert_eq!(k.try_process(), Err(IcError::UnexpectedTransaction(tid)));
    assert!(matches!(
        k.kvp.outstanding(),
        Some(KvpRequest::Set { key, .. }) if key == "second"
    ));
    // The daemon recovers and answers the second one.
    k.guest.daemon = Daemon::Running;
    let (tid2, mut buf) = k.take_request();
    let st = k.guest.daemon_answer(&mut buf);
    make_response(&mut buf, st);
    k.send(tid2, &buf);
    let ev = k.process();
    assert!(ev.contains(&KvpEvent::Completed {
        request: KvpRequest::Set {
            pool: KvpPool::External,
            key: "second".into(),
            value: "2".into()
        },
        status: KvpStatus::Ok
    }));
    let host = &k.kvp.items().host[&KvpPool::External];
    assert_eq!(
        host["first"].state,
        HostItemState::Failed {
            status: KvpStatus::TimedOut
        }
    );
    assert_eq!(host["second"].state, HostItemState::Applied);
}

#[test]
fn a_timed_out_enumeration_keeps_the_old_snapshot() {
    let mut k = KvpRig::ready();
    k.kvp.refresh().unwrap();
    k.run();
    k.guest.daemon = Daemon::Hung;
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    k.guest_poll();
    let ev = k
        .kvp
        .poll(&mut k.host, k.now + Duration::from_secs(11))
        .unwrap();
    assert!(ev.contains(&KvpEvent::EnumerationAborted {
        pool: KvpPool::Auto,
        status: KvpStatus::TimedOut
    }));
    assert_eq!(k.kvp.items().guest[&KvpPool::Auto].len(), 10);
}

/// Answers the next request with `f` applied to the in-place answer the daemon would give.
fn answer_with(
    k: &mut KvpRig,
    f: impl FnOnce(&mut Vec<u8>) -> u64,
) -> Result<Vec<KvpEvent>, IcError> {
    let (tid, mut buf) = k.take_request();
    let st = k.guest.daemon_answer(&mut buf);
    make_response(&mut buf, st);
    let tid = tid.wrapping_add(f(&mut buf));
    k.send(tid, &buf);
    k.try_process()
}

const KEY_SIZE: usize = HDR + 4 + 4 + 4; // offset of key_size in an ENUMERATE answer
const VALUE_TYPE: usize = HDR + 4 + 4;
const VALUE_SIZE: usize = KEY_SIZE + 4;
const KEY: usize = KEY_SIZE + 8; // the key's first byte

#[test]
fn hostile_kvp_answers_are_dropped() {
    let mut k = KvpRig::ready();
    for i in 0..4 {
        k.guest.auto.push((format!("Extra{i}"), "x".into()));
    }
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    // Wrong VMBus transaction: dropped, the request stays outstanding.
    assert!(matches!(
        answer_with(&mut k, |_| 5),
        Err(IcError::UnexpectedTransaction(_))
    ));
    assert!(k.kvp.outstanding().is_some());
    // The guest never answers that one properly: it times out; start over.
    k.kvp
        .poll(&mut k.host, k.now + Duration::from_secs(10))
        .unwrap();
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    // Wrong IC transaction byte.
    let (tid, mut buf) = k.take_request();
    let good = {
        let mut b = buf.clone();
        let st = k.guest.daemon_answer(&mut b);
        make_response(&mut b, st);
        b
    };
    let st = k.guest.daemon_answer(&mut buf);
    make_response(&mut buf, st);
    buf[8 + 16] ^= 0x55;
    k.send(tid, &buf);
    assert_eq!(k.try_process(), Err(IcError::UnexpectedTransaction(tid)));
    // Wrong message type.
    let mut b = good.clone();
    b[8 + 4] = msgtype::HEARTBEAT as u8;
    k.send(tid, &b);
    assert_eq!(
        k.try_process(),
        Err(IcError::UnexpectedType(msgtype::HEARTBEAT))
    );
    // A request instead of a response.
    let mut b = good.clone();
    b[8 + 17] = 2;
    k.send(tid, &b);
    assert_eq!(k.try_process(), Err(IcError::Malformed("not a response")));
    // Pipe size past the packet.
    let mut b = good.clone();
    b[4..8].copy_from_slice(&100_000u32.to_le_bytes());
    k.send(tid, &b);
    assert_eq!(
        k.try_process(),
        Err(IcError::BadPipeHeader("size exceeds the packet"))
    );
    assert!(k.kvp.outstanding().is_some(), "none of these completed it");
    // Truncated (pipe header adjusted so only the KVP body is short): the transaction is
    // answered, badly; the enumeration stops and the request is done.
    let mut b = good.clone();
    b.truncate(HDR + 100);
    b[4..8].copy_from_slice(&(100u32 + 20).to_le_bytes());
    k.send(tid, &b);
    let err = k.kvp.process_report(&mut k.host, k.now).unwrap();
    assert_eq!(
        err.first_error,
        Some(IcError::Malformed("truncated KVP answer"))
    );
    assert!(err.events.contains(&KvpEvent::EnumerationAborted {
        pool: KvpPool::Auto,
        status: KvpStatus::BadResponse
    }));
    assert!(k.kvp.outstanding().is_none());
    assert!(!k.kvp.items().guest.contains_key(&KvpPool::Auto));

    // Bad items inside an enumeration are skipped; the enumeration goes on.
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    // (field offset, value written there, the error).
    let cases = [
        (KEY_SIZE, 7, IcError::BadString("odd length")),
        (KEY_SIZE, 514, IcError::BadString("length past the field")),
        (KEY_SIZE, u32::MAX, IcError::BadString("odd length")),
        (
            KEY_SIZE,
            u32::MAX - 1,
            IcError::BadString("length past the field"),
        ),
        (KEY_SIZE, 0, IcError::BadString("empty (no terminator)")),
        (KEY_SIZE, 4, IcError::BadString("missing NUL terminator")),
        (
            VALUE_SIZE,
            4096,
            IcError::BadString("length past the field"),
        ),
        (VALUE_TYPE, 99, IcError::Malformed("unknown KVP value type")),
        (
            VALUE_TYPE,
            value_type::REG_DWORD,
            IcError::BadString("number of the wrong size"),
        ),
    ];
    for (at, v, e) in cases {
        let r = k.kvp.process_report(&mut k.host, k.now).unwrap();
        assert!(r.events.is_empty());
        let (tid, mut buf) = k.take_request();
        let st = k.guest.daemon_answer(&mut buf);
        make_response(&mut buf, st);
        buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        k.send(tid, &buf);
        let r = k.kvp.process_report(&mut k.host, k.now).unwrap();
        assert_eq!(r.first_error, Some(e));
        assert!(k.kvp.outstanding().is_some(), "the next index went out");
    }
    // Invalid UTF-16 is replaced, and an answer for another index is refused.
    let (tid, mut buf) = k.take_request();
    let st = k.guest.daemon_answer(&mut buf);
    make_response(&mut buf, st);
    buf[KEY + 4..KEY + 6].copy_from_slice(&0xdc00u16.to_le_bytes());
    k.send(tid, &buf);
    k.process();
    let (tid, mut buf) = k.take_request();
    let st = k.guest.daemon_answer(&mut buf);
    make_response(&mut buf, st);
    buf[HDR + 4] += 1;
    k.send(tid, &buf);
    let r = k.kvp.process_report(&mut k.host, k.now).unwrap();
    assert_eq!(
        r.first_error,
        Some(IcError::Malformed("enumeration answer for another index"))
    );
    assert!(r.events.contains(&KvpEvent::EnumerationAborted {
        pool: KvpPool::Auto,
        status: KvpStatus::BadResponse
    }));
    // Another operation in the answer.
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    assert!(answer_with(&mut k, |b| {
        b[HDR] = op::SET;
        0
    })
    .unwrap()
    .contains(&KvpEvent::EnumerationAborted {
        pool: KvpPool::Auto,
        status: KvpStatus::BadResponse
    }));
    // The rest of a clean enumeration: the bad items are missing, the lossy one is there.
    k.kvp.refresh().unwrap();
    k.run();
    let auto = &k.kvp.items().guest[&KvpPool::Auto];
    assert_eq!(auto.len(), 14);
}

#[test]
fn lossy_and_skipped_items_in_one_enumeration() {
    let mut k = KvpRig::ready();
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    for i in 0..11 {
        let (tid, mut buf) = k.take_request();
        let st = k.guest.daemon_answer(&mut buf);
        make_response(&mut buf, st);
        match i {
            // FullyQualifiedDomainName: a lone surrogate in the key.
            0 => buf[KEY + 2..KEY + 4].copy_from_slice(&0xd800u16.to_le_bytes()),
            // IntegrationServicesVersion: an odd key length.
            1 => buf[KEY_SIZE..KEY_SIZE + 4].copy_from_slice(&3u32.to_le_bytes()),
            _ => {}
        }
        k.send(tid, &buf);
        k.kvp.process_report(&mut k.host, k.now).unwrap();
    }
    let auto = &k.kvp.items().guest[&KvpPool::Auto];
    assert_eq!(auto.len(), 9, "{auto:?}");
    assert_eq!(
        auto["F\u{fffd}llyQualifiedDomainName"],
        "debian.example.org"
    );
    assert!(!auto.contains_key("IntegrationServicesVersion"));
}

#[test]
fn an_endless_enumeration_is_capped() {
    let mut k = KvpRig::ready();
    k.guest.auto = (0..1000).map(|i| (format!("k{i}"), "v".into())).collect();
    k.kvp.refresh().unwrap();
    let ev = k.run();
    assert!(ev.contains(&KvpEvent::Enumerated {
        pool: KvpPool::Auto,
        count: MAX_ITEMS_PER_POOL
    }));
    assert_eq!(k.guest.seen.len(), MAX_ITEMS_PER_POOL);
}

#[test]
fn close_requeues_the_unanswered_request() {
    let mut k = KvpRig::ready();
    k.guest.daemon = Daemon::Hung;
    k.kvp.set(KvpPool::External, "k", "v").unwrap();
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    k.guest_poll();
    assert!(k.kvp.outstanding().is_some());
    // The guest closes and reopens the channel (e.g. it reloaded hv_utils).
    k.kvp.close();
    assert_eq!(k.kvp.state(), IcState::Closed);
    assert_eq!(k.kvp.queued(), 2);
    k.r.client
        .transport_mut()
        .host_channels
        .insert(k.r.relids[0], k.host);
    k.r.client.close_channel(k.gch).unwrap();
    let (gch, mut host) = open_raw(&mut k.r, 0);
    k.kvp.open(&mut host).unwrap();
    k.gch = gch;
    k.host = host;
    k.guest = LinuxKvp::new();
    k.guest_poll();
    k.run();
    assert_eq!(k.guest.pools[&0], vec![("k".to_string(), "v".to_string())]);
    assert_eq!(k.kvp.items().guest[&KvpPool::Auto].len(), 10);
}

#[test]
fn full_ring_is_retried() {
    let mut k = KvpRig::ready();
    // Fill the ring to the guest.
    while k.host.send_inband(1, &[0; 256], false).is_ok() {}
    k.kvp.set(KvpPool::External, "k", "v").unwrap();
    let t0 = k.now;
    k.kvp.poll(&mut k.host, t0).unwrap();
    assert!(k.kvp.outstanding().is_none());
    assert_eq!(k.kvp.deadline(), Some(t0 + ic::kvp::RETRY_DELAY));
    while k.r.client.recv(&mut k.gch).unwrap().is_some() {}
    k.kvp.poll(&mut k.host, t0 + ic::kvp::RETRY_DELAY).unwrap();
    assert!(k.kvp.outstanding().is_some());
    k.guest_poll();
    k.process();
    assert_eq!(k.guest.pools[&0].len(), 1);
}

#[test]
fn save_restore_mid_enumeration() {
    let mut k = KvpRig::ready();
    k.kvp.set(KvpPool::External, "a", "1").unwrap();
    k.kvp.refresh().unwrap();
    k.kvp.poll(&mut k.host, k.now).unwrap();
    // SET answered, then two enumeration answers.
    for _ in 0..3 {
        k.guest_poll();
        k.process();
    }
    assert!(matches!(
        k.kvp.outstanding(),
        Some(KvpRequest::Enumerate { index: 2, .. })
    ));
    let saved = k.kvp.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: KvpSavedState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    let mut restored = Kvp::new();
    restored.restore(&back, k.now).unwrap();
    assert_eq!(restored.save(), saved);
    k.kvp = restored;
    // The restored service takes the answer to the request sent before the save.
    let ev = k.run();
    assert!(ev.contains(&KvpEvent::Enumerated {
        pool: KvpPool::Auto,
        count: 10
    }));
    assert_eq!(
        k.kvp.items().host[&KvpPool::External]["a"].state,
        HostItemState::Applied
    );
    // Invalid states are refused and change nothing.
    let before = k.kvp.save();
    let bad = |f: &dyn Fn(&mut KvpSavedState)| {
        let mut s = saved.clone();
        f(&mut s);
        s
    };
    let cases = [
        bad(&|s| s.version = 9),
        bad(&|s| s.next_transaction = 0),
        bad(&|s| {
            s.queue = vec![
                KvpRequest::Delete {
                    pool: KvpPool::Guest,
                    key: "x".into()
                };
                MAX_QUEUE + 3
            ]
        }),
        bad(&|s| {
            s.queue.push(KvpRequest::Set {
                pool: KvpPool::External,
                key: String::new(),
                value: String::new(),
            })
        }),
        bad(&|s| s.negotiation = SavedNegotiation::Closed),
        bad(&|s| {
            if let Some(o) = &mut s.outstanding {
                o.transaction = 10_000
            }
        }),
        bad(&|s| s.outstanding = None),
        bad(&|s| s.enumeration = None),
        bad(&|s| {
            s.items
                .guest
                .entry(KvpPool::Guest)
                .or_default()
                .insert("k".repeat(300), String::new());
        }),
        bad(&|s| {
            s.negotiation = SavedNegotiation::Ready {
                framework: ic::SavedVersion { major: 3, minor: 0 },
                message: ic::SavedVersion { major: 5, minor: 0 },
            }
        }),
    ];
    for c in cases {
        assert!(
            matches!(k.kvp.restore(&c, k.now), Err(IcError::BadSavedState(_))),
            "{c:?}"
        );
        assert_eq!(k.kvp.save(), before);
    }
}

#[test]
fn no_daemon_at_boot_means_no_negotiation() {
    // The kernel does not read the channel until the daemon registers: requests stay
    // queued, nothing times out, nothing is lost.
    let mut k = KvpRig::new(Kvp::new());
    k.kvp.set(KvpPool::External, "k", "v").unwrap();
    let later = k.now + Duration::from_secs(60);
    assert!(k.kvp.poll(&mut k.host, later).unwrap().is_empty());
    assert_eq!(k.kvp.state(), IcState::Negotiating);
    assert_eq!(k.kvp.queued(), 1);
    assert_eq!(k.kvp.deadline(), None);
    // The daemon starts; the kernel answers the negotiation; the SET goes out.
    k.guest_poll();
    k.now = later;
    k.run();
    assert_eq!(k.guest.pools[&0].len(), 1);
}

#[test]
fn answers_in_the_wrong_shape_never_panic() {
    // Every possible truncation of a real ENUMERATE and GET_IP_INFO answer.
    let mut k = KvpRig::ready();
    for req in [0, 1] {
        for cut in (0..=7460).step_by(97) {
            if req == 0 {
                k.kvp.refresh().unwrap();
            } else {
                k.kvp.get_ip_info("00:15:5D:00:00:01").unwrap();
            }
            k.kvp.poll(&mut k.host, k.now).unwrap();
            let (tid, mut buf) = k.take_request();
            let st = k.guest.daemon_answer(&mut buf);
            make_response(&mut buf, st);
            buf.truncate(cut);
            if cut >= 8 {
                let size = (cut - 8) as u32;
                buf[4..8].copy_from_slice(&size.to_le_bytes());
            }
            k.send(tid, &buf);
            let _ = k.kvp.process_report(&mut k.host, k.now).unwrap();
            // Whatever happened, the host is not stuck: time out anything outstanding.
            k.now += Duration::from_secs(11);
            let _ = k.kvp.poll(&mut k.host, k.now).unwrap();
            while k.r.client.recv(&mut k.gch).unwrap().is_some() {}
            k.kvp.close();
            k.kvp.open(&mut k.host).unwrap();
            let (t, mut n) = k.take_request();
            negotiate_in_place(&mut n, &k.guest.fw, &k.guest.msg);
            k.send(t, &n);
            k.process();
            while k.kvp.queued() > 0 || k.kvp.outstanding().is_some() {
                k.now += Duration::from_secs(11);
                let _ = k.kvp.poll(&mut k.host, k.now);
                while k.r.client.recv(&mut k.gch).unwrap().is_some() {}
            }
        }
    }
}
