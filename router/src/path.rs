//! Phase 1, *route*: what a request path asks for, in both protocols we speak.
//!
//! TensorFlow Serving REST:
//! `/v1/models/{m}[/versions/{v}|/labels/{l}]:{predict|classify|regress}` (POST),
//! `/v1/models/{m}[/versions/{v}|/labels/{l}][/metadata]` (GET).
//!
//! KServe / Triton V2: `/v2/models/{m}[/versions/{v}]/infer` (POST),
//! `/v2/models/{m}[/versions/{v}][/ready|/config|/stats]` (GET), any other
//! `/v2/models/{m}[/versions/{v}]/…` (Triton's extensions: forwarded, GET or POST),
//! `/v2/repository/models/{m}/{load|unload}` (POST), `/v2/repository/index` (POST),
//! `/v2/health/{live|ready}` and `/v2` (GET).

use std::ops::Range;

use http::Method;

use crate::error::RouterError;

/// Which protocol a request speaks; decides the shape of locally made answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TensorFlow Serving REST (`/v1/...`).
    TfServing,
    /// KServe / Triton V2 (`/v2/...`).
    V2,
    /// gRPC: KServe V2 / Triton's and TF Serving's services ([`crate::grpc`]).
    Grpc,
}

/// What the request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A request about one model, forwarded to one of its variants.
    Model(ModelRequest),
    /// `GET /v2/health/live`: answered by Switchyard itself.
    ServerLive,
    /// `GET /v2/health/ready`: answered by Switchyard itself.
    ServerReady,
    /// `GET /v2`: server metadata, answered by Switchyard itself.
    ServerMetadata,
    /// `POST /v1/feedback`: the application's verdict on earlier predictions.
    Feedback,
    /// `POST /v2/repository/index`: the models served here, answered by Switchyard.
    RepositoryIndex,
}

/// A request addressed to one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRequest {
    /// The protocol.
    pub protocol: Protocol,
    /// What is asked of the model.
    pub verb: Verb,
    /// Byte range of the model name in the path, so forwarding can substitute the
    /// upstream's name without re-parsing.
    pub model: Range<usize>,
    /// Byte range of the version asked for (`/versions/{v}`), if any.
    pub version: Option<Range<usize>>,
    /// Byte range of the TF Serving label asked for (`/labels/{l}`), if any.
    pub label: Option<Range<usize>>,
}

/// What is asked of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `:predict` / `/infer`.
    Predict,
    /// TF Serving `:classify`.
    Classify,
    /// TF Serving `:regress`.
    Regress,
    /// TF Serving model status (GET `/v1/models/{m}[/versions/{v}]`).
    Status,
    /// Model metadata (GET TF `.../metadata`, V2 `/v2/models/{m}`).
    Metadata,
    /// V2 model readiness (GET).
    Ready,
    /// Triton's model configuration extension (GET `/v2/models/{m}/config`).
    Config,
    /// Triton's statistics extension (GET `/v2/models/{m}/stats`).
    Stats,
    /// Triton's model repository extension (POST `/v2/repository/models/{m}/load` or
    /// `/unload`); `true` for load.
    Repository(bool),
    /// Any other `/v2/models/{m}/…` path (trace settings and the like): forwarded as it
    /// is, GET or POST.
    Extension,
}

impl Verb {
    /// True for the verbs that produce a prediction (and, later, a bandit decision).
    pub fn is_prediction(self) -> bool {
        matches!(self, Verb::Predict | Verb::Classify | Verb::Regress)
    }

    /// The method the verb takes; `None`: GET or POST (extensions we only forward).
    fn method(self) -> Option<Method> {
        match self {
            Verb::Extension => None,
            Verb::Repository(_) => Some(Method::POST),
            v if v.is_prediction() => Some(Method::POST),
            _ => Some(Method::GET),
        }
    }
}

/// Parses `path` and checks `method` against it.
pub fn parse(method: &Method, path: &str) -> Result<Endpoint, RouterError> {
    let (endpoint, allowed) = if let Some(rest) = path.strip_prefix("/v1/models/") {
        let (req, m) = parse_tf(path, rest)?;
        (Endpoint::Model(req), m)
    } else if let Some(rest) = path.strip_prefix("/v2/models/") {
        let (req, m) = parse_v2(path, rest)?;
        (Endpoint::Model(req), m)
    } else if let Some(rest) = path.strip_prefix("/v2/repository/models/") {
        let (req, m) = parse_repository(path, rest)?;
        (Endpoint::Model(req), m)
    } else {
        match path {
            "/v2/health/live" => (Endpoint::ServerLive, Some(Method::GET)),
            "/v2/health/ready" => (Endpoint::ServerReady, Some(Method::GET)),
            "/v2" | "/v2/" => (Endpoint::ServerMetadata, Some(Method::GET)),
            "/v1/feedback" => (Endpoint::Feedback, Some(Method::POST)),
            "/v2/repository/index" => (Endpoint::RepositoryIndex, Some(Method::POST)),
            _ if path.starts_with("/v1/") || path.starts_with("/v2/") => {
                return Err(RouterError::BadPath(format!(
                    "`{path}` is not a prediction endpoint; use /v1/models/{{model}}:predict or /v2/models/{{model}}/infer"
                )))
            }
            _ => return Err(RouterError::NoRoute(path.to_string())),
        }
    };
    let fits = match &allowed {
        Some(allowed) => method == allowed || (*allowed == Method::GET && method == Method::HEAD),
        None => [Method::GET, Method::HEAD, Method::POST].contains(method),
    };
    if !fits {
        return Err(RouterError::MethodNotAllowed {
            method: method.clone(),
            allowed: allowed.unwrap_or(Method::POST),
        });
    }
    Ok(endpoint)
}

