//! The fields phase *respond* adds to every answer (`x-request-id`, and on a variant's
//! answer `x-switchyard-variant` and `server-timing`), kept as values on the answer's
//! body until its head is written.
//!
//! Why not in the answer's map: inserting a field hashes its name and probes the map,
//! and the map is walked again to write it; `server-timing` was also formatted into a
//! value of its own (validated, copied into an allocation). So HTTP/1.1
//! ([`crate::inbound`]) writes a [`Stamp`] as bytes after the map's fields, and hyper's
//! h2 gets it as fields ([`Stamp::to_headers`]) first. Either way a field of the same
//! name from the upstream is replaced, as `insert` replaced it. Measured with
//! `bench/instructions.sh` (`--release` A/B): −1,005 instructions per request of about
//! 32,200 (the inserts alone were 1,042).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::proxy::{SERVER_TIMING, X_REQUEST_ID, X_SWITCHYARD_VARIANT};

/// An answer's own fields, each absent until the phase that knows it sets it.
#[derive(Debug, Default, Clone)]
pub struct Stamp {
    /// `x-request-id`: the client's, or one made for it (set on every answer).
    pub request_id: Option<HeaderValue>,
    /// `x-switchyard-variant`: the variant that answered.
    pub variant: Option<HeaderValue>,
    /// `server-timing`.
    pub timing: Option<Timing>,
}

/// A request's time with us, in whole microseconds (what `server-timing` shows; a span
/// over 71 minutes reads as 71 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From the head to the variant's choice.
    pub route: u32,
    /// From the choice to the answer's head.
    pub upstream: u32,
    /// A local variant's queue, compute and respond phases.
    pub local: Option<[u32; 3]>,
}

impl Timing {
    /// The timing of `route` and `upstream`, and a local variant's `phases`.
    pub fn new(route: Duration, upstream: Duration, phases: Option<&crate::local::Phases>) -> Self {
        Timing {
            route: micros(route),
            upstream: micros(upstream),
            local: phases.map(|p| [micros(p.queue), micros(p.compute), micros(p.respond)]),
        }
    }

