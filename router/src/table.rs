//! The route table: an immutable snapshot of what the config says, built once and
//! swapped whole (later, on reload), so requests in flight keep the table they started
//! with.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use switchyard_config::Config;

use crate::metrics::{Metrics, VariantMetrics};
use crate::selector::{stable_hash, Selector, WeightError, WeightTable};
use crate::upstream::Upstream;

/// Models by the name clients use.
#[derive(Debug)]
pub struct RouteTable {
    models: HashMap<String, Arc<ModelRoute>>,
}

/// One model: its variants and how to choose among them.
#[derive(Debug)]
pub struct ModelRoute {
    /// The client-facing name.
    pub name: String,
    /// The variants, in config order (indices match the selector's).
    pub variants: Box<[VariantRoute]>,
    /// Chooses a variant per request.
    pub selector: Selector,
    /// Header whose value pins a client to a variant.
    pub sticky_header: Option<HeaderName>,
    /// Largest request body, in bytes.
    pub body_limit: u64,
}

/// One variant of a model.
#[derive(Debug)]
pub struct VariantRoute {
    /// The variant's name.
    pub name: String,
    /// The same, ready to send as `x-switchyard-variant`.
    pub name_header: HeaderValue,
    /// The model's name on the backend.
    pub upstream_model: String,
    /// Where requests go.
    pub backend: Backend,
    /// Metric handles.
    pub metrics: VariantMetrics,
}

/// What answers for a variant. Remote model servers today; the in-process runtime
/// (issue #3) will be a second case here, chosen by the same selector.
#[derive(Debug)]
pub enum Backend {
    /// A model server reached over HTTP.
    Remote(Upstream),
}

/// Why a table could not be built from a (validated) config.
#[derive(Debug, thiserror::Error)]
#[error("model `{model}`, variant `{variant}`: {message}")]
pub struct BuildError {
    /// The model.
    pub model: String,
    /// The variant.
    pub variant: String,
    /// What went wrong.
    pub message: String,
}

impl RouteTable {
    /// Builds the table. `seed` seeds the selectors (each model gets its own stream).
    /// Must run inside a Tokio runtime (clients spawn their pools there).
    pub fn build(config: &Config, metrics: &Metrics, seed: u64) -> Result<Self, BuildError> {
        let mut models = HashMap::with_capacity(config.models.len());
        for (name, model) in &config.models {
            let err = |variant: &str, message: String| BuildError {
                model: name.clone(),
                variant: variant.to_string(),
                message,
            };
            let mut variants = Vec::with_capacity(model.variants.len());
            for v in &model.variants {
                let upstream = Upstream::new(
                    &v.upstream,
                    v.protocol,
                    v.connect_timeout.unwrap_or(config.connect_timeout),
                    v.request_timeout
                        .or(model.request_timeout)
                        .unwrap_or(config.request_timeout),
                )
                .map_err(|m| err(&v.name, m))?;
                variants.push(VariantRoute {
                    name: v.name.clone(),
                    name_header: HeaderValue::from_str(&v.name)
                        .map_err(|e| err(&v.name, e.to_string()))?,
                    upstream_model: v.upstream_model.clone().unwrap_or_else(|| name.clone()),
                    backend: Backend::Remote(upstream),
                    metrics: metrics.variant(name, &v.name),
                });
            }
            let weights: Vec<f64> = model.variants.iter().map(|v| v.weight).collect();
            let table = WeightTable::new(&weights).map_err(|e| err("*", e.to_string()))?;
            let names: Vec<&str> = model.variants.iter().map(|v| v.name.as_str()).collect();
            let selector = Selector::new(&names, table, seed ^ stable_hash(name.as_bytes()));
            let sticky_header = match &model.sticky_header {
                Some(h) => {
                    Some(HeaderName::try_from(h.as_str()).map_err(|e| err("*", e.to_string()))?)
                }
                None => None,
            };
            let route = ModelRoute {
                name: name.clone(),
                variants: variants.into_boxed_slice(),
                selector,
                sticky_header,
                body_limit: config.body_limit(model),
            };
            route.publish_weight_gauges();
            models.insert(name.clone(), Arc::new(route));
        }
        Ok(RouteTable { models })
    }

    /// The model clients call `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<ModelRoute>> {
        self.models.get(name)
    }

    /// All models, in no particular order.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.models.values()
    }
}

impl ModelRoute {
    /// Replaces the model's weights (any non-negative numbers with a positive sum) and
    /// updates the `switchyard_variant_weight` gauges. The seam the bandit drives.
    pub fn set_weights(&self, weights: &[f64]) -> Result<(), WeightError> {
        self.selector.set_weights(weights)?;
        self.publish_weight_gauges();
        Ok(())
    }

    fn publish_weight_gauges(&self) {
        let table = self.selector.table();
        for (v, w) in self.variants.iter().zip(table.weights()) {
            v.metrics.weight.set(*w);
        }
    }
}
