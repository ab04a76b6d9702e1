//! A lean HTTP/1.1 client connection: one request at a time, the request written with a
//! single `write_all` from a reused buffer, the response parsed in place with `httparse`
//! (content-length, chunked, or until close). No pool, no channels, no task per
//! connection beyond the caller's: the generator must cost less than the server it tests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ErrorKind;

/// The parts of a response the generator uses.
#[derive(Debug, Default)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `x-switchyard-variant`, when present.
    pub variant: Option<Box<str>>,
    /// `server-timing`, when present.
    pub server_timing: Option<Box<str>>,
    /// The body, when asked for.
    pub body: Vec<u8>,
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data not yet consumed.
    filled: usize,
    /// The server asked to close after the last response.
    closing: bool,
}

const READ_CHUNK: usize = 16 * 1024;

impl Conn {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn, (ErrorKind, String)> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err((ErrorKind::Connect, format!("connect to {addr} timed out"))),
            Ok(Err(e)) => {
                return Err((ErrorKind::Connect, format!("cannot connect to {addr}: {e}")))
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: vec![0; READ_CHUNK],
            filled: 0,
            closing: false,
        })
    }

    /// False once the server said `connection: close` or the connection broke.
    pub fn reusable(&self) -> bool {
        !self.closing
    }

    /// Sends `request` (a complete HTTP/1.1 message) and reads the response.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        keep_body: bool,
    ) -> Result<Response, ErrorKind> {
        if let Err(e) = self.stream.write_all(request).await {
            self.closing = true;
            return Err(io_kind(&e));
        }
        let result = self.read_response(keep_body).await;
        if result.is_err() {
            self.closing = true;
        }
        result
    }

    async fn fill(&mut self) -> Result<usize, ErrorKind> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        match self.stream.read(&mut self.buf[self.filled..]).await {
            Ok(0) => Err(ErrorKind::Reset),
            Ok(n) => {
                self.filled += n;
                Ok(n)
            }
            Err(e) => Err(io_kind(&e)),
        }
    }

    async fn read_response(&mut self, keep_body: bool) -> Result<Response, ErrorKind> {
        // Head.
        let (head_len, mut resp, framing) = loop {
            if self.filled > 0 {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut parsed = httparse::Response::new(&mut headers);
                match parsed.parse(&self.buf[..self.filled]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let status = parsed.code.unwrap_or(0);
                        let mut resp = Response {
                            status,
                            ..Response::default()
                        };
                        let mut framing = if status == 204 || status == 304 || status / 100 == 1 {
                            Framing::Length(0)
                        } else {
                            Framing::Close
                        };
                        for h in parsed.headers.iter() {
                            let name = h.name;
                            if name.eq_ignore_ascii_case("content-length") {
                                let len = std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse().ok())
                                    .ok_or(ErrorKind::Protocol)?;
                                framing = Framing::Length(len);
                            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                                if h.value.eq_ignore_ascii_case(b"chunked") {
                                    framing = Framing::Chunked;
                                }
                            } else if name.eq_ignore_ascii_case("connection") {
                                if h.value.eq_ignore_ascii_case(b"close") {
                                    self.closing = true;
                                }
                            } else if name.eq_ignore_ascii_case("x-switchyard-variant") {
                                resp.variant =
                                    Some(String::from_utf8_lossy(h.value).into_owned().into());
                            } else if name.eq_ignore_ascii_case("server-timing") {
                                resp.server_timing =
                                    Some(String::from_utf8_lossy(h.value).into_owned().into());
                            }
                        }
                        if parsed.version == Some(0) && !matches!(framing, Framing::Length(_)) {
                            self.closing = true;
                        }
                        break (n, resp, framing);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Err(ErrorKind::Protocol),
                }
            }
            self.fill().await?;
        };
        self.consume(head_len);
        // Body.
        match framing {
            Framing::Length(len) => {
                while self.filled < len {
                    if self.buf.len() < len {
                        self.buf.resize(len, 0);
                    }
                    self.fill().await?;
                }
                if keep_body {
                    resp.body.extend_from_slice(&self.buf[..len]);
                }
                self.consume(len);
            }
            Framing::Chunked => loop {
                let (size, line_len) = loop {
                    if let Some(at) = find_crlf(&self.buf[..self.filled]) {
                        let line = std::str::from_utf8(&self.buf[..at])
                            .map_err(|_| ErrorKind::Protocol)?;
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size =
                            usize::from_str_radix(hex, 16).map_err(|_| ErrorKind::Protocol)?;
                        break (size, at + 2);
                    }
                    self.fill().await?;
                };
                self.consume(line_len);
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        match find_crlf(&self.buf[..self.filled]) {
                            Some(0) => {
                                self.consume(2);
                                break;
                            }
                            Some(at) => self.consume(at + 2),
                            None => {
                                self.fill().await?;
                            }
                        }
                    }
                    break;
                }
                while self.filled < size + 2 {
                    if self.buf.len() < size + 2 {
                        self.buf.resize(size + 2, 0);
                    }
                    self.fill().await?;
                }
                if keep_body {
                    resp.body.extend_from_slice(&self.buf[..size]);
                }
                self.consume(size + 2);
            },
            Framing::Close => {
                self.closing = true;
                loop {
                    if keep_body {
                        resp.body.extend_from_slice(&self.buf[..self.filled]);
                    }
                    self.filled = 0;
                    match self.stream.read(&mut self.buf[..]).await {
                        Ok(0) => break,
                        Ok(n) => self.filled = n,
                        Err(e) => return Err(io_kind(&e)),
                    }
                }
            }
        }
        Ok(resp)
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Reset,
    }
}