/// A model name, version or label that could mean something else to an upstream's path
/// handling is refused before anything is forwarded: `.` and `..`, a slash or backslash
/// (also percent-encoded), a control character (also percent-encoded), or a broken
/// percent escape. `/v2/models/m/versions/..%2F..%2Fsecret/infer` once reached the
/// upstream verbatim.
fn check_segment(path: &str, what: &str, segment: &str) -> Result<(), RouterError> {
    let refuse = |why: &str| Err(bad(path, &format!("the {what} {why}")));
    let bytes = segment.as_bytes();
    // Decoded length and whether every decoded byte is a dot: `%2E%2E` is `..` once
    // decoded. Counted on the way rather than decoded into a string (once per request).
    let (mut decoded, mut all_dots) = (0usize, true);
    let mut i = 0;
    while i < bytes.len() {
        let b = match bytes[i] {
            b'%' => {
                let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
                match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                    (Some(h), Some(l)) => {
                        i += 2;
                        (h * 16 + l) as u8
                    }
                    _ => return refuse("has a `%` that is not a percent escape"),
                }
            }
            b => b,
        };
        if b == b'/' || b == b'\\' {
            return refuse("contains a slash or backslash");
        }
        if b.is_ascii_control() {
            return refuse("contains a control character");
        }
        decoded += 1;
        all_dots &= b == b'.';
        i += 1;
    }
    if all_dots && (decoded == 1 || decoded == 2) {
        return refuse("cannot be `.` or `..`");
    }
    Ok(())
}

fn bad(path: &str, why: &str) -> RouterError {
    RouterError::BadPath(format!("malformed path `{path}`: {why}"))
}

fn parse_tf(path: &str, rest: &str) -> Result<(ModelRequest, Option<Method>), RouterError> {
    let start = path.len() - rest.len();
    // The verb is glued to the last segment: `/v1/models/m/versions/3:predict`.
    let (rest, verb) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => {
            let verb = match &rest[i + 1..] {
                "predict" => Verb::Predict,
                "classify" => Verb::Classify,
                "regress" => Verb::Regress,
                other => {
                    return Err(bad(
                        path,
                        &format!("unknown method `:{other}`; use :predict, :classify or :regress"),
                    ))
                }
            };
            (&rest[..i], Some(verb))
        }
        _ => (rest, None),
    };
    let mut segments = rest.split('/');
    let model = segments.next().unwrap_or_default();
    if model.is_empty() {
        return Err(bad(path, "the model name is empty"));
    }
    check_segment(path, "model name", model)?;
    let tail: Vec<&str> = segments.collect();
    // Offsets: `{model}/versions/{v}` puts `v` after the model, a slash and the keyword.
    let after_keyword = |kw: &str, v: &str| {
        let at = start + model.len() + 1 + kw.len() + 1;
        Some(at..at + v.len())
    };
    let (mut version, mut label) = (None, None);
    let metadata = match tail.as_slice() {
        [] => false,
        ["metadata"] => true,
        ["versions", v] | ["versions", v, "metadata"] => {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(path, &format!("version `{v}` is not a number")));
            }
            version = after_keyword("versions", v);
            tail.len() == 3
        }
        ["labels", l] | ["labels", l, "metadata"] => {
            if l.is_empty() {
                return Err(bad(path, "the label is empty"));
            }
            check_segment(path, "label", l)?;
            label = after_keyword("labels", l);
            tail.len() == 3
        }
        _ => {
            return Err(bad(
                path,
                "expected /versions/{v} or /labels/{l} after the model",
            ))
        }
    };
    let verb = match (verb, metadata) {
        (Some(_), true) => return Err(bad(path, "`/metadata` takes no `:method`")),
        (Some(v), false) => v,
        (None, true) => Verb::Metadata,
        (None, false) => Verb::Status,
    };
    let req = ModelRequest {
        protocol: Protocol::TfServing,
        verb,
        model: start..start + model.len(),
        version,
        label,
    };
    Ok((req, verb.method()))
}

