//! The `--serial` file: COM1's output, bounded. A VM that boots starts it afresh; a VM
//! restored from a saved state appends to it, and its last [`REPLAY_BYTES`] go back into the
//! console's replay buffer, so that `vm console` shows what the guest wrote before the save
//! too. Whenever the file would grow past [`LIMIT`], it is cut to its last [`REPLAY_BYTES`]:
//! a guest that floods its console cannot fill the host's disk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use vmm::console::REPLAY_BYTES;

/// The most the file holds.
pub const LIMIT: u64 = 16 << 20;

/// The open file and its length.
pub struct SerialLog {
    file: File,
    len: u64,
}

impl SerialLog {
    /// Creates the file, empty, for a VM that boots.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .read(true)
            .open(path)?;
        Ok(Self { file, len: 0 })
    }

    /// Opens the file to append to it (a restored VM), and returns its last
    /// [`REPLAY_BYTES`] with it.
    pub fn append(path: &Path) -> std::io::Result<(Self, Vec<u8>)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut log = Self { file, len };
        let tail = log.tail()?;
        if log.len > LIMIT {
            log.keep(&tail)?;
        }
        Ok((log, tail))
    }

    /// The file's last [`REPLAY_BYTES`].
    fn tail(&mut self) -> std::io::Result<Vec<u8>> {
        let start = self.len.saturating_sub(REPLAY_BYTES as u64);
        self.file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::with_capacity((self.len - start) as usize);
        (&self.file)
            .take(REPLAY_BYTES as u64)
            .read_to_end(&mut tail)?;
        Ok(tail)
    }

    /// Cuts the file to `tail`.
    fn keep(&mut self, tail: &[u8]) -> std::io::Result<()> {
        self.file.set_len(0)?;
        // Opened to append or truncated: writes go to the (new) end.
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(tail)?;
        self.len = tail.len() as u64;
        Ok(())
    }
}

impl Write for SerialLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len + buf.len() as u64 > LIMIT {
            let tail = self.tail()?;
            self.keep(&tail)?;
            self.file.seek(SeekFrom::End(0))?;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_appends_and_gets_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = SerialLog::create(&path).unwrap();
        log.write_all(b"booted\n").unwrap();
        drop(log);
        let (mut log, tail) = SerialLog::append(&path).unwrap();
        assert_eq!(tail, b"booted\n");
        log.write_all(b"restored\n").unwrap();
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"booted\nrestored\n");
        // A boot starts afresh.
        let mut log = SerialLog::create(&path).unwrap();
        log.write_all(b"again\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"again\n");
        // Nothing there yet: an empty tail.
        let (_, tail) = SerialLog::append(&dir.path().join("new.log")).unwrap();
        assert!(tail.is_empty());
    }

    #[test]
    fn the_file_stays_within_its_limit_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = SerialLog::create(&path).unwrap();
        let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let mut written = 0u64;
        while written < LIMIT + 3 * (1 << 20) {
            log.write_all(&chunk).unwrap();
            written += chunk.len() as u64;
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len <= LIMIT, "{len} bytes");
        }
        log.write_all(b"newest").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.ends_with(b"newest"));
        assert!(bytes.len() as u64 >= REPLAY_BYTES as u64);
        drop(log);
        // A file that grew past the limit (an older viridian) is cut when a restore opens it.
        let big = dir.path().join("big.log");
        std::fs::write(&big, vec![b'x'; LIMIT as usize + 10]).unwrap();
        let (_, tail) = SerialLog::append(&big).unwrap();
        assert_eq!(tail.len(), REPLAY_BYTES);
        assert_eq!(std::fs::metadata(&big).unwrap().len(), REPLAY_BYTES as u64);
    }
}
