//! Format detection against the file's name and size: files whose content is not what their
//! name says, and raw files that are not whole sectors, are refused with an error naming the
//! file, the missing signature and its offset; opening them explicitly as raw still works.

use std::path::{Path, PathBuf};
use vhdx::open::{self, CreateOptions, Format, ImageType};
use vhdx::{Disk, Error};

fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> PathBuf {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn refusal(p: &Path) -> (String, &'static str, u64) {
    match open::open(p, true) {
        Err(e @ Error::Corrupt { .. }) => {
            let text = e.to_string();
            let Error::Corrupt {
                path,
                structure,
                offset,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, p);
            assert!(text.starts_with(&format!("{}: ", p.display())), "{text}");
            (text, structure, offset)
        }
        Err(e) => panic!("{}: wrong error {e}", p.display()),
        Ok(i) => panic!("{}: opened as {:?}", p.display(), i.format()),
    }
}

fn create(p: &Path, format: Format) {
    let img = open::create(
        p,
        &CreateOptions {
            format,
            image_type: ImageType::Dynamic,
            size: 4 << 20,
            block_size: 0,
            logical_sector_size: 0,
            physical_sector_size: 0,
            parent: None,
        },
    )
    .unwrap();
    img.flush().unwrap();
}

#[test]
fn random_bytes_named_vhdx_or_vhd_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = random_file(dir.path(), "a.vhdx", 700, 1);
    let (text, structure, offset) = refusal(&p);
    assert_eq!((structure, offset), ("VHDX file identifier", 0));
    assert!(text.contains("\"vhdxfile\" missing"), "{text}");
    assert!(text.contains("at offset 0x0"), "{text}");
    assert!(matches!(open::probe(&p), Err(Error::Corrupt { .. })));
    assert!(open::open_without_parent(&p).is_err());

    let p = random_file(dir.path(), "a.vhd", 700, 2);
    let (text, structure, offset) = refusal(&p);
    assert_eq!((structure, offset), ("VHD footer", 188));
    assert!(text.contains("\"conectix\" missing"), "{text}");
    // Too short for a footer at all.
    let p = random_file(dir.path(), "short.vhd", 300, 3);
    let (text, structure, offset) = refusal(&p);
    assert_eq!((structure, offset), ("VHD footer", 0));
    assert!(text.contains("300 bytes"), "{text}");
    let p = random_file(dir.path(), "b.AVHDX", 4096, 4);
    assert_eq!(refusal(&p).1, "VHDX file identifier");
}

#[test]
fn a_format_under_the_other_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vhdx = dir.path().join("real.vhdx");
    create(&vhdx, Format::Vhdx);
    let renamed = dir.path().join("real.vhd");
    std::fs::copy(&vhdx, &renamed).unwrap();
    let (text, structure, _) = refusal(&renamed);
    assert_eq!(structure, "VHD footer");
    assert!(text.contains("is a VHDX image"), "{text}");

    let vhd = dir.path().join("old.vhd");
    create(&vhd, Format::Vhd);
    let renamed = dir.path().join("old.vhdx");
    std::fs::copy(&vhd, &renamed).unwrap();
    let (text, structure, offset) = refusal(&renamed);
    assert_eq!((structure, offset), ("VHDX file identifier", 0));
    assert!(text.contains("is a VHD image"), "{text}");
    assert!(vhdx::open::set_parent(&renamed, &vhd, true).is_err());

    // Right names open; other names go by the content.
    assert_eq!(open::open(&vhdx, true).unwrap().format(), Format::Vhdx);
    assert_eq!(open::open(&vhd, true).unwrap().format(), Format::Vhd);
    let img = dir.path().join("vhdx-inside.img");
    std::fs::copy(&vhdx, &img).unwrap();
    assert_eq!(open::open(&img, true).unwrap().format(), Format::Vhdx);
}

#[test]
fn raw_files_must_be_whole_sectors_unless_opened_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["odd.img", "odd"] {
        let p = random_file(dir.path(), name, 700, 5);
        let (text, structure, offset) = refusal(&p);
        assert_eq!((structure, offset), ("raw image", 700));
        assert!(text.contains("512-byte sectors"), "{text}");
        assert!(text.contains("format=raw"), "{text}");
        // Explicitly raw: the whole sectors.
        let raw = open::open_as(&p, Format::Raw, true).unwrap();
        assert_eq!(raw.size(), 512);
        let mut b = vec![0u8; 512];
        raw.read_at(&mut b, 0).unwrap();
        assert_eq!(b, std::fs::read(&p).unwrap()[..512]);
    }
    for (name, len) in [("whole.img", 1024), ("whole", 4096), ("empty.raw", 0)] {
        let p = random_file(dir.path(), name, len, 6);
        let img = open::open(&p, true).unwrap();
        assert_eq!((img.format(), img.size()), (Format::Raw, len as u64));
    }
}
