//! A writer that passes on only whole lines, each in one write, so that other processes
//! writing whole lines to the same terminal or pipe (a script's own `echo`s next to `viridian
//! run`'s console) never land inside one of them. The guest's UART hands over a line a few
//! bytes at a time; without this, each piece would be its own write.

use std::io::Write;

/// A line longer than this goes out in pieces of this size (a pipe's atomic write size).
pub const LONGEST_LINE: usize = 4096;

/// Holds back the unfinished last line until its newline arrives, it reaches
/// [`LONGEST_LINE`], or the writer is dropped. `flush` flushes the whole lines written so far,
/// never a partial one.
pub struct WholeLines<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> WholeLines<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending: Vec::new(),
        }
    }
}

impl<W: Write> Write for WholeLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let mut start = 0;
        while let Some(end) = line_end(&self.pending[start..]) {
            let line = &self.pending[start..start + end];
            if let Err(e) = self.inner.write_all(line) {
                self.pending.drain(..start);
                return Err(e);
            }
            start += end;
        }
        self.pending.drain(..start);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where the first line of `bytes` ends (after its newline), or after [`LONGEST_LINE`] bytes
/// without one; `None` while it is unfinished and shorter.
fn line_end(bytes: &[u8]) -> Option<usize> {
    let window = &bytes[..bytes.len().min(LONGEST_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => Some(i + 1),
        None if window.len() == LONGEST_LINE => Some(LONGEST_LINE),
        None => None,
    }
}

impl<W: Write> Drop for WholeLines<W> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.inner.write_all(&self.pending);
        }
        let _ = self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records each write as its own piece, as a terminal shared with other writers would.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn pieces(&self) -> Vec<String> {
            let w = self.0.lock().unwrap();
            w.iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        }
    }

    #[test]
    fn a_line_handed_over_in_pieces_goes_out_in_one_write() {
        let writes = Writes::default();
        let mut w = WholeLines::new(writes.clone());
        // As the console hub passes the guest's `dvd2_md5=` line on: a few bytes per wake-up,
        // each followed by a flush.
        for piece in [
            "VIRIDIAN-GUEST dv",
            "d2_md5=5463665f9a44",
            "bda13fdeaac387e6b425\r\n",
        ] {
            w.write_all(piece.as_bytes()).unwrap();
            w.flush().unwrap();
            if !piece.ends_with('\n') {
                assert!(writes.pieces().is_empty(), "{:?}", writes.pieces());
            }
        }
        w.write_all(b"next\r\nlog").unwrap();
        assert_eq!(
            writes.pieces(),
            [
                "VIRIDIAN-GUEST dvd2_md5=5463665f9a44bda13fdeaac387e6b425\r\n",
                "next\r\n"
            ]
        );
        drop(w);
        assert_eq!(
            writes.pieces().last().unwrap(),
            "log",
            "the tail at the end"
        );
    }

    #[test]
    fn several_lines_at_once_are_several_writes_and_a_long_line_is_cut() {
        let writes = Writes::default();
        let mut w = WholeLines::new(writes.clone());
        w.write_all(b"a\nbb\nc").unwrap();
        assert_eq!(writes.pieces(), ["a\n", "bb\n"]);
        let long = vec![b'x'; LONGEST_LINE * 2 + 5];
        w.write_all(&long).unwrap();
        let pieces = writes.pieces();
        assert_eq!(
            pieces.len(),
            4,
            "{:?}",
            pieces.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(pieces[2].len(), LONGEST_LINE);
        assert!(pieces[2].starts_with("cx"));
        drop(w);
        let total: usize = writes.pieces().iter().map(String::len).sum();
        assert_eq!(total, 5 + 1 + long.len());
    }
}
