//! A writer for the "newc" cpio format the kernel unpacks as an initramfs. Writing it here lets
//! the image hold device nodes (`/dev/console`) without root and without the cpio tool.

use std::io::{self, Write};

/// Builds an uncompressed newc archive in memory.
#[derive(Default)]
pub struct Archive {
    data: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.next_ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        self.entry(path, S_IFREG | mode, (0, 0), body);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// Finishes the archive and writes it out.
    pub fn write_to(mut self, out: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        out.write_all(&self.data)
    }

    /// Bytes so far (without the trailer).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut a = Archive::new();
        a.file("/init", 0o755, b"#!/bin/sh\n");
        a.char_device("dev/console", 5, 1);
        let mut out = Vec::new();
        a.write_to(&mut out).unwrap();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        // name "init" follows the 110-byte header.
        assert_eq!(&out[110..115], b"init\0");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("dev/console"));
        assert!(text.contains("TRAILER!!!"));
        // rdevmajor field of the device entry.
        let dev = text.find("dev/console").unwrap() - 110;
        assert_eq!(&text[dev + 78..dev + 86], "00000005");
    }
}
