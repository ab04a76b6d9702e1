//! Compressed bodies for local variants: `Content-Encoding: gzip | deflate` requests are
//! inflated, within the model's `max_body_bytes` (a body that inflates past it is a 413,
//! so a few kilobytes of zip bomb cannot take gigabytes), and answers are compressed when
//! `Accept-Encoding` asks. Remote variants get bodies and these headers untouched: the
//! model server behind them decides.
//!
//! `deflate` is the zlib format (RFC 1950), as HTTP defines it and as tritonclient
//! sends it; a raw deflate stream (RFC 1951), which some clients send under the same
//! name, is accepted too.

use std::io::{Read, Write};

use http::HeaderValue;

use crate::RouterError;

/// A content coding we inflate and deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// RFC 1952.
    Gzip,
    /// RFC 1950 (or a raw RFC 1951 stream, when reading).
    Deflate,
}

impl Coding {
    /// The token for `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The coding of a request body, from its `Content-Encoding`; `None` for none or
/// `identity`. Anything else, or more than one coding, is refused (415).
pub fn request_coding(value: Option<&HeaderValue>) -> Result<Option<Coding>, RouterError> {
    let Some(v) = value else { return Ok(None) };
    let text = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match text.as_str() {
        "" | "identity" => Ok(None),
        "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
        "deflate" => Ok(Some(Coding::Deflate)),
        _ => Err(RouterError::UnsupportedEncoding(format!(
            "Content-Encoding `{}` is not supported by a local variant; send gzip, deflate or an uncompressed body",
            v.to_str().unwrap_or("(not text)")
        ))),
    }
}

/// The coding to answer with, from `Accept-Encoding` (q-values honoured; gzip preferred
/// over deflate at equal q); `None` for an uncompressed answer.
pub fn answer_coding(accept: Option<&HeaderValue>) -> Option<Coding> {
    let text = accept?.to_str().ok()?;
    let mut best: Option<(f32, Coding)> = None;
    for item in text.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let coding = match name.as_str() {
            "gzip" | "x-gzip" | "*" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            _ => continue,
        };
        if q > 0.0
            && best.is_none_or(|(bq, bc)| {
                q > bq || (q == bq && bc == Coding::Deflate && coding == Coding::Gzip)
            })
        {
            best = Some((q, coding));
        }
    }
    best.map(|(_, c)| c)
}

/// Inflates `body`, refusing (413) what would pass `limit` bytes.
pub fn decode(body: &[u8], coding: Coding, limit: u64) -> Result<Vec<u8>, RouterError> {
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Coding::Deflate if is_zlib(body) => Box::new(flate2::read::ZlibDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::DeflateDecoder::new(body)),
    };
    let mut out = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            RouterError::BadInput(format!(
                "the request body is not valid {} data: {e}",
                coding.token()
            ))
        })?;
    if out.len() as u64 > limit {
        return Err(RouterError::BodyTooLarge { limit });
    }
    Ok(out)
}

/// Compresses an answer.
pub fn encode(body: &[u8], coding: Coding) -> Vec<u8> {
    let level = flate2::Compression::fast();
    let out = Vec::with_capacity(body.len() / 4 + 64);
    let done = match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(out, level);
            e.write_all(body).and_then(|()| e.finish())
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(out, level);
            e.write_all(body).and_then(|()| e.finish())
        }
    };
    // Writing to a Vec cannot fail.
    done.unwrap_or_default()
}

/// A zlib header: compression method 8 and a check that makes the first two bytes a
/// multiple of 31.
fn is_zlib(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] & 0x0f == 8 && (u16::from(b[0]) << 8 | u16::from(b[1])) % 31 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codings_round_trip_and_bombs_are_refused() {
        let text = br#"{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}"#;
        for c in [Coding::Gzip, Coding::Deflate] {
            assert_eq!(decode(&encode(text, c), c, 1 << 20).unwrap(), text);
        }
        // Raw deflate under the name `deflate`.
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(text).unwrap();
        assert_eq!(
            decode(&raw.finish().unwrap(), Coding::Deflate, 1 << 20).unwrap(),
            text
        );
        // 64 MiB of zeros is about 64 KB compressed: refused at the limit, not inflated.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        assert!(matches!(
            decode(&bomb, Coding::Gzip, 1 << 20),
            Err(RouterError::BodyTooLarge { limit: 1_048_576 })
        ));
        assert!(matches!(
            decode(b"not gzip", Coding::Gzip, 1 << 20),
            Err(RouterError::BadInput(_))
        ));
    }

    #[test]
    fn headers_choose_the_codings() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(request_coding(None).unwrap(), None);
        assert_eq!(
            request_coding(Some(&h("GZIP"))).unwrap(),
            Some(Coding::Gzip)
        );
        assert_eq!(request_coding(Some(&h("identity"))).unwrap(), None);
        for bad in ["br", "gzip, deflate", "zstd"] {
            assert!(matches!(
                request_coding(Some(&h(bad))),
                Err(RouterError::UnsupportedEncoding(_))
            ));
        }
        assert_eq!(answer_coding(Some(&h("gzip, deflate"))), Some(Coding::Gzip));
        assert_eq!(
            answer_coding(Some(&h("deflate, gzip;q=0.5"))),
            Some(Coding::Deflate)
        );
        assert_eq!(answer_coding(Some(&h("gzip;q=0, identity"))), None);
        assert_eq!(answer_coding(Some(&h("br"))), None);
        assert_eq!(answer_coding(None), None);
    }
}
