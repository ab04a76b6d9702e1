//! A Redis connection speaking RESP2: commands as arrays of bulk strings, pipelined
//! (send them all, then read one reply each), every read bounded in size and the whole
//! exchange in time by the caller.
//!
//! Why not the `redis` crate: fleet mode needs six commands (AUTH, SELECT, SET, EXISTS,
//! DEL, EVAL) on one connection; `redis` 1.8 with `tokio-comp` brings 30-odd crates
//! (url, idna and ICU's tables among them) and took 40.6 s of a cold debug build on 2
//! cores (README, design notes). The protocol is a page of text.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest bulk string read back: the totals of a model are a few kilobytes.
const MAX_BULK: usize = 64 * 1024 * 1024;
/// Most elements in one array reply.
const MAX_ARRAY: usize = 1 << 20;
/// Longest status, error or integer line.
const MAX_LINE: usize = 64 * 1024;

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

impl Reply {
    /// The text of a bulk or status reply.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Bulk(b) => String::from_utf8(b.clone()).ok(),
            Reply::Status(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// An open connection.
#[derive(Debug)]
pub struct Conn {
    stream: BufReader<TcpStream>,
}

/// Encodes one command.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Conn {
    /// Connects to `address` within `timeout`, then authenticates and selects `db`.
    pub async fn open(
        url: &switchyard_config::RedisUrl,
        timeout: Duration,
    ) -> Result<Conn, String> {
        let connect = TcpStream::connect(url.address());
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connecting to {} timed out", url.address()))?
            .map_err(|e| format!("connecting to {}: {e}", url.address()))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream: BufReader::new(stream),
        };
        let mut hello: Vec<Vec<Vec<u8>>> = Vec::new();
        if let Some(pw) = &url.password {
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &url.username {
                auth.push(user.as_bytes().to_vec());
            }
            auth.push(pw.as_bytes().to_vec());
            hello.push(auth);
        }
        if url.db != 0 {
            hello.push(vec![b"SELECT".to_vec(), url.db.to_string().into_bytes()]);
        }
        if !hello.is_empty() {
            let replies = tokio::time::timeout(timeout, conn.pipeline(&hello))
                .await
                .map_err(|_| "authenticating timed out".to_string())??;
            if let Some(Reply::Error(e)) = replies.iter().find(|r| matches!(r, Reply::Error(_))) {
                return Err(format!("Redis refused AUTH/SELECT: {e}"));
            }
        }
        Ok(conn)
    }

    /// Sends every command, then reads one reply each. The caller bounds it in time
    /// and drops the connection when it fails or times out (a late reply would
    /// otherwise answer the next command).
    pub async fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>, String> {
        let mut out = Vec::new();
        for c in commands {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            encode(&mut out, &args);
        }
        self.stream
            .get_mut()
            .write_all(&out)
            .await
            .map_err(|e| format!("writing to Redis: {e}"))?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.read().await?);
        }
        Ok(replies)
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| format!("reading from Redis: {e}"))?;
        if n == 0 {
            return Err("Redis closed the connection".into());
        }
        if !buf.ends_with(b"\r\n") {
            return Err("a reply line from Redis is too long or cut short".into());
        }
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).map_err(|_| "a reply line from Redis is not UTF-8".into())
    }

    /// Reads one reply (arrays iteratively, so a deep reply cannot blow the stack).
    async fn read(&mut self) -> Result<Reply, String> {
        // Arrays being filled: (elements so far, how many are expected).
        let mut open: Vec<(Vec<Reply>, usize)> = Vec::new();
        loop {
            let mut reply = match self.read_scalar_or_header().await? {
                Err(n) if n > 0 => {
                    open.push((Vec::with_capacity(n.min(1024)), n));
                    continue;
                }
                Err(_) => Reply::Array(Vec::new()),
                Ok(r) => r,
            };
            // Close every array this reply completes.
            loop {
                let Some((items, want)) = open.last_mut() else {
                    return Ok(reply);
                };
                items.push(reply);
                if items.len() < *want {
                    break;
                }
                let (items, _) = open.pop().unwrap_or_default();
                reply = Reply::Array(items);
            }
        }
    }

    /// A complete non-array reply (`Ok`), or the length of an array that follows
    /// (`Err(n)`).
    async fn read_scalar_or_header(&mut self) -> Result<Result<Reply, usize>, String> {
        let line = self.line().await?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| format!("Redis sent a bad length or integer `{rest}`"))
        };
        Ok(match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Int(number()?)),
            "$" => {
                let Some(n) = length(number()?, MAX_BULK, "string")? else {
                    return Ok(Ok(Reply::Nil));
                };
                let mut buf = vec![0u8; n + 2];
                self.stream
                    .read_exact(&mut buf)
                    .await
                    .map_err(|e| format!("reading from Redis: {e}"))?;
                buf.truncate(n);
                Ok(Reply::Bulk(buf))
            }
            "*" => {
                let Some(n) = length(number()?, MAX_ARRAY, "array")? else {
                    return Ok(Ok(Reply::Nil));
                };
                Err(n)
            }
            _ => return Err(format!("Redis sent an unknown reply `{line}`")),
        })
    }
}

/// An announced length: `None` for RESP's nil (-1), refused above `max`.
fn length(n: i64, max: usize, what: &str) -> Result<Option<usize>, String> {
    if n < 0 {
        return Ok(None);
    }
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n > max {
        return Err(format!(
            "Redis sent a {what} of {n}; at most {max} are read"
        ));
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a server on a real socket that answers the first thing it reads
    /// with `replies`, then holds the connection open.
    async fn talking_to(replies: &'static [u8]) -> Conn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(replies).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let url = switchyard_config::RedisUrl::parse(&format!("redis://{addr}")).unwrap();
        Conn::open(&url, Duration::from_secs(1)).await.unwrap()
    }

    /// Replies as a server writes them, nested arrays and nils included, read back
    /// from a real socket.
    #[tokio::test]
    async fn replies_are_read_from_the_wire() {
        let mut c = talking_to(
            b"+OK\r\n$-1\r\n:42\r\n*3\r\n$3\r\nabc\r\n*2\r\n:1\r\n*0\r\n$0\r\n\r\n-ERR no\r\n",
        )
        .await;
        let cmd = |s: &str| {
            s.split(' ')
                .map(|a| a.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        let replies = c
            .pipeline(&[cmd("A"), cmd("B"), cmd("C"), cmd("D"), cmd("E")])
            .await
            .unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::Status("OK".into()),
                Reply::Nil,
                Reply::Int(42),
                Reply::Array(vec![
                    Reply::Bulk(b"abc".to_vec()),
                    Reply::Array(vec![Reply::Int(1), Reply::Array(vec![])]),
                    Reply::Bulk(Vec::new()),
                ]),
                Reply::Error("ERR no".into()),
            ]
        );
    }

    /// A server that claims a huge string is refused before anything is allocated.
    #[tokio::test]
    async fn a_huge_length_is_refused() {
        let mut c = talking_to(b"$99999999999\r\n").await;
        let err = c.pipeline(&[vec![b"GET".to_vec()]]).await.unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }
}