fn parse_v2(path: &str, rest: &str) -> Result<(ModelRequest, Option<Method>), RouterError> {
    let start = path.len() - rest.len();
    let segments: Vec<&str> = rest.split('/').collect();
    let model = segments[0];
    if model.is_empty() {
        return Err(bad(path, "the model name is empty"));
    }
    check_segment(path, "model name", model)?;
    let tail = &segments[1..];
    let (tail, version) = match tail {
        ["versions", v, more @ ..] => {
            if v.is_empty() {
                return Err(bad(path, "the version is empty"));
            }
            check_segment(path, "version", v)?;
            let at = start + model.len() + "/versions/".len();
            (more, Some(at..at + v.len()))
        }
        _ => (tail, None),
    };
    let verb = match tail {
        [] => Verb::Metadata,
        ["ready"] => Verb::Ready,
        ["infer"] => Verb::Predict,
        ["config"] => Verb::Config,
        ["stats"] => Verb::Stats,
        more => {
            // Forwarded as written: each segment is checked as the model name is.
            for segment in more {
                if segment.is_empty() {
                    return Err(bad(path, "an empty segment after the model"));
                }
                check_segment(path, "path segment", segment)?;
            }
            Verb::Extension
        }
    };
    let req = ModelRequest {
        protocol: Protocol::V2,
        verb,
        model: start..start + model.len(),
        version,
        label: None,
    };
    Ok((req, verb.method()))
}

