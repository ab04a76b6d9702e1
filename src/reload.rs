//! Hot reload: `SIGHUP`, `POST /admin/reload` and `serve --watch` all come here.
//!
//! A reload reads the file, runs every check `validate` runs, refuses the keys a running
//! process cannot change ([`switchyard_config::RESTART_KEYS`]), and only then builds the
//! next route table from the live one (the router keeps breakers, pools, loaded models
//! and shadow lanes by name; the bandits move their state into the new bandits) and
//! swaps it in. Any error leaves the live config as it was, and is logged line by line.
//! Reloads run one at a time.
//!
//! The token files (`admin_token_file`, `feedback_token_file`) are re-read by every
//! reload and, with `--watch`, whenever their bytes change, so a rotated Kubernetes
//! Secret takes effect without a restart; which file is a restart key, its contents are
//! not. A token file that cannot be read, or is empty, refuses the reload (and, under
//! `--watch`, is logged once): the live token stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};
use switchyard_config::Config;
use switchyard_router::auth::Token;
use switchyard_router::Router;

use crate::bandits::Bandits;

/// The command line's `--listen` and `--admin-listen`: applied to the file at start and
/// at every reload, so a reload compares like with like.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
}

impl Overrides {
    /// Puts the overrides into `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(a) = self.listen {
            config.listen = a;
        }
        if let Some(a) = self.admin_listen {
            config.admin_listen = a;
        }
    }
}

/// The config's hash as `/admin/config` and `switchyard_config_info` show it: of the
/// file's bytes (so an operator can compare it with `sha`-free tooling: the same file
/// gives the same hash on every machine and version).
pub fn config_hash(text: &str) -> String {
    format!(
        "{:016x}",
        switchyard_config::hash::stable_hash(text.as_bytes())
    )
}

/// A token file and the token read from it, which the router and the admin listener
/// hold too ([`Token`]'s clones share the secret).
pub(crate) struct TokenFile {
    /// The config key that names the file.
    key: &'static str,
    path: PathBuf,
    /// The live token.
    pub(crate) token: Token,
    /// The hash of the live token's text (trimmed).
    hash: u64,
}

impl TokenFile {
    /// Reads the token file `path` that `key` names.
    pub(crate) fn read(key: &'static str, path: PathBuf) -> Result<Self, String> {
        let (hash, token) = read_token(&path)?;
        Ok(TokenFile {
            key,
            path,
            token,
            hash,
        })
    }
}

/// A token file's token, and the hash of its text.
fn read_token(path: &Path) -> Result<(u64, Token), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file `{}`: {e}", path.display()))?;
    let token =
        Token::new(&text).ok_or_else(|| format!("the token file `{}` is empty", path.display()))?;
    let hash = switchyard_config::hash::stable_hash(text.trim().as_bytes());
    Ok((hash, token))
}

/// A token file that cannot be used: its key, and why.
type TokenError = (&'static str, String);

/// What is live, and how reloads went.
struct Live {
    config: Config,
    hash: String,
    reloads: u64,
    failed: u64,
    /// The hash of the file the last failed reload read (`--watch` tries a file once).
    failed_hash: Option<String>,
    tokens: Vec<TokenFile>,
    /// What `--watch` last logged of the token files that cannot be used (logged once).
    token_errors: Option<Vec<TokenError>>,
}

/// Reloads the config file into a running Switchyard.
pub struct Reloader {
    file: Option<PathBuf>,
    overrides: Overrides,
    router: Arc<Router>,
    bandits: Arc<Bandits>,
    /// The resolved listener addresses (port 0 made real), for `/admin/config`.
    addrs: (SocketAddr, SocketAddr),
    live: Mutex<Live>,
    config_json: Arc<ArcSwap<Bytes>>,
    outcomes: IntCounterVec,
    info: IntGaugeVec,
    rotations: IntCounterVec,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("file", &self.file)
            .finish()
    }
}

