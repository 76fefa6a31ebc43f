//! Advisory file locks on disk images (one writer, or any number of readers), shared by every
//! format and by the devices that open images themselves.

/// Attempts, 10 ms apart, to take a lock before reporting the file as in use.
const LOCK_RETRIES: u32 = 50;

/// `flock(op)` on `file`, retried for a moment on EWOULDBLOCK: a lock this process just
/// released can stay held by a child it forked (the child shares the open file until it
/// execs), as when another thread spawns `qemu-img` at that moment.
pub fn lock_file(file: &std::fs::File, op: rustix::fs::FlockOperation) -> rustix::io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::fs::flock(file, op) {
            Err(rustix::io::Errno::WOULDBLOCK) if tries + 1 < LOCK_RETRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}