/// `/v2/repository/models/{m}/{load|unload}`.
fn parse_repository(path: &str, rest: &str) -> Result<(ModelRequest, Option<Method>), RouterError> {
    let start = path.len() - rest.len();
    let (model, load) = match rest.rsplit_once('/') {
        Some((m, "load")) => (m, true),
        Some((m, "unload")) => (m, false),
        _ => {
            return Err(bad(
                path,
                "expected /v2/repository/models/{model}/load or /unload",
            ))
        }
    };
    if model.is_empty() {
        return Err(bad(path, "the model name is empty"));
    }
    check_segment(path, "model name", model)?;
    let verb = Verb::Repository(load);
    let req = ModelRequest {
        protocol: Protocol::V2,
        verb,
        model: start..start + model.len(),
        version: None,
        label: None,
    };
    Ok((req, verb.method()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(path: &str, method: Method) -> (Verb, Protocol, &str) {
        match parse(&method, path).unwrap() {
            Endpoint::Model(r) => (r.verb, r.protocol, &path[r.model]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tf_serving_paths() {
        use Verb::*;
        assert_eq!(
            model("/v1/models/mnist:predict", Method::POST),
            (Predict, Protocol::TfServing, "mnist")
        );
        assert_eq!(
            model("/v1/models/m/versions/12:classify", Method::POST).0,
            Classify
        );
        assert_eq!(
            model("/v1/models/m/labels/stable:regress", Method::POST).0,
            Regress
        );
        assert_eq!(
            model("/v1/models/m.v2", Method::GET),
            (Status, Protocol::TfServing, "m.v2")
        );
        assert_eq!(
            model("/v1/models/m/versions/3/metadata", Method::GET).0,
            Metadata
        );
        assert_eq!(model("/v1/models/m/labels/x", Method::GET).0, Status);
    }

    #[test]
    fn versions_and_labels_are_located() {
        for (path, version, label) in [
            ("/v1/models/mnist/versions/12:predict", Some("12"), None),
            ("/v1/models/m/labels/stable/metadata", None, Some("stable")),
            ("/v1/models/m:predict", None, None),
            ("/v2/models/mnist/versions/7/infer", Some("7"), None),
            ("/v2/models/mnist/infer", None, None),
        ] {
            let Endpoint::Model(r) = parse(&Method::POST, path)
                .or_else(|_| parse(&Method::GET, path))
                .unwrap()
            else {
                panic!("{path}")
            };
            assert_eq!(r.version.map(|v| &path[v]), version, "{path}");
            assert_eq!(r.label.map(|l| &path[l]), label, "{path}");
        }
    }

    #[test]
    fn v2_paths() {
        use Verb::*;
        assert_eq!(
            model("/v2/models/mnist/infer", Method::POST),
            (Predict, Protocol::V2, "mnist")
        );
        assert_eq!(
            model("/v2/models/mnist/versions/2/infer", Method::POST).0,
            Predict
        );
        assert_eq!(model("/v2/models/mnist", Method::GET).0, Metadata);
        assert_eq!(
            model("/v2/models/mnist/versions/1/ready", Method::GET).0,
            Ready
        );
        assert_eq!(model("/v2/models/mnist/config", Method::GET).0, Config);
        assert_eq!(
            model("/v2/models/mnist/versions/1/stats", Method::GET).0,
            Stats
        );
        assert_eq!(
            model("/v2/models/mnist/trace/setting", Method::POST).0,
            Extension
        );
        assert_eq!(
            model("/v2/models/mnist/trace/setting", Method::GET).0,
            Extension
        );
        assert_eq!(
            model("/v2/repository/models/mnist/load", Method::POST),
            (Repository(true), Protocol::V2, "mnist")
        );
        assert_eq!(
            model("/v2/repository/models/mnist/unload", Method::POST).0,
            Repository(false)
        );
        assert_eq!(
            parse(&Method::POST, "/v2/repository/index").unwrap(),
            Endpoint::RepositoryIndex
        );
        assert_eq!(
            parse(&Method::GET, "/v2/health/live").unwrap(),
            Endpoint::ServerLive
        );
        assert_eq!(
            parse(&Method::HEAD, "/v2/health/ready").unwrap(),
            Endpoint::ServerReady
        );
    }

    /// A property, seeded: arbitrary paths built from the characters that matter to the
    /// parser (and random bytes) never panic, and every refusal is a 4xx.
    #[test]
    fn arbitrary_paths_never_panic_and_errors_are_4xx() {
        const PIECES: &[&str] = &[
            "/", "v1", "v2", "models", "m", "versions", "labels", "infer", "ready", "metadata",
            ":", ":predict", "..", ".", "%", "%2F", "%2e", "%5C", "%00", "%zz", "\\", "1", "é",
            "\u{0}", "//", "feedback", "health",
        ];
        let mut next = crate::test_rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..100_000 {
            let mut path = String::from(if next().is_multiple_of(2) {
                "/v1/models/"
            } else {
                "/v2/models/"
            });
            for _ in 0..next() % 8 {
                match next() % 5 {
                    0 => path.push(char::from_u32((next() % 0x250) as u32).unwrap_or('x')),
                    _ => path.push_str(PIECES[(next() % PIECES.len() as u64) as usize]),
                }
            }
            let method = if next().is_multiple_of(2) {
                Method::GET
            } else {
                Method::POST
            };
            match parse(&method, &path) {
                Ok(Endpoint::Model(r)) => assert!(path.get(r.model).is_some(), "{path:?}"),
                Ok(_) => {}
                Err(e) => assert!(e.status().is_client_error(), "{path:?}: {e}"),
            }
        }
    }

    #[test]
    fn malformed_paths_and_methods() {
        let bad_paths = [
            "/v1/models/:predict",
            "/v1/models/m:explode",
            "/v1/models/m/versions/x:predict",
            "/v1/models/m/versions/:predict",
            "/v1/models/m/other/1:predict",
            "/v1/models/m/metadata:predict",
            "/v2/models//infer",
            "/v2/models/m/trace/",
            "/v2/models/m/trace/..",
            "/v2/models/m/a%2Fb",
            "/v2/repository/models/m/delete",
            "/v2/repository/models//load",
            "/v2/repository/models/..%2Fx/load",
            "/v2/elsewhere",
            "/v2/models/mnist/versions/..%2F..%2Fsecret/infer",
            "/v2/models/mnist/versions/../infer",
            "/v2/models/mnist/versions/%2e%2E/infer",
            "/v2/models/mnist/versions/.%2e/infer",
            "/v2/models/%2E/infer",
            "/v2/models/mnist/versions/1%5C2/infer",
            "/v2/models/mnist/versions/1%00/infer",
            "/v2/models/mnist/versions/1%zz/infer",
            "/v2/models/..%2Fadmin/infer",
            "/v1/models/m/labels/a%2Fb:predict",
            "/v1/models/m%0A:predict",
            "/v1/models/..:predict",
        ];
        for p in bad_paths {
            assert!(
                matches!(parse(&Method::POST, p), Err(RouterError::BadPath(_))),
                "{p}"
            );
        }
        // Dots are refused only as a whole `.` or `..`, encoded or not.
        for p in [
            "/v2/models/m.v2/infer",
            "/v2/models/.../infer",
            "/v2/models/%2e%2e%2e/infer",
            "/v1/models/.a:predict",
        ] {
            assert!(parse(&Method::POST, p).is_ok(), "{p}");
        }
        assert!(matches!(
            parse(&Method::GET, "/favicon.ico"),
            Err(RouterError::NoRoute(_))
        ));
        assert!(matches!(
            parse(&Method::GET, "/v1/models/m:predict"),
            Err(RouterError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            parse(&Method::POST, "/v2/models/m/ready"),
            Err(RouterError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            parse(&Method::DELETE, "/v2/models/m/trace/setting"),
            Err(RouterError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            parse(&Method::GET, "/v2/models/m/config/x").map(|_| ()),
            Ok(())
        ));
    }
}
