//! A small blocking HTTP/1.1 client for the service's Unix socket: one request per
//! connection, no dependencies, quick to start (the CLI uses it, and so do the tests).

use crate::ErrorBody;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the service listens by default.
pub const DEFAULT_SOCKET: &str = "/run/viridian/viridiand.sock";

/// An answer: status code and body bytes.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The error envelope, if the body is one.
    pub fn error(&self) -> Option<ErrorBody> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Why a request failed before any answer came back.
#[derive(Debug)]
pub enum ClientError {
    /// The socket cannot be reached (no service there).
    Connect(PathBuf, std::io::Error),
    /// The connection broke or the answer was not HTTP.
    Io(std::io::Error),
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(p, e) => write!(
                f,
                "cannot reach viridiand at {} ({e}); start it (`systemctl start viridiand`) or point --socket / VIRIDIAN_SOCKET at it",
                p.display()
            ),
            Self::Io(e) => write!(f, "the connection to viridiand broke: {e}"),
            Self::Protocol(e) => write!(f, "viridiand sent a malformed answer: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// The client: a socket path and a read timeout.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(600),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether something accepts connections on the socket.
    pub fn reachable(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    /// Sends one request (`body` as JSON when given) and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
        stream.set_read_timeout(Some(self.timeout))?;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        } else if method != "GET" && method != "HEAD" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        if let Some(b) = body {
            // The service may answer (413) and close before reading a huge body.
            if let Err(e) = stream.write_all(b) {
                if e.kind() != std::io::ErrorKind::BrokenPipe
                    && e.kind() != std::io::ErrorKind::ConnectionReset
                {
                    return Err(e.into());
                }
            }
        }
        read_response(BufReader::new(stream))
    }
}

fn read_response(mut r: impl BufRead) -> Result<Response, ClientError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(ClientError::Protocol("headers cut short".into()));
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol(format!("chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::read_response;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = read_response(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"[..]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = read_response(
            &b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "abcde"));
        assert!(read_response(&b"garbage\r\n"[..]).is_err());
    }
}
