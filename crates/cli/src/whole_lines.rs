//! A writer that passes on only whole lines, each in one write, so that other processes
//! writing whole lines to the same terminal or pipe (a script's own `echo`s next to `viridian
//! run`'s console) never land inside one of them. The guest's UART hands over a line a few
//! bytes at a time; without this, each piece would be its own write.

use std::io::Write;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A line longer than this goes out in pieces of this size (a pipe's atomic write size).
pub const LONGEST_LINE: usize = 4096;

/// How long `viridian run` holds an unfinished line (a `login: ` prompt) before it writes it
/// anyway: a program reading the console waits for prompts, and a guest writes a whole line
/// far faster than this.
pub const PROMPT_DELAY: Duration = Duration::from_millis(500);

/// Holds back the unfinished last line until its newline arrives, it reaches
/// [`LONGEST_LINE`], it has waited `idle` (a prompt), or the writer is dropped. `flush`
/// flushes the whole lines written so far, never a partial one.
pub struct WholeLines<W: Write + Send + 'static> {
    held: Arc<Mutex<Held<W>>>,
}

struct Held<W> {
    inner: W,
    pending: Vec<u8>,
    /// When the unfinished line in `pending` started waiting.
    since: Option<Instant>,
}

impl<W: Write + Send + 'static> WholeLines<W> {
    /// Starts a thread that writes an unfinished line once it has waited `idle`; the thread
    /// ends with the writer.
    pub fn new(inner: W, idle: Duration) -> Self {
        let held = Arc::new(Mutex::new(Held {
            inner,
            pending: Vec::new(),
            since: None,
        }));
        let weak = Arc::downgrade(&held);
        // Without the thread, a prompt waits for the next line: the console still works.
        let _ = std::thread::Builder::new()
            .name("console-lines".into())
            .spawn(move || write_prompts(&weak, idle));
        Self { held }
    }
}

/// The idle thread: every `idle / 2`, writes an unfinished line that has waited `idle`.
fn write_prompts<W: Write>(held: &Weak<Mutex<Held<W>>>, idle: Duration) {
    loop {
        std::thread::sleep(idle / 2);
        let Some(held) = held.upgrade() else { return };
        let mut h = support::lock(&held);
        if h.since.is_some_and(|t| t.elapsed() >= idle) {
            let Held {
                inner,
                pending,
                since,
            } = &mut *h;
            // A failed write shows again, and is reported, on the next `write`.
            if inner
                .write_all(pending)
                .and_then(|()| inner.flush())
                .is_ok()
            {
                pending.clear();
                *since = None;
            }
        }
    }
}

impl<W: Write + Send + 'static> Write for WholeLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut h = support::lock(&self.held);
        let Held {
            inner,
            pending,
            since,
        } = &mut *h;
        pending.extend_from_slice(buf);
        let mut start = 0;
        while let Some(end) = line_end(&pending[start..]) {
            if let Err(e) = inner.write_all(&pending[start..start + end]) {
                pending.drain(..start);
                return Err(e);
            }
            start += end;
        }
        pending.drain(..start);
        if pending.is_empty() {
            *since = None;
        } else if start > 0 || since.is_none() {
            *since = Some(Instant::now());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        support::lock(&self.held).inner.flush()
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

impl<W: Write + Send + 'static> Drop for WholeLines<W> {
    fn drop(&mut self) {
        let mut h = support::lock(&self.held);
        let Held { inner, pending, .. } = &mut *h;
        if !pending.is_empty() {
            let _ = inner.write_all(pending);
            pending.clear();
        }
        let _ = inner.flush();
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
        let mut w = WholeLines::new(writes.clone(), Duration::from_secs(3600));
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
        let mut w = WholeLines::new(writes.clone(), Duration::from_secs(3600));
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

    #[test]
    fn an_unfinished_line_goes_out_after_waiting_idle() {
        let writes = Writes::default();
        let mut w = WholeLines::new(writes.clone(), Duration::from_millis(50));
        w.write_all(b"done\r\nviridian-debian login: ").unwrap();
        assert_eq!(writes.pieces(), ["done\r\n"], "the prompt is held at first");
        let waited = Instant::now();
        while writes.pieces().len() < 2 && waited.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(writes.pieces(), ["done\r\n", "viridian-debian login: "]);
        w.write_all(b"root\r\n").unwrap();
        drop(w);
        assert_eq!(writes.pieces().len(), 3, "{:?}", writes.pieces());
        assert_eq!(
            writes.pieces()[2],
            "root\r\n",
            "the prompt is not written twice"
        );
    }
}