impl Reloader {
    /// The reloader of the config `live` (read from `file`, with `hash`), serving on
    /// `addrs`; registers its metrics and renders the first `/admin/config`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        file: Option<PathBuf>,
        overrides: Overrides,
        live: Config,
        hash: String,
        router: Arc<Router>,
        bandits: Arc<Bandits>,
        addrs: (SocketAddr, SocketAddr),
        tokens: Vec<TokenFile>,
        registry: &Registry,
    ) -> Result<Self, String> {
        let outcomes = IntCounterVec::new(
            Opts::new(
                "switchyard_config_reloads_total",
                "Config reloads (SIGHUP, POST /admin/reload, --watch), by result: ok, or error (the live config stayed).",
            ),
            &["result"],
        )
        .map_err(|e| e.to_string())?;
        let info = IntGaugeVec::new(
            Opts::new(
                "switchyard_config_info",
                "1 for the hash of the live config file (as /admin/config shows it).",
            ),
            &["hash"],
        )
        .map_err(|e| e.to_string())?;
        let rotations = IntCounterVec::new(
            Opts::new(
                "switchyard_token_rotations_total",
                "Token files re-read with a new token (result ok), or found unreadable or empty (result error: the live token stayed), by key.",
            ),
            &["token", "result"],
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(rotations.clone()))
            .map_err(|e| e.to_string())?;
        for t in &tokens {
            for r in ["ok", "error"] {
                rotations.with_label_values(&[t.key, r]);
            }
        }
        registry
            .register(Box::new(outcomes.clone()))
            .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(info.clone()))
            .map_err(|e| e.to_string())?;
        for r in ["ok", "error"] {
            outcomes.with_label_values(&[r]);
        }
        info.with_label_values(&[&hash]).set(1);
        let me = Reloader {
            file,
            overrides,
            router,
            bandits,
            addrs,
            live: Mutex::new(Live {
                config: live,
                hash,
                reloads: 0,
                failed: 0,
                failed_hash: None,
                tokens,
                token_errors: None,
            }),
            config_json: Arc::new(ArcSwap::from_pointee(Bytes::new())),
            outcomes,
            info,
            rotations,
        };
        let json = me.render(&me.lock())?;
        me.config_json.store(Arc::new(json));
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `/admin/config`'s body, swapped at each reload.
    pub fn config_json(&self) -> Arc<ArcSwap<Bytes>> {
        self.config_json.clone()
    }

    /// Whether the config came from a file (only then is there something to reload).
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// `/admin/config`: the live config with the listeners' real addresses, and a `live`
    /// object saying which file, its hash, and how many reloads succeeded and failed.
    fn render(&self, live: &Live) -> Result<Bytes, String> {
        let mut config = live.config.clone();
        config.listen = self.addrs.0;
        config.admin_listen = self.addrs.1;
        let mut value = serde_json::to_value(&config).map_err(|e| e.to_string())?;
        value["live"] = json!({
            "file": self.file.as_ref().map(|f| f.display().to_string()),
            "hash": live.hash,
            "reloads": live.reloads,
            "failed_reloads": live.failed,
        });
        serde_json::to_vec_pretty(&value)
            .map(Bytes::from)
            .map_err(|e| format!("cannot render the config: {e}"))
    }

    /// Reloads the file: `Ok` says what changed, `Err` lists every reason it was
    /// refused (each also logged). Blocking: reads the file and may load models.
    pub fn reload(&self) -> Result<Value, Vec<String>> {
        self.reload_if(|_, _| true).unwrap_or_else(|| Ok(json!({})))
    }

    /// As [`Reloader::reload`], when `wanted(hash of the file now)`; `None` when not.
    fn reload_if(
        &self,
        wanted: impl Fn(&Live, &str) -> bool,
    ) -> Option<Result<Value, Vec<String>>> {
        let Some(file) = &self.file else {
            return Some(Err(vec![
                "this Switchyard runs the built-in config, not a file: nothing to reload".into(),
            ]));
        };
        let source = file.display().to_string();
        let mut live = self.lock();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                let error = format!("{source}: cannot read the file: {e}");
                return wanted(&live, "").then(|| self.refused(&mut live, None, vec![error]));
            }
        };
        let hash = config_hash(&text);
        if !wanted(&live, &hash) {
            return None;
        }
        let mut next = match crate::parse_config(&text) {
            Ok(c) => c,
            Err(errors) => {
                let lines = errors.render(&source).lines().map(str::to_string).collect();
                return Some(self.refused(&mut live, Some(hash), lines));
            }
        };
        self.overrides.apply(&mut next);
        let restart: Vec<String> = switchyard_config::restart_needed(&live.config, &next)
            .into_iter()
            .map(|k| format!("{source}: `{k}` changed, and it cannot change while running: restart Switchyard to apply it (the live config is unchanged)"))
            .collect();
        if !restart.is_empty() {
            return Some(self.refused(&mut live, Some(hash), restart));
        }
        let tokens = match self.read_tokens(&live) {
            Ok(t) => t,
            Err(errors) => {
                let lines = errors
                    .iter()
                    .map(|(key, e)| {
                        self.rotations.with_label_values(&[key, "error"]).inc();
                        format!("{source}: `{key}`: {e}; the live token stays")
                    })
                    .collect();
                return Some(self.refused(&mut live, Some(hash), lines));
            }
        };
        let bandits = &self.bandits;
        let removed = match self.router.reload(&next, |table| {
            bandits.reload(&next, table);
            Ok(())
        }) {
            Ok(removed) => removed,
            Err(e) => {
                return Some(self.refused(&mut live, Some(hash), vec![format!("{source}:{e}")]))
            }
        };
        self.info.with_label_values(&[&live.hash]).set(0);
        let _ = self.info.remove_label_values(&[&live.hash]);
        self.info.with_label_values(&[&hash]).set(1);
        live.config = next;
        live.hash = hash;
        live.reloads += 1;
        live.failed_hash = None;
        let rotated = self.rotate(&mut live, tokens);
        self.outcomes.with_label_values(&["ok"]).inc();
        match self.render(&live) {
            Ok(json) => self.config_json.store(Arc::new(json)),
            Err(e) => {
                tracing::warn!(error = %e, "/admin/config could not be rendered after the reload.")
            }
        }
        tracing::info!(file = %source, hash = %live.hash, reloads = live.reloads, removed = ?removed, "Config reloaded.");
        Some(Ok(json!({
            "reloaded": true,
            "hash": live.hash,
            "reloads": live.reloads,
            "removed": removed,
            "tokens_rotated": rotated,
        })))
    }

    /// Reads every token file: for each, `Some` new token when its text changed, `None`
    /// when not; `Err` names each file that cannot be used.
    fn read_tokens(&self, live: &Live) -> Result<Vec<Option<(u64, Token)>>, Vec<TokenError>> {
        let mut fresh = Vec::new();
        let mut errors = Vec::new();
        for t in &live.tokens {
            match read_token(&t.path) {
                Ok((hash, _)) if hash == t.hash => fresh.push(None),
                Ok(read) => fresh.push(Some(read)),
                Err(e) => errors.push((t.key, e)),
            }
        }
        if errors.is_empty() {
            Ok(fresh)
        } else {
            Err(errors)
        }
    }

    /// Puts the tokens [`Reloader::read_tokens`] found new in place; returns their keys.
    fn rotate(&self, live: &mut Live, fresh: Vec<Option<(u64, Token)>>) -> Vec<&'static str> {
        let mut rotated = Vec::new();
        for (t, new) in live.tokens.iter_mut().zip(fresh) {
            if let Some((hash, token)) = new {
                t.token.rotate(&token);
                t.hash = hash;
                self.rotations.with_label_values(&[t.key, "ok"]).inc();
                tracing::info!(token = t.key, file = %t.path.display(), "Token file re-read: its new token is in use, the old one is refused.");
                rotated.push(t.key);
            }
        }
        live.token_errors = None;
        rotated
    }

    /// `--watch` between config changes: a token file whose text changed is put in
    /// place; one that cannot be used is logged (once until it changes).
    fn rotate_changed_tokens(&self) {
        let mut live = self.lock();
        match self.read_tokens(&live) {
            Ok(fresh) => {
                self.rotate(&mut live, fresh);
            }
            Err(errors) => {
                if live.token_errors.as_ref() != Some(&errors) {
                    for (key, e) in &errors {
                        self.rotations.with_label_values(&[key, "error"]).inc();
                        tracing::error!(token = key, error = %e, "Token file not usable; the live token stays.");
                    }
                    live.token_errors = Some(errors);
                }
            }
        }
    }

    fn refused(
        &self,
        live: &mut Live,
        hash: Option<String>,
        errors: Vec<String>,
    ) -> Result<Value, Vec<String>> {
        for e in &errors {
            tracing::error!(error = %e, "Config reload refused.");
        }
        live.failed += 1;
        live.failed_hash = hash;
        self.outcomes.with_label_values(&["error"]).inc();
        if let Ok(json) = self.render(live) {
            self.config_json.store(Arc::new(json));
        }
        Err(errors)
    }

    /// `serve --watch`: checks the file every `every` and reloads when its bytes changed
    /// (a Kubernetes ConfigMap volume swaps a symlink; reading the file sees it), and the
    /// token files likewise. A file that failed is not tried again until it changes
    /// again. Ends when `done` is true.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        mut done: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = done.wait_for(|stopped| *stopped) => return,
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let config_changed = me.reload_if(|live, hash| {
                    !hash.is_empty()
                        && hash != live.hash
                        && live.failed_hash.as_deref() != Some(hash)
                });
                if config_changed.is_none() {
                    me.rotate_changed_tokens();
                }
            })
            .await;
        }
    }
}