    /// `routing;dur=0.012, upstream;dur=1.204, total;dur=1.216` (milliseconds, µs
    /// precision); a local variant's `upstream` is followed by its `queue`, `compute`
    /// and `respond`. Digit by digit: float formatting showed up in profiles.
    pub fn write(&self, out: &mut Vec<u8>) {
        part(out, b"routing;dur=", self.route);
        part(out, b", upstream;dur=", self.upstream);
        if let Some([queue, compute, respond]) = self.local {
            part(out, b", queue;dur=", queue);
            part(out, b", compute;dur=", compute);
            part(out, b", respond;dur=", respond);
        }
        part(
            out,
            b", total;dur=",
            self.route.saturating_add(self.upstream),
        );
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `label` and `micros` as milliseconds with three decimals.
#[inline(always)]
fn part(out: &mut Vec<u8>, label: &[u8], micros: u32) {
    out.extend_from_slice(label);
    out.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

impl Stamp {
    /// Whether the field `name` of the answer's map is one of ours that is set, so is
    /// replaced: not written from the map. (Names compare cheaply: a standard name by
    /// its tag, ours by their lengths first.)
    pub(crate) fn replaces(&self, name: &HeaderName) -> bool {
        (*name == X_REQUEST_ID && self.request_id.is_some())
            || (*name == SERVER_TIMING && self.timing.is_some())
            || (*name == X_SWITCHYARD_VARIANT && self.variant.is_some())
    }

    /// Appends the fields that are set as HTTP/1.1 head lines. Their values are valid
    /// field values: two are [`HeaderValue`]s, the timing is digits and punctuation.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        if let Some(variant) = &self.variant {
            line(out, &X_SWITCHYARD_VARIANT, variant.as_bytes());
        }
        if let Some(timing) = &self.timing {
            out.extend_from_slice(SERVER_TIMING.as_str().as_bytes());
            out.extend_from_slice(b": ");
            timing.write(out);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(id) = &self.request_id {
            line(out, &X_REQUEST_ID, id.as_bytes());
        }
    }

    /// Moves the fields that are set into `headers`, replacing fields of the same names
    /// (for writers other than ours: hyper's h2).
    pub fn to_headers(&mut self, headers: &mut HeaderMap) {
        if let Some(variant) = self.variant.take() {
            headers.insert(X_SWITCHYARD_VARIANT.clone(), variant);
        }
        if let Some(timing) = self.timing.take() {
            let mut text = Vec::with_capacity(96);
            timing.write(&mut text);
            // Digits and punctuation: always a valid value.
            if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(text)) {
                headers.insert(SERVER_TIMING.clone(), value);
            }
        }
        if let Some(id) = self.request_id.take() {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
    }
}

#[inline(always)]
fn line(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(timing: Timing) -> String {
        let mut out = Vec::new();
        timing.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn millis_are_written_with_three_decimals() {
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_204, "1.204"),
            (30_000_123, "30000.123"),
            (u32::MAX, "4294967.295"),
        ] {
            let mut out = Vec::new();
            part(&mut out, b"", micros);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    #[test]
    fn timing_names_each_span_in_milliseconds() {
        let local = crate::local::Phases {
            queue: Duration::from_micros(100),
            compute: Duration::from_millis(1),
            respond: Duration::from_micros(3),
            at: std::time::Instant::now(),
        };
        let route = Duration::from_micros(12);
        let upstream = Duration::from_nanos(1_204_999);
        assert_eq!(
            text(Timing::new(route, upstream, None)),
            "routing;dur=0.012, upstream;dur=1.204, total;dur=1.216"
        );
        assert_eq!(
            text(Timing::new(route, upstream, Some(&local))),
            "routing;dur=0.012, upstream;dur=1.204, queue;dur=0.100, \
             compute;dur=1.000, respond;dur=0.003, total;dur=1.216"
        );
        // Past u32 microseconds (71 minutes) a span stops growing.
        assert_eq!(
            text(Timing::new(Duration::from_secs(5000), Duration::ZERO, None)),
            "routing;dur=4294967.295, upstream;dur=0.000, total;dur=4294967.295"
        );
    }

    #[test]
    fn only_the_set_fields_are_written_and_replace_the_maps() {
        let mut stamp = Stamp {
            request_id: Some(HeaderValue::from_static("r-1")),
            ..Stamp::default()
        };
        let mut out = Vec::new();
        stamp.write(&mut out);
        assert_eq!(out, b"x-request-id: r-1\r\n");
        let names = ["x-request-id", "server-timing", "x-switchyard-variant"];
        let replaced = |stamp: &Stamp| names.map(|n| stamp.replaces(&HeaderName::from_static(n)));
        assert_eq!(replaced(&stamp), [true, false, false]);
        // Names of the same lengths are not ours.
        for other in [
            "content-type",
            "x-request-ix",
            "cache-control",
            "x-switchyard-varian2",
        ] {
            assert!(!stamp.replaces(&HeaderName::from_static(other)), "{other}");
        }
        stamp.variant = Some(HeaderValue::from_static("blue"));
        stamp.timing = Some(Timing::new(
            Duration::from_micros(1),
            Duration::from_micros(2),
            None,
        ));
        assert_eq!(replaced(&stamp), [true, true, true]);
        out.clear();
        stamp.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-switchyard-variant: blue\r\n\
             server-timing: routing;dur=0.001, upstream;dur=0.002, total;dur=0.003\r\n\
             x-request-id: r-1\r\n"
        );

        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("upstream's"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        stamp.to_headers(&mut headers);
        assert_eq!(headers.len(), 4);
        assert_eq!(headers["x-request-id"], "r-1");
        assert_eq!(headers["x-switchyard-variant"], "blue");
        assert_eq!(
            headers["server-timing"],
            "routing;dur=0.001, upstream;dur=0.002, total;dur=0.003"
        );
        assert!(stamp.request_id.is_none() && stamp.variant.is_none() && stamp.timing.is_none());
    }
}
