//! A remote service over TLS (`--host https://HOST:PORT`), trusting the certificate given
//! with `--ca-cert` / VIRIDIAN_CA_CERT, with the bearer token from VIRIDIAN_TOKEN.

use anyhow::Context;
use api::client::{Client, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub fn client(url: &str, ca: Option<&Path>) -> anyhow::Result<Client> {
    let rest = url
        .strip_prefix("https://")
        .context("use https://HOST:PORT (the service speaks TLS only)")?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .context("give the port too: https://HOST:PORT")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let ca = ca.context(
        "give the service's certificate with --ca-cert or VIRIDIAN_CA_CERT (on the service's host it is /var/lib/viridian/tls/cert.pem)",
    )?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read {}", ca.display()))?;
    for c in certs {
        let c = c.with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
        roots.add(c).context("the certificate cannot be used")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    let name = ServerName::try_from(host.clone()).context("not a host name")?;
    // An IPv6 address goes in brackets.
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let connect = move || -> std::io::Result<Box<dyn Stream>> {
        let tcp = TcpStream::connect(&target)?;
        tcp.set_read_timeout(Some(Duration::from_secs(600)))?;
        let conn = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(std::io::Error::other)?;
        Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
    };
    let client = Client::remote(url, Arc::new(connect));
    Ok(match std::env::var("VIRIDIAN_TOKEN") {
        Ok(t) if !t.is_empty() => client.with_token(t.trim()),
        _ => client,
    })
}
