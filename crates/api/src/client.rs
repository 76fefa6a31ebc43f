//! A small blocking HTTP/1.1 client for the service's Unix socket: one request per
//! connection, no dependencies, quick to start (the CLI uses it, and so do the tests).

use crate::ErrorBody;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
                "cannot reach viridiand at {} ({e}); start it (`systemctl start viridiand`) or point --socket / VIRIDIAN_SOCKET (or --host / VIRIDIAN_HOST) at it",
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

/// A byte stream to the service.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Opens a connection for a remote transport (TLS over TCP, set up by the caller).
pub type Connector = Arc<dyn Fn() -> std::io::Result<Box<dyn Stream>> + Send + Sync>;

#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Remote { url: String, connect: Connector },
}

/// The client: where the service is, extra headers (a bearer token), a read timeout.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    headers: Vec<(String, String)>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.target())
    }
}

impl Client {
    /// A client for the service's Unix socket.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            transport: Transport::Unix(socket.into()),
            headers: Vec::new(),
            timeout: Duration::from_secs(600),
        }
    }

    /// A client for a remote service: `connect` opens a (TLS) stream, `url` names it.
    pub fn remote(url: impl Into<String>, connect: Connector) -> Self {
        Self {
            transport: Transport::Remote {
                url: url.into(),
                connect,
            },
            headers: Vec::new(),
            timeout: Duration::from_secs(600),
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with each request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
        self
    }

    /// The socket path or URL, for messages.
    pub fn target(&self) -> String {
        match &self.transport {
            Transport::Unix(p) => p.display().to_string(),
            Transport::Remote { url, .. } => url.clone(),
        }
    }

    /// The Unix socket, if that is the transport.
    pub fn socket(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Unix(p) => Some(p),
            Transport::Remote { .. } => None,
        }
    }

    /// Whether something accepts connections there.
    pub fn reachable(&self) -> bool {
        self.connect().is_ok()
    }

    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        match &self.transport {
            Transport::Unix(p) => {
                let s = UnixStream::connect(p).map_err(|e| ClientError::Connect(p.clone(), e))?;
                s.set_read_timeout(Some(self.timeout))?;
                Ok(Box::new(s))
            }
            Transport::Remote { url, connect } => {
                connect().map_err(|e| ClientError::Connect(PathBuf::from(url), e))
            }
        }
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
        let mut stream = self.connect()?;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
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
        stream.flush()?;
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
