//! More than one controller on a bus: a controller offered after the guest connected (the
//! hot-plug of a VM's first disk on a new controller) is found, opened and serves its disk.

mod common;

use common::*;
use hvdef::storvsp::{self as sp};
use hvdef::vmbus::{msgtype, Guid};
use storvsp::{ControllerConfig, DiskSpec, StorvspDevice};

#[test]
fn a_controller_offered_after_the_guest_connected_serves_its_disk() {
    const SECOND: Guid = Guid::from_u128(0x5649_5249_4449_414e_5343_5349_0000_0001);
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "late.img", 4 << 20);
    let mut r = rig(vec![], 0);
    let before = r.client.offers().count();
    let dev = StorvspDevice::new(
        ControllerConfig::new(SECOND, 0),
        r.mem.clone(),
        vec![(5, DiskSpec::open(&path, None, false).unwrap())],
    )
    .unwrap();
    r.host.add_device(dev.clone()).unwrap();
    // The offer reaches the connected guest without its asking again.
    let _ = r.client.wait_for(msgtype::OFFER_CHANNEL, |_| true);
    assert_eq!(r.client.offers().count(), before + 1);
    let mut g = r.open_on(SECOND, 0, 16);
    g.handshake(&[0x0602]);
    // Linux's scan: REPORT LUNS, then INQUIRY and READ CAPACITY of what it lists.
    let s = g.srb(
        1,
        0,
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        sp::data_in::READ,
        64,
        0,
    );
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 10), [0, 0, 0, 8, 0, 0, 0, 0, 0, 5]);
    let s = g.srb(2, 5, &[0x12, 0, 0, 0, 36, 0], sp::data_in::READ, 36, 0);
    assert_eq!((s.srb_status, g.read_guest(0, 1)[0]), (1, 0));
    let s = g.srb(
        3,
        5,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sp::data_in::READ,
        8,
        0,
    );
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 4), ((4u32 << 20) / 512 - 1).to_be_bytes());
    let data = pattern(5, 8192);
    assert_eq!(g.write10(4, 5, 16, &data, 0, false).srb_status, 1);
    let (s, back) = g.read10(5, 5, 16, 16, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back == data);
    // The first controller is unaffected: no disks there.
    assert_eq!(r.dev.drives().len(), 0);
    assert_eq!(dev.drives()[0].lun, 5);
    r.host.stop();
}
