//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/admin/config`,
//! `/admin/state`, `/admin/shadow/{model}`; `POST /admin/reload` and the bandit controls.
//!
//! Kept on its own port so scrapes and probes never queue behind prediction traffic, and
//! so it can be bound to a different interface than the data plane.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::inbound::RequestBody;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::proxy::Router;

/// What the admin endpoints read.
pub struct AdminState {
    /// The registry every component registered on.
    pub registry: Registry,
    /// The data plane, for readiness.
    pub router: Arc<Router>,
    /// The live configuration as JSON (with which file, its hash and the reload
    /// counts), rendered at start and at each reload.
    pub config_json: Arc<arc_swap::ArcSwap<Bytes>>,
    /// Applies `POST /admin/reload`, if the config came from a file.
    pub reload: Option<ReloadFn>,
    /// Renders `/admin/state` (the bandits' posteriors and weights), if any.
    pub state: Option<StateFn>,
    /// Applies `POST /admin/bandit/{model}/{pin/VARIANT|freeze|release}`, if any.
    pub control: Option<ControlFn>,
    /// The token every request other than GET and HEAD needs, if any.
    pub token: Option<crate::auth::Token>,
    /// The live numbers for `/admin/stream` and `/dashboard`.
    pub pulse: Option<Arc<crate::pulse::Pulse>>,
}

/// An admin answer's body: whole, or the event stream.
pub enum AdminBody {
    /// A complete body.
    Full(Full<Bytes>),
    /// `/admin/stream`.
    Stream(crate::pulse::SseBody),
}

impl From<Full<Bytes>> for AdminBody {
    fn from(b: Full<Bytes>) -> Self {
        AdminBody::Full(b)
    }
}

impl http_body::Body for AdminBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            AdminBody::Full(b) => Pin::new(b).poll_frame(cx),
            AdminBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AdminBody::Full(b) => b.is_end_stream(),
            AdminBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            AdminBody::Full(b) => b.size_hint(),
            AdminBody::Stream(s) => s.size_hint(),
        }
    }
}

/// The dashboard: one page, its script and styles inline, no network needed.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Applies an operator's override to a model's bandit: `(model, action, variant)` with
/// action `pin` (with a variant), `freeze` or `release`; `Err((status, message))`.
pub type ControlFn =
    Arc<dyn Fn(&str, &str, Option<&str>) -> Result<serde_json::Value, (u16, String)> + Send + Sync>;

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("router", &self.router)
            .field("state", &self.state.is_some())
            .finish()
    }
}

/// Reloads the config file: `Ok` with what changed, or every reason it was refused.
/// Blocking (it reads files and may load models): called off the async workers.
pub type ReloadFn = Arc<dyn Fn() -> Result<serde_json::Value, Vec<String>> + Send + Sync>;

/// Renders the JSON of `/admin/state`.
pub type StateFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The admin endpoints as a tower service.
#[derive(Clone, Debug)]
pub struct AdminService(pub Arc<AdminState>);

impl tower_service::Service<Request<RequestBody>> for AdminService {
    type Response = Response<AdminBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        if req.uri().path() == "/admin/reload" && req.method() == Method::POST {
            if let Some(denied) = self.denied(&req) {
                return Box::pin(std::future::ready(Ok(denied.map(AdminBody::from))));
            }
            let reload = self.0.reload.clone();
            return Box::pin(async move { Ok(reload_now(reload).await.map(AdminBody::from)) });
        }
        if req.uri().path() == "/admin/stream" && req.method() == Method::GET {
            if let Some(pulse) = &self.0.pulse {
                let predictions = self.0.router.predictions();
                let mut resp = Response::new(AdminBody::Stream(pulse.stream(predictions)));
                let h = resp.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                h.insert(
                    http::header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                );
                return Box::pin(std::future::ready(Ok(resp)));
            }
        }
        Box::pin(std::future::ready(Ok(self
            .answer(&req)
            .map(AdminBody::from))))
    }
}

/// `POST /admin/reload`: 200 with what changed, 400 with every error (nothing changed).
async fn reload_now(reload: Option<ReloadFn>) -> Response<Full<Bytes>> {
    let Some(reload) = reload else {
        return reply(
            StatusCode::CONFLICT,
            "application/json",
            r#"{"error":"this Switchyard runs the built-in config, not a file: there is nothing to reload (start it with --config FILE)"}"#.into(),
        );
    };
    match tokio::task::spawn_blocking(move || reload()).await {
        Ok(Ok(changes)) => reply(
            StatusCode::OK,
            "application/json",
            changes.to_string().into(),
        ),
        Ok(Err(errors)) => reply(
            StatusCode::BAD_REQUEST,
            "application/json",
            serde_json::json!({
                "error": "the config was not reloaded; the live config is unchanged",
                "errors": errors,
            })
            .to_string()
            .into(),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            serde_json::json!({ "error": format!("the reload failed: {e}") })
                .to_string()
                .into(),
        ),
    }
}

