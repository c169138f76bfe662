//! The other side of the endpoint: `taskhost health` asks a running worker's `/healthz` (or
//! `/livez`) over loopback, as a container's health check does where there is no curl.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most of an answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// Where to ask a worker listening on `listen` (its `--metrics-addr`): a wildcard address
/// (`0.0.0.0`, `[::]`) is asked on loopback.
pub fn local_address(listen: &str) -> String {
    match listen.rsplit_once(':') {
        Some(("0.0.0.0", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => listen.to_owned(),
    }
}

/// `GET path` at `addr`: the status code and body, all within `within`.
///
/// # Errors
/// Nothing answers there in time, or what answers does not speak HTTP.
pub async fn get(addr: &str, path: &str, within: Duration) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within {within:?}"))?
        .map_err(|e| anyhow::anyhow!("cannot ask {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer in HTTP"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_asked_on_loopback() {
        assert_eq!(local_address("0.0.0.0:9808"), "127.0.0.1:9808");
        assert_eq!(local_address("[::]:9808"), "[::1]:9808");
        assert_eq!(local_address("10.0.0.5:9808"), "10.0.0.5:9808");
    }
}