impl AdminService {
    /// 401 for a request that changes state without the admin token (when one is set).
    fn denied(&self, req: &Request<RequestBody>) -> Option<Response<Full<Bytes>>> {
        let reads = req.method() == Method::GET || req.method() == Method::HEAD;
        let token = self.0.token.as_ref().filter(|_| !reads)?;
        if token.allows(req.headers()) {
            return None;
        }
        let mut resp = reply(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":"this admin request changes state and needs `Authorization: Bearer <token>` (admin_token_file or SWITCHYARD_ADMIN_TOKEN)"}"#.into(),
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        Some(resp)
    }

    fn answer(&self, req: &Request<RequestBody>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method(), req.uri().path());
        let reads = method == Method::GET || method == Method::HEAD;
        if let Some(denied) = self.denied(req) {
            return denied;
        }
        if let Some(rest) = path.strip_prefix("/admin/bandit/") {
            return self.control(method, rest);
        }
        if !reads {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                r#"{"error":"the admin endpoints take GET (but POST /admin/reload and /admin/bandit/...)"}"#.into(),
            );
        }
        match path {
            "/metrics" => {
                let mut buf = Vec::with_capacity(16 * 1024);
                let encoder = TextEncoder::new();
                match encoder.encode(&self.0.registry.gather(), &mut buf) {
                    Ok(()) => reply(StatusCode::OK, "text/plain; version=0.0.4", buf.into()),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "application/json",
                        serde_json::json!({ "error": e.to_string() }).to_string().into(),
                    ),
                }
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/dashboard" | "/dashboard/" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                self.dashboard().into(),
            ),
            "/admin/numbers" => match &self.0.pulse {
                Some(p) => reply(StatusCode::OK, "application/json", p.latest().to_string().into()),
                None => reply(StatusCode::NOT_FOUND, "application/json", r#"{"error":"no live numbers here"}"#.into()),
            },
            "/readyz" => match self.0.router.not_ready() {
                Some(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n").into(),
                ),
                None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            },
            "/admin/config" => reply(
                StatusCode::OK,
                "application/json",
                Bytes::clone(&self.0.config_json.load()),
            ),
            "/admin/state" => {
                let mut state = self
                    .0
                    .state
                    .as_ref()
                    .map_or_else(|| serde_json::json!({ "models": {} }), |f| f());
                // Every model's variants' breakers and in-flight counts, bandit or not.
                if let Some(obj) = state.as_object_mut() {
                    obj.insert("breakers".into(), self.0.router.health_json());
                }
                reply(StatusCode::OK, "application/json", state.to_string().into())
            }
            _ if path.starts_with("/admin/shadow/") => self.shadow(&path["/admin/shadow/".len()..]),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                serde_json::json!({
                    "error": format!("no admin endpoint `{path}`; try /dashboard, /metrics, /healthz, /readyz, /admin/config, /admin/state, /admin/stream, /admin/numbers or /admin/shadow/{{model}}")
                })
                .to_string()
                .into(),
            ),
        }
    }
}

impl AdminService {
    /// The dashboard with the last two minutes of samples in it, so its charts start
    /// full and its numbers are there before the stream's first event.
    fn dashboard(&self) -> String {
        let history: Vec<serde_json::Value> = self.0.pulse.as_ref().map_or_else(Vec::new, |p| {
            p.history().iter().map(|s| (**s).clone()).collect()
        });
        // `<` escaped: nothing in the JSON can close the script element.
        let json = serde_json::Value::from(history)
            .to_string()
            .replace('<', "\\u003c");
        DASHBOARD.replacen("/*HISTORY*/[]", &json, 1)
    }

    /// `GET /admin/shadow/{model}`: each shadow's counters, agreement and latest
    /// disagreements.
    fn shadow(&self, model: &str) -> Response<Full<Bytes>> {
        let table = self.0.router.table();
        let (status, body) = match table.model(model) {
            None => (
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": format!("unknown model `{model}`") }),
            ),
            Some(route) => {
                let mut report = route
                    .shadows
                    .as_ref()
                    .map_or_else(|| serde_json::json!({ "shadows": [] }), |s| s.report());
                report["model"] = model.into();
                (StatusCode::OK, report)
            }
        };
        reply(status, "application/json", body.to_string().into())
    }

    /// `POST /admin/bandit/{model}/pin/{variant}`, `.../freeze`, `.../release`.
    fn control(&self, method: &Method, rest: &str) -> Response<Full<Bytes>> {
        let error = |status: StatusCode, msg: String| {
            reply(
                status,
                "application/json",
                serde_json::json!({ "error": msg }).to_string().into(),
            )
        };
        if method != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "bandit controls take POST".into(),
            );
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let (model, action, variant) = match parts.as_slice() {
            [m, "pin", v] => (*m, "pin", Some(*v)),
            [m, a @ ("freeze" | "release")] => (*m, *a, None),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "use /admin/bandit/{model}/pin/{variant}, /admin/bandit/{model}/freeze or /admin/bandit/{model}/release".into(),
                )
            }
        };
        let Some(control) = &self.0.control else {
            return error(
                StatusCode::NOT_FOUND,
                format!("model `{model}` has no bandit"),
            );
        };
        match control(model, action, variant) {
            Ok(v) => reply(StatusCode::OK, "application/json", v.to_string().into()),
            Err((status, msg)) => error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                msg,
            ),
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
